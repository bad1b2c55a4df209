//! Shared by tests/kvm_*.rs: opening /dev/kvm (or skipping), and the raw KVM ioctls the tests
//! need beyond what `pagenc::kvm::vm` offers (creating VMs and vCPUs, memory, registers, KVM_RUN).
//! Ioctl numbers are computed with nix from kvm-bindings' KVMIO, as kvm-ioctls does.

#![allow(dead_code)]

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

use kvm_bindings::{kvm_regs, kvm_run, kvm_sregs, kvm_userspace_memory_region, KVMIO};

pub mod ioctls {
    use super::*;
    nix::ioctl_write_int_bad!(kvm_create_vm, nix::request_code_none!(KVMIO, 0x01));
    // KVM refuses KVM_GET_VCPU_MMAP_SIZE and KVM_RUN with EINVAL unless the (unused) argument is
    // 0, so they are declared with an int argument and called with 0: ioctl_none! would leave
    // whatever is in the third argument register.
    nix::ioctl_write_int_bad!(kvm_get_vcpu_mmap_size, nix::request_code_none!(KVMIO, 0x04));
    nix::ioctl_write_int_bad!(kvm_create_vcpu, nix::request_code_none!(KVMIO, 0x41));
    nix::ioctl_write_ptr!(
        kvm_set_user_memory_region,
        KVMIO,
        0x46,
        kvm_userspace_memory_region
    );
    nix::ioctl_write_int_bad!(kvm_run_ioctl, nix::request_code_none!(KVMIO, 0x80));
    nix::ioctl_read!(kvm_get_regs, KVMIO, 0x81, kvm_regs);
    nix::ioctl_write_ptr!(kvm_set_regs, KVMIO, 0x82, kvm_regs);
    nix::ioctl_read!(kvm_get_sregs, KVMIO, 0x83, kvm_sregs);
    nix::ioctl_write_ptr!(kvm_set_sregs, KVMIO, 0x84, kvm_sregs);
}

