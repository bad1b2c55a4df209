//! The ioctl-level entry point: `KVM_MEMORY_ENCRYPT_OP` on a VM fd, as a trait. The SEV
//! marshalling ([`super::sev`]) talks to nothing else, so the same code runs against the kernel
//! ([`KvmVm`]) and against the simulated firmware ([`super::simfw::SimFirmware`]).

use std::fmt;
use std::os::fd::RawFd;

use kvm_bindings::KVMIO;
use nix::errno::Errno;

use super::sev_abi::kvm_sev_cmd;

/// `KVM_MEMORY_ENCRYPT_OP` on one SEV VM: the kernel's `svm_mem_enc_op()` and the PSP firmware
/// behind it.
///
/// The result is what the ioctl returns: `Ok(())` for 0, `Err(errno)` for -1. In both cases
/// `cmd.error` holds the firmware status the kernel copied back (0 when the firmware was not
/// called, e.g. for a kernel-side `EINVAL`), and the command's argument structure (at
/// `cmd.data`) may have been written (lengths of a length query, the session length, the policy).
///
/// Implementations serialise commands as the kernel does (`kvm->lock`, then the PSP's single
/// command queue), so `&self` may be used from several threads at once.
pub trait MemoryEncryptOp: Send + Sync + fmt::Debug {
    /// Issues one command.
    ///
    /// # Safety
    /// `cmd.data` is the address of the live, initialised argument structure of command `cmd.id`
    /// (e.g. a `kvm_sev_send_update_data` for `KVM_SEV_SEND_UPDATE_DATA`), and every
    /// (address, length) pair in it that is non-zero names memory of this process that is valid
    /// for that length for the whole call: readable for inputs, writable for outputs. Guest
    /// addresses (`guest_uaddr`) must lie in the VM's guest RAM mappings.
    unsafe fn memory_encrypt_op(&self, cmd: &mut kvm_sev_cmd) -> Result<(), Errno>;

    /// What this is, for messages: "KVM" or "simulated SEV firmware".
    fn describe(&self) -> &'static str;
}

mod ioctls {
    use super::*;
    // KVM_MEMORY_ENCRYPT_OP = _IOWR(KVMIO, 0xba, unsigned long): the size in the number is that of
    // `unsigned long`, not of `struct kvm_sev_cmd`, so nix's typed macro cannot compute it.
    nix::ioctl_readwrite_bad!(
        kvm_memory_encrypt_op,
        nix::request_code_readwrite!(KVMIO, 0xba, std::mem::size_of::<std::ffi::c_ulong>()),
        kvm_sev_cmd
    );
}

/// The real entry point: `ioctl(vm_fd, KVM_MEMORY_ENCRYPT_OP, &cmd)` with `cmd.sev_fd` set to the
/// `/dev/sev` fd (the kernel uses it for the commands that create a guest context, e.g.
/// RECEIVE_START).
///
/// **Never run on SEV hardware**: this machine has no SEV (no `svm` flag, a paravirtual KVM),
/// so only its failure on a non-SEV VM (`ENOTTY`) is exercised here. See docs/transport.md.
#[derive(Debug)]
pub struct KvmVm {
    vm_fd: RawFd,
    sev_fd: RawFd,
}

impl KvmVm {
    /// Wraps an SEV VM's fd and the platform's `/dev/sev` fd. pagenc never closes either.
    ///
    /// # Safety
    /// Both fds stay open (and keep naming the same files) until this value is dropped.
    pub unsafe fn new(vm_fd: RawFd, sev_fd: RawFd) -> KvmVm {
        KvmVm { vm_fd, sev_fd }
    }
}

impl MemoryEncryptOp for KvmVm {
    unsafe fn memory_encrypt_op(&self, cmd: &mut kvm_sev_cmd) -> Result<(), Errno> {
        cmd.sev_fd = self.sev_fd as u32;
        // SAFETY: `cmd` is a live kvm_sev_cmd the kernel reads and writes back during the call;
        // the caller promises (this fn's contract) that `cmd.data` and every address in the
        // structure it points to are valid, which is what the kernel's copy_{from,to}_user and
        // page pinning need. A bad fd only makes the ioctl fail (EBADF/ENOTTY).
        unsafe { ioctls::kvm_memory_encrypt_op(self.vm_fd, cmd) }.map(drop)
    }

    fn describe(&self) -> &'static str {
        "KVM"
    }
}
