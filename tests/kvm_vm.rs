//! `pagenc::kvm::vm` against the real /dev/kvm: capability masks, KVM_ENABLE_CAP, the MSR
//! filter, bad masks refused by pagenc's pre-check and by the kernel, bad fds.
//! Skips (saying so) where /dev/kvm is absent, fails then if PAGENC_REQUIRE_KVM=1.

mod kvm_common;

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use kvm_bindings::{
    KVM_CAP_EXIT_HYPERCALL, KVM_CAP_X86_USER_SPACE_MSR, KVM_MSR_EXIT_REASON_FILTER,
};
use kvm_common::{create_vm, open_kvm};
use nix::errno::Errno;
use pagenc::kvm::consts::{KVM_HC_MAP_GPA_RANGE, MSR_KVM_MIGRATION_CONTROL};
use pagenc::kvm::vm::{
    check_extension, cpuid_feature_bits, enable_cap, enable_exit_hypercall, enable_user_space_msr,
    set_migration_control_filter, supported_exit_hypercall_mask, VmError, MAP_GPA_RANGE_EXIT_BIT,
};

#[test]
fn constants_come_from_the_headers() {
    assert_eq!(KVM_CAP_EXIT_HYPERCALL, 201);
    assert_eq!(MAP_GPA_RANGE_EXIT_BIT, 1 << 12);
    assert_eq!(KVM_HC_MAP_GPA_RANGE, 12);
    // CPUID 0x40000001 EAX bits 16 (HC_MAP_GPA_RANGE) and 17 (MIGRATION_CONTROL).
    assert_eq!(cpuid_feature_bits(), (1 << 16) | (1 << 17));
}

#[test]
fn supported_mask_has_map_gpa_range() {
    let Some(kvm) = open_kvm("supported_mask_has_map_gpa_range") else {
        return;
    };
    let vm = create_vm(kvm.as_fd());
    let mask = supported_exit_hypercall_mask(vm.as_fd()).unwrap();
    // Linux 5.14+ reports exactly KVM_EXIT_HYPERCALL_VALID_MASK = 1 << KVM_HC_MAP_GPA_RANGE.
    assert_ne!(
        mask & MAP_GPA_RANGE_EXIT_BIT,
        0,
        "KVM_CHECK_EXTENSION(KVM_CAP_EXIT_HYPERCALL) = {mask:#x}"
    );
    // The system fd gives the same answer.
    assert_eq!(
        check_extension(kvm.as_fd(), KVM_CAP_EXIT_HYPERCALL).unwrap() as u64,
        mask
    );
}

#[test]
fn enable_exit_hypercall_ors_into_the_existing_mask() {
    let Some(kvm) = open_kvm("enable_exit_hypercall_ors_into_the_existing_mask") else {
        return;
    };
    let vm = create_vm(kvm.as_fd());
    assert_eq!(
        enable_exit_hypercall(vm.as_fd(), 0).unwrap(),
        MAP_GPA_RANGE_EXIT_BIT
    );
    // Again, with the bit already in the VMM's mask: same mask, still accepted.
    assert_eq!(
        enable_exit_hypercall(vm.as_fd(), MAP_GPA_RANGE_EXIT_BIT).unwrap(),
        MAP_GPA_RANGE_EXIT_BIT
    );
    // Every supported bit the VMM already uses is kept.
    let supported = supported_exit_hypercall_mask(vm.as_fd()).unwrap();
    assert_eq!(
        enable_exit_hypercall(vm.as_fd(), supported).unwrap(),
        supported
    );
}

/// The lowest hypercall-exit bit the kernel does not support.
fn unsupported_bit(supported: u64) -> u64 {
    let free = !supported;
    free & free.wrapping_neg()
}

#[test]
fn unsupported_existing_bits_are_refused_before_the_ioctl() {
    let Some(kvm) = open_kvm("unsupported_existing_bits_are_refused_before_the_ioctl") else {
        return;
    };
    let vm = create_vm(kvm.as_fd());
    let supported = supported_exit_hypercall_mask(vm.as_fd()).unwrap();
    for existing in [
        unsupported_bit(supported),
        1 << 1,
        1 << 63,
        u64::MAX,
        MAP_GPA_RANGE_EXIT_BIT | unsupported_bit(supported),
    ] {
        if existing & !supported == 0 {
            continue; // a kernel that supports it; nothing to refuse
        }
        let err = enable_exit_hypercall(vm.as_fd(), existing).unwrap_err();
        assert_eq!(
            err,
            VmError::UnsupportedHypercallBits {
                existing,
                supported
            }
        );
        assert_eq!(err.errno(), None, "refused by pagenc, not by the kernel");
        let msg = err.to_string();
        assert!(msg.contains(&format!("{existing:#x}")), "{msg}");
        assert!(msg.contains(&format!("{supported:#x}")), "{msg}");
    }
}

#[test]
fn the_kernel_itself_refuses_bits_outside_its_mask() {
    let Some(kvm) = open_kvm("the_kernel_itself_refuses_bits_outside_its_mask") else {
        return;
    };
    let vm = create_vm(kvm.as_fd());
    let supported = supported_exit_hypercall_mask(vm.as_fd()).unwrap();
    let bad = MAP_GPA_RANGE_EXIT_BIT | unsupported_bit(supported);
    // What pagenc's pre-check protects against: KVM_ENABLE_CAP says EINVAL.
    let err = enable_cap(
        vm.as_fd(),
        "KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL)",
        KVM_CAP_EXIT_HYPERCALL,
        [bad, 0, 0, 0],
    )
    .unwrap_err();
    assert_eq!(err.errno(), Some(Errno::EINVAL), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("KVM_CAP_EXIT_HYPERCALL"), "{msg}");
    assert!(msg.contains(&format!("{bad:#x}")), "{msg}");
    // And the good mask is still accepted afterwards.
    assert_eq!(
        enable_exit_hypercall(vm.as_fd(), 0).unwrap(),
        MAP_GPA_RANGE_EXIT_BIT
    );
}