/// Writes straight to the process's stderr, past the test harness's output capture, so that a
/// skip is visible in a plain `cargo test` run.
pub fn say(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

/// Whether PAGENC_REQUIRE_KVM=1 (CI on a machine with /dev/kvm): then a missing /dev/kvm fails.
pub fn kvm_required() -> bool {
    std::env::var("PAGENC_REQUIRE_KVM").is_ok_and(|v| v == "1")
}

/// Opens /dev/kvm. Where it cannot be opened, says so and returns None (the caller skips), or
/// panics when PAGENC_REQUIRE_KVM=1.
pub fn open_kvm(test: &str) -> Option<OwnedFd> {
    match File::options().read(true).write(true).open("/dev/kvm") {
        Ok(f) => Some(f.into()),
        Err(e) => {
            assert!(
                !kvm_required(),
                "{test}: /dev/kvm cannot be opened ({e}) and PAGENC_REQUIRE_KVM=1"
            );
            say(&format!(
                "SKIP {test}: /dev/kvm cannot be opened ({e}); set PAGENC_REQUIRE_KVM=1 to make \
                 this a failure"
            ));
            None
        }
    }
}

/// KVM_CREATE_VM (type 0, the default x86 VM) on the /dev/kvm fd.
pub fn create_vm(kvm: BorrowedFd<'_>) -> OwnedFd {
    // SAFETY: KVM_CREATE_VM takes the VM type by value and returns a new fd, or an error.
    let fd = unsafe { ioctls::kvm_create_vm(kvm.as_raw_fd(), 0) }.expect("KVM_CREATE_VM");
    // SAFETY: on success KVM_CREATE_VM returned a new fd that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// KVM_GET_VCPU_MMAP_SIZE on the /dev/kvm fd: the size of a vCPU's kvm_run mapping.
pub fn vcpu_mmap_size(kvm: BorrowedFd<'_>) -> usize {
    // SAFETY: KVM_GET_VCPU_MMAP_SIZE takes no argument and returns a size.
    let size = unsafe { ioctls::kvm_get_vcpu_mmap_size(kvm.as_raw_fd(), 0) }
        .expect("KVM_GET_VCPU_MMAP_SIZE");
    usize::try_from(size).expect("a positive size")
}

/// An anonymous, zeroed, page-aligned mapping (guest RAM, or a stand-in kvm_run of the size the
/// kernel reports), or the kvm_run mapping of a vCPU fd. Unmapped on drop.
pub struct Mapping {
    pub ptr: NonNull<u8>,
    pub len: usize,
}

impl Mapping {
    pub fn anonymous(len: usize) -> Mapping {
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap of {len} bytes");
        Mapping {
            ptr: NonNull::new(p.cast()).expect("mmap returned non-null"),
            len,
        }
    }

    /// Maps a vCPU's kvm_run (KVM_GET_VCPU_MMAP_SIZE bytes of the vCPU fd, offset 0).
    pub fn vcpu_run(vcpu: BorrowedFd<'_>, len: usize) -> Mapping {
        // SAFETY: a fresh shared mapping of the vCPU fd, which KVM allows at offset 0 for
        // KVM_GET_VCPU_MMAP_SIZE bytes; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap of the vCPU's kvm_run");
        Mapping {
            ptr: NonNull::new(p.cast()).expect("mmap returned non-null"),
            len,
        }
    }

    pub fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `len` readable and writable bytes and lives as long as self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The mapping seen as a `struct kvm_run` (it is at least that large and page aligned).
    pub fn run(&mut self) -> &mut kvm_run {
        assert!(self.len >= std::mem::size_of::<kvm_run>());
        // SAFETY: the mapping is page aligned (more than kvm_run's alignment), large enough,
        // initialised (zero or written by KVM), and every bit pattern is a valid kvm_run (plain
        // integers and unions of them). The &mut borrows self, so there is no other Rust alias.
        unsafe { &mut *self.ptr.as_ptr().cast::<kvm_run>() }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping this value created; no reference into it outlives
        // self (they all borrow self).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A VM with one memslot of guest RAM at GPA 0 and one vCPU whose kvm_run is mapped.
pub struct TinyVm {
    pub vm: OwnedFd,
    pub vcpu: OwnedFd,
    pub ram: Mapping,
    pub run: Mapping,
}

impl TinyVm {
    pub fn new(kvm: BorrowedFd<'_>, ram_size: usize) -> TinyVm {
        let vm = create_vm(kvm);
        let mut ram = Mapping::anonymous(ram_size);
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: ram_size as u64,
            userspace_addr: ram.bytes().as_mut_ptr() as u64,
        };
        // SAFETY: `region` is a live kvm_userspace_memory_region; it points at `ram`, which is
        // owned by the returned TinyVm and is dropped after the VM fd (field order).
        unsafe { ioctls::kvm_set_user_memory_region(vm.as_raw_fd(), &region) }
            .expect("KVM_SET_USER_MEMORY_REGION");
        // KVM_SET_TSS_ADDR: needed by real mode on VMX, harmless elsewhere.
        // SAFETY: KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47) takes the address by value.
        let r = unsafe {
            libc::ioctl(
                vm.as_raw_fd(),
                nix::request_code_none!(KVMIO, 0x47) as _,
                0xfffb_d000 as libc::c_ulong,
            )
        };
        assert_eq!(
            r,
            0,
            "KVM_SET_TSS_ADDR: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: KVM_CREATE_VCPU takes the vCPU id by value and returns a new fd, or an error.
        let fd = unsafe { ioctls::kvm_create_vcpu(vm.as_raw_fd(), 0) }.expect("KVM_CREATE_VCPU");
        // SAFETY: on success KVM_CREATE_VCPU returned a new fd that nothing else owns.
        let vcpu = unsafe { OwnedFd::from_raw_fd(fd) };
        let run = Mapping::vcpu_run(vcpu.as_fd(), vcpu_mmap_size(kvm));
        TinyVm { vm, vcpu, ram, run }
    }

    /// Real mode, CS:IP = 0:`ip`, everything else flat at 0.
    pub fn set_real_mode(&self, ip: u64) {
        let mut sregs = kvm_sregs::default();
        // SAFETY: `sregs` is a live kvm_sregs the kernel fills.
        unsafe { ioctls::kvm_get_sregs(self.vcpu.as_raw_fd(), &mut sregs) }.expect("KVM_GET_SREGS");
        for seg in [
            &mut sregs.cs,
            &mut sregs.ds,
            &mut sregs.es,
            &mut sregs.fs,
            &mut sregs.gs,
            &mut sregs.ss,
        ] {
            seg.base = 0;
            seg.selector = 0;
        }
        // SAFETY: `sregs` is a live kvm_sregs the kernel reads.
        unsafe { ioctls::kvm_set_sregs(self.vcpu.as_raw_fd(), &sregs) }.expect("KVM_SET_SREGS");
        let regs = kvm_regs {
            rip: ip,
            rflags: 2,
            rsp: 0x8000,
            ..Default::default()
        };
        // SAFETY: `regs` is a live kvm_regs the kernel reads.
        unsafe { ioctls::kvm_set_regs(self.vcpu.as_raw_fd(), &regs) }.expect("KVM_SET_REGS");
    }

    /// 64-bit mode at `ip` with paging rooted at `pml4` (the caller writes the page tables),
    /// flat code and data segments: CR0.PE|PG, CR4.PAE, EFER.LME|LMA, CS.L.
    pub fn set_long_mode(&self, ip: u64, pml4: u64) {
        let mut sregs = kvm_sregs::default();
        // SAFETY: `sregs` is a live kvm_sregs the kernel fills.
        unsafe { ioctls::kvm_get_sregs(self.vcpu.as_raw_fd(), &mut sregs) }.expect("KVM_GET_SREGS");
        let code = kvm_bindings::kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: 0x8,
            type_: 11,
            present: 1,
            dpl: 0,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            ..Default::default()
        };
        let data = kvm_bindings::kvm_segment {
            selector: 0x10,
            type_: 3,
            db: 1,
            l: 0,
            ..code
        };
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.cr3 = pml4;
        sregs.cr4 |= 1 << 5; // PAE
        sregs.cr0 |= (1 << 0) | (1 << 4) | (1 << 31); // PE, ET, PG
        sregs.efer |= (1 << 8) | (1 << 10); // LME, LMA
                                            // SAFETY: `sregs` is a live kvm_sregs the kernel reads.
        unsafe { ioctls::kvm_set_sregs(self.vcpu.as_raw_fd(), &sregs) }.expect("KVM_SET_SREGS");
        let regs = kvm_regs {
            rip: ip,
            rflags: 2,
            ..Default::default()
        };
        // SAFETY: `regs` is a live kvm_regs the kernel reads.
        unsafe { ioctls::kvm_set_regs(self.vcpu.as_raw_fd(), &regs) }.expect("KVM_SET_REGS");
    }

    pub fn regs(&self) -> kvm_regs {
        let mut regs = kvm_regs::default();
        // SAFETY: `regs` is a live kvm_regs the kernel fills.
        unsafe { ioctls::kvm_get_regs(self.vcpu.as_raw_fd(), &mut regs) }.expect("KVM_GET_REGS");
        regs
    }

    /// One KVM_RUN. The caller bounds it (see [`Watchdog`]): EINTR comes back as an error.
    pub fn run_once(&self) -> nix::Result<()> {
        // SAFETY: KVM_RUN takes no argument; it writes the vCPU's kvm_run mapping, which this
        // TinyVm owns, and the guest RAM registered above, also owned here. No Rust reference
        // into either is live across this call (both are borrowed only through &mut self
        // methods, and this takes &self).
        unsafe { ioctls::kvm_run_ioctl(self.vcpu.as_raw_fd(), 0) }.map(drop)
    }
}

/// Bounds KVM_RUN on the current thread: after `secs` seconds a helper thread keeps sending it
/// SIGUSR1 (whose handler does nothing, installed without SA_RESTART), so a KVM_RUN that never
/// returns (this machine's VMMCALL livelock, or any guest bug) fails with EINTR instead of
/// hanging the test. Dropping the watchdog stops it.
pub struct Watchdog {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

extern "C" fn ignore_signal(_: libc::c_int) {}

impl Watchdog {
    pub fn new(secs: u64) -> Watchdog {
        use std::sync::atomic::{AtomicBool, Ordering};
        // SAFETY: installs a handler that does nothing (async-signal-safe) for SIGUSR1, with
        // sa_flags 0 so that an interrupted KVM_RUN returns EINTR rather than restarting.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = ignore_signal as *const () as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = 0;
            assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
        }
        // SAFETY: pthread_self has no preconditions.
        let target = unsafe { libc::pthread_self() };
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
            while !stop2.load(Ordering::SeqCst) {
                if std::time::Instant::now() >= deadline {
                    // SAFETY: `target` is the thread that created this watchdog; it joins this
                    // thread (in Drop) before it can exit, so the pthread_t is still valid.
                    unsafe { libc::pthread_kill(target, libc::SIGUSR1) };
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        });
        Watchdog {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
