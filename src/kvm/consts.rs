//! KVM ABI constants. Everything here comes from the kernel's uapi headers (through bindgen,
//! see build.rs) or from kvm-bindings; the one exception is documented where it is defined.

#![allow(non_upper_case_globals, dead_code, missing_docs)]

mod generated {
    include!(concat!(env!("OUT_DIR"), "/kvm_consts.rs"));
}

pub use generated::{
    KVM_EINVAL, KVM_ENOSYS, KVM_EPERM, KVM_FEATURE_HC_MAP_GPA_RANGE, KVM_FEATURE_MIGRATION_CONTROL,
    KVM_HC_MAP_GPA_RANGE, KVM_MAP_GPA_RANGE_ENCRYPTED, KVM_MAP_GPA_RANGE_PAGE_SZ_1G,
    KVM_MAP_GPA_RANGE_PAGE_SZ_2M, KVM_MAP_GPA_RANGE_PAGE_SZ_4K, KVM_MIGRATION_READY,
    MSR_KVM_MIGRATION_CONTROL,
};
pub use kvm_bindings::{
    KVM_CAP_EXIT_HYPERCALL, KVM_CAP_X86_USER_SPACE_MSR, KVM_EXIT_HYPERCALL, KVM_EXIT_X86_RDMSR,
    KVM_EXIT_X86_WRMSR, KVM_MSR_EXIT_REASON_FILTER,
};

/// `KVM_EXIT_HYPERCALL_LONG_MODE` (`arch/x86/include/uapi/asm/kvm.h`, Linux 6.5+): bit 0 of
/// `kvm_run.hypercall.flags`, set when the guest made the call in 64-bit mode. Neither
/// kvm-bindings 0.14.2 nor this machine's linux-libc-dev 6.1 headers define it (6.1 still has the
/// `longmode`/`pad` pair whose bit 0 means the same), so it is the one constant defined here.
pub const KVM_EXIT_HYPERCALL_LONG_MODE: u64 = 1 << 0;

/// The CPUID leaf whose EAX carries the KVM paravirt feature bits (`KVM_CPUID_FEATURES`).
pub const KVM_CPUID_FEATURES_LEAF: u32 = generated::KVM_CPUID_FEATURES;