#[test]
fn msr_filter_setup() {
    let Some(kvm) = open_kvm("msr_filter_setup") else {
        return;
    };
    let vm = create_vm(kvm.as_fd());
    assert_eq!(
        enable_user_space_msr(vm.as_fd(), 0).unwrap(),
        KVM_MSR_EXIT_REASON_FILTER
    );
    // The VMM's own reasons are kept (INVAL|UNKNOWN, as a VMM emulating unknown MSRs uses).
    assert_eq!(enable_user_space_msr(vm.as_fd(), 3).unwrap(), 7);
    // Reasons KVM does not know are refused before the ioctl...
    let err = enable_user_space_msr(vm.as_fd(), 1 << 3).unwrap_err();
    assert!(
        matches!(err, VmError::UnsupportedMsrExitReasons { existing: 8, .. }),
        "{err}"
    );
    assert_eq!(err.errno(), None);
    // ...and by the kernel.
    let err = enable_cap(
        vm.as_fd(),
        "KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR)",
        KVM_CAP_X86_USER_SPACE_MSR,
        [1 << 3, 0, 0, 0],
    )
    .unwrap_err();
    assert_eq!(err.errno(), Some(Errno::EINVAL), "{err}");
    set_migration_control_filter(vm.as_fd()).unwrap();
    // Installing it twice is allowed (the second replaces the first).
    set_migration_control_filter(vm.as_fd()).unwrap();
    let _ = MSR_KVM_MIGRATION_CONTROL;
}

/// A number far above any fd this process has open. It is only ever passed to ioctl(2), which
/// fails with EBADF; no memory is involved.
const NOT_AN_FD: i32 = 1 << 29;

fn bogus_fd() -> BorrowedFd<'static> {
    // SAFETY: nothing reads or closes the "fd": it is only handed to ioctl(2), where a number
    // that is not open gives EBADF. No I/O object is aliased.
    unsafe { BorrowedFd::borrow_raw(NOT_AN_FD) }
}

#[test]
fn a_bogus_fd_gives_ebadf() {
    // Needs no /dev/kvm: the kernel rejects the fd before KVM is involved.
    let fd = bogus_fd();
    let err = supported_exit_hypercall_mask(fd).unwrap_err();
    assert_eq!(err.errno(), Some(Errno::EBADF), "{err}");
    assert!(err.to_string().contains("KVM_CHECK_EXTENSION"), "{err}");
    assert!(
        err.to_string().contains("0xc9"),
        "the cap number 201: {err}"
    );
    let err = enable_exit_hypercall(fd, 0).unwrap_err();
    assert_eq!(err.errno(), Some(Errno::EBADF), "{err}");
    let err = enable_cap(fd, "KVM_ENABLE_CAP(test)", KVM_CAP_EXIT_HYPERCALL, [0; 4]).unwrap_err();
    assert_eq!(err.errno(), Some(Errno::EBADF), "{err}");
    let err = enable_user_space_msr(fd, 0).unwrap_err();
    assert_eq!(err.errno(), Some(Errno::EBADF), "{err}");
    let err = set_migration_control_filter(fd).unwrap_err();
    assert_eq!(err.errno(), Some(Errno::EBADF), "{err}");
}

#[test]
fn a_non_kvm_fd_gives_enotty() {
    let null = File::open("/dev/null").unwrap();
    let err = supported_exit_hypercall_mask(null.as_fd()).unwrap_err();
    assert_eq!(err.errno(), Some(Errno::ENOTTY), "{err}");
    let err = enable_exit_hypercall(null.as_fd(), 0).unwrap_err();
    assert_eq!(err.errno(), Some(Errno::ENOTTY), "{err}");
    assert!(null.as_raw_fd() >= 0);
}

#[test]
fn enable_cap_on_the_system_fd_is_refused_by_the_kernel() {
    let Some(kvm) = open_kvm("enable_cap_on_the_system_fd_is_refused_by_the_kernel") else {
        return;
    };
    // KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL) is VM-scoped: on /dev/kvm itself it fails.
    let err = enable_exit_hypercall(kvm.as_fd(), 0).unwrap_err();
    assert!(err.errno().is_some(), "{err}");
}

#[test]
fn refusals_say_what_and_which_value() {
    // A kernel without MAP_GPA_RANGE exits (before 5.14) reports mask 0.
    let e = VmError::MapGpaRangeUnsupported { supported: 0 };
    let msg = e.to_string();
    assert!(
        msg.contains("KVM_HC_MAP_GPA_RANGE") && msg.contains("0x1000"),
        "{msg}"
    );
    assert_eq!(e.errno(), None);
    let e = VmError::UnsupportedHypercallBits {
        existing: 0x1003,
        supported: 0x1000,
    };
    assert!(e.to_string().contains("bits 0x3"), "{e}");
    let e = VmError::Ioctl {
        op: "KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL)",
        value: 0x1001,
        errno: Errno::EINVAL,
    };
    let msg = e.to_string();
    assert!(msg.contains("0x1001") && msg.contains("(22)"), "{msg}");
    assert_eq!(e.errno(), Some(Errno::EINVAL));
}
