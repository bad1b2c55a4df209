//! Generates the KVM paravirt constants (hypercall numbers, return codes, feature bits, MSR
//! index, MAP_GPA_RANGE attributes) from the kernel's own uapi headers, so that none of them is
//! retyped by hand. `struct kvm_run` and the ioctl constants come from kvm-bindings instead.

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=src/kvm/consts.h");
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    bindgen::Builder::default()
        .header("src/kvm/consts.h")
        // KVM_MAP_GPA_RANGE_ENCRYPTED is a function-like macro expansion and KVM_EINVAL expands
        // to EINVAL: let clang evaluate what cexpr alone cannot.
        .clang_macro_fallback()
        // Its scratch files (.macro_eval.c, a .pch) go to the current directory by default,
        // i.e. the source tree, shared by every concurrent build of this crate (several target
        // dirs, the lib and test profiles): one build then reads another's half-written file and
        // silently loses constants. Each build script run has its own OUT_DIR.
        .clang_macro_fallback_build_dir(&out)
        .allowlist_var("KVM_HC_.*|KVM_E.*|KVM_FEATURE_.*|MSR_KVM_MIGRATION_CONTROL|KVM_MIGRATION_READY|KVM_MAP_GPA_RANGE_.*|KVM_CPUID_FEATURES")
        .default_macro_constant_type(bindgen::MacroTypeVariation::Unsigned)
        .generate()
        .expect("bindgen could not read the kernel's KVM uapi headers (apt-get install linux-libc-dev libclang-dev)")
        .write_to_file(out.join("kvm_consts.rs"))
        .expect("writing kvm_consts.rs into OUT_DIR");

    pagenc_h_bindings(&out);
    sev_status_bindings(&out);
}

/// The SEV firmware status codes (`SEV_RET_*` of `<linux/psp-sev.h>`), which the kernel passes
/// through unchanged in `kvm_sev_cmd.error`: the transport names them in its errors and the
/// simulated firmware answers with them (src/transport/sev_abi.rs).
fn sev_status_bindings(out: &std::path::Path) {
    println!("cargo:rerun-if-changed=src/transport/sev_consts.h");
    bindgen::Builder::default()
        .header("src/transport/sev_consts.h")
        .allowlist_var("SEV_RET_.*")
        .allowlist_type("sev_ret_code")
        .default_enum_style(bindgen::EnumVariation::Consts)
        .prepend_enum_name(false)
        .generate()
        .expect("bindgen could not read <linux/psp-sev.h> (apt-get install linux-libc-dev libclang-dev)")
        .write_to_file(out.join("sev_status.rs"))
        .expect("writing sev_status.rs into OUT_DIR");
}

/// The ABI test (src/ffi/abi_check.rs) compares the committed C header's layouts and values with
/// the Rust definitions: bindgen reads include/pagenc.h as a C compiler would. Without the header
/// (a tree where it was deleted) the test fails and says so, the library still builds.
fn pagenc_h_bindings(out: &std::path::Path) {
    println!("cargo:rerun-if-changed=include/pagenc.h");
    println!("cargo::rustc-check-cfg=cfg(pagenc_header)");
    let header = "include/pagenc.h";
    if !std::path::Path::new(header).exists() {
        return;
    }
    bindgen::Builder::default()
        .header(header)
        .allowlist_type("pagenc_.*")
        .allowlist_var("PAGENC_.*")
        .default_enum_style(bindgen::EnumVariation::Consts)
        .prepend_enum_name(false)
        .layout_tests(false)
        .generate()
        .expect("bindgen could not read include/pagenc.h")
        .write_to_file(out.join("pagenc_h.rs"))
        .expect("writing pagenc_h.rs into OUT_DIR");
    println!("cargo:rustc-cfg=pagenc_header");
}
