//! The KVM set-up helpers for a VMM that wants pagenc to do its KVM plumbing. No tracker: they
//! work on the VM fd.

use std::ffi::c_int;
use std::os::fd::BorrowedFd;

use super::error::{pagenc_result, ArgError, Error};
use crate::kvm::{cpuid_feature_bits, enable_exit_hypercall, VmError};

/// Makes `KVM_HC_MAP_GPA_RANGE` exit to user space on the VM `vm_fd`: enables
/// `KVM_CAP_EXIT_HYPERCALL` with `existing_mask | (1 << 12)` and writes that mask to
/// `*enabled_mask` (nullable). `KVM_ENABLE_CAP` *replaces* the mask, so pass every hypercall bit
/// the VMM already has enabled in `existing_mask` (0 if none), and remember the result.
///
/// Returns `PAGENC_RESULT_OK`; `PAGENC_RESULT_UNSUPPORTED` if the kernel cannot exit on
/// MAP_GPA_RANGE (Linux < 5.14); `PAGENC_RESULT_INVALID_ARGUMENT` if `existing_mask` has bits
/// the kernel does not support or `vm_fd` is negative; `PAGENC_RESULT_KVM_ERROR` if an ioctl
/// failed. `*err` (nullable) is always written: the errno of the failed ioctl, or 0.
/// `*enabled_mask` is written only on success. pagenc does not keep or close `vm_fd`. Any
/// thread.
///
/// Set-up order: enable this before advertising `pagenc_kvm_cpuid_features()` to the guest.
///
/// # Safety
/// `vm_fd` is an open file descriptor for the whole call (any fd: a non-KVM fd just fails);
/// `enabled_mask` and `err` are NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn pagenc_kvm_enable_exit_hypercall(
    vm_fd: c_int,
    existing_mask: u64,
    enabled_mask: *mut u64,
    err: *mut c_int,
) -> pagenc_result {
    let err = std::ptr::NonNull::new(err);
    let set_err = |e: c_int| {
        if let Some(p) = err {
            // SAFETY: the contract: a non-NULL `err` is writable.
            unsafe { p.as_ptr().write(e) };
        }
    };
    set_err(0);
    ffi_boundary! {
        if vm_fd < 0 {
            return Error::from(ArgError::Fd { fd: vm_fd }).code();
        }
        // SAFETY: the contract: `vm_fd` is open for the whole call, and it is not -1.
        let fd = unsafe { BorrowedFd::borrow_raw(vm_fd) };
        match enable_exit_hypercall(fd, existing_mask) {
            Ok(mask) => {
                if let Some(p) = std::ptr::NonNull::new(enabled_mask) {
                    // SAFETY: the contract: a non-NULL `enabled_mask` is writable.
                    unsafe { p.as_ptr().write(mask) };
                }
                pagenc_result::Ok
            }
            Err(e) => {
                if let VmError::Ioctl { errno, .. } = e {
                    set_err(errno as c_int);
                }
                Error::from(e).code()
            }
        }
    }
}

/// The bits to OR into CPUID 0x40000001 (`KVM_CPUID_FEATURES`) EAX once the set-up is done:
/// `KVM_FEATURE_HC_MAP_GPA_RANGE` (bit 16) and `KVM_FEATURE_MIGRATION_CONTROL` (bit 17), i.e.
/// 0x30000. KVM never reports them itself: both are implemented by user space. Any thread.
#[no_mangle]
pub extern "C" fn pagenc_kvm_cpuid_features() -> u32 {
    ffi_boundary! {
        cpuid_feature_bits()
    }
}
