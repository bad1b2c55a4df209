//! Bexit: the round trip of a real KVM exit to user space, measured on this machine.
//!
//! A guest hypercall (VMMCALL) is what pagenc handles, but on some hosts it never exits (this
//! dev box's nested PVM /dev/kvm livelocks the vCPU on it; see machine-facts.md section 1), so the
//! bench times the two exits that do work everywhere: a port write (`out dx, al`) and a WRMSR to
//! an MSR the VMM filters to user space. Both take the same path as a hypercall exit (guest trap
//! -> KVM -> return from the KVM_RUN ioctl -> user space -> KVM_RUN again). Each KVM_RUN is
//! bounded by an alarm, so a host where even these hang costs seconds, not the run.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use kvm_bindings::{
    kvm_enable_cap, kvm_msr_filter, kvm_regs, kvm_run, kvm_sregs, kvm_userspace_memory_region,
    KVMIO, KVM_CAP_X86_USER_SPACE_MSR, KVM_EXIT_IO, KVM_EXIT_X86_WRMSR, KVM_MSR_EXIT_REASON_FILTER,
    KVM_MSR_FILTER_DEFAULT_ALLOW, KVM_MSR_FILTER_READ, KVM_MSR_FILTER_WRITE,
};

/// KVM_GET_VCPU_MMAP_SIZE and KVM_RUN fail with EINVAL unless their unused argument is 0, so they
/// are declared with an explicit integer argument (nix's `ioctl_none!` leaves it undefined).
mod ioctls {
    use super::*;
    nix::ioctl_write_int_bad!(create_vm, nix::request_code_none!(KVMIO, 0x01));
    nix::ioctl_write_int_bad!(vcpu_mmap_size, nix::request_code_none!(KVMIO, 0x04));
    nix::ioctl_write_int_bad!(create_vcpu, nix::request_code_none!(KVMIO, 0x41));
    nix::ioctl_write_ptr!(set_memory, KVMIO, 0x46, kvm_userspace_memory_region);
    nix::ioctl_write_int_bad!(set_tss_addr, nix::request_code_none!(KVMIO, 0x47));
    nix::ioctl_write_int_bad!(run, nix::request_code_none!(KVMIO, 0x80));
    nix::ioctl_write_ptr!(set_regs, KVMIO, 0x82, kvm_regs);
    nix::ioctl_read!(get_sregs, KVMIO, 0x83, kvm_sregs);
    nix::ioctl_write_ptr!(set_sregs, KVMIO, 0x84, kvm_sregs);
    nix::ioctl_write_ptr!(enable_cap, KVMIO, 0xa3, kvm_enable_cap);
    nix::ioctl_write_ptr!(set_msr_filter, KVMIO, 0xc6, kvm_msr_filter);
}

const MSR_KVM_MIGRATION_CONTROL: u32 = 0x4b56_4d08;
const MEM_SIZE: usize = 2 << 20;

/// Which exit the guest loops on.
#[derive(Clone, Copy, Debug)]
pub enum ExitKind {
    Pio,
    Wrmsr,
}

/// The measured round trips, in TSC cycles, one per KVM_RUN.
pub struct ExitSamples {
    pub kind: ExitKind,
    pub cycles: Vec<u64>,
}

extern "C" fn on_alarm(_: libc::c_int) {}

struct Mem(*mut libc::c_void);
impl Drop for Mem {
    fn drop(&mut self) {
        // SAFETY: self.0 came from a successful mmap of MEM_SIZE bytes and is unmapped once.
        unsafe { libc::munmap(self.0, MEM_SIZE) };
    }
}

fn err(what: &str, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}")
}

/// Runs a 1-vCPU real-mode guest that loops on `kind` for up to `iters` exits or `budget_s`
/// seconds, and returns the cycles of each KVM_RUN round trip.
pub fn measure(kind: ExitKind, iters: usize, budget_s: f64) -> Result<ExitSamples, String> {
    let kvm: OwnedFd = File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| err("open /dev/kvm", e))?
        .into();
    // SAFETY: KVM_CREATE_VM takes the VM type by value; the fd is valid for the call.
    let vm =
        unsafe { ioctls::create_vm(kvm.as_raw_fd(), 0) }.map_err(|e| err("KVM_CREATE_VM", e))?;
    // SAFETY: the kernel returned a fresh fd that nothing else owns.
    let vm = unsafe { OwnedFd::from_raw_fd(vm) };
    // SAFETY: KVM_SET_TSS_ADDR takes an address by value (three pages well above the guest RAM).
    unsafe { ioctls::set_tss_addr(vm.as_raw_fd(), 0x3000_0000) }
        .map_err(|e| err("KVM_SET_TSS_ADDR", e))?;

    // SAFETY: an anonymous private mapping; the result is checked before use.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            MEM_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if mem == libc::MAP_FAILED {
        return Err("mmap of guest memory failed".into());
    }
    let mem = Mem(mem);
    let code: &[u8] = match kind {
        ExitKind::Pio => &[0xee, 0xeb, 0xfd], // out dx, al; jmp back to the out
        ExitKind::Wrmsr => &[0x0f, 0x30, 0xeb, 0xfc], // wrmsr; jmp back to the wrmsr
    };
    // SAFETY: the mapping is MEM_SIZE bytes, the code goes at 0x1000, well inside it, and
    // nothing else references the memory yet.
    unsafe {
        std::ptr::copy_nonoverlapping(code.as_ptr(), (mem.0 as *mut u8).add(0x1000), code.len())
    };
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: mem.0 as u64,
    };
    // SAFETY: the region points at our live mapping. On success the VM is closed before the
    // mapping goes; on an early error no vCPU ever ran, so KVM never touches the memory.
    unsafe { ioctls::set_memory(vm.as_raw_fd(), &region) }
        .map_err(|e| err("KVM_SET_USER_MEMORY_REGION", e))?;

    if let ExitKind::Wrmsr = kind {
        let cap = kvm_enable_cap {
            cap: KVM_CAP_X86_USER_SPACE_MSR,
            args: [KVM_MSR_EXIT_REASON_FILTER as u64, 0, 0, 0],
            ..Default::default()
        };
        // SAFETY: cap is a valid kvm_enable_cap that lives across the call.
        unsafe { ioctls::enable_cap(vm.as_raw_fd(), &cap) }
            .map_err(|e| err("KVM_ENABLE_CAP(USER_SPACE_MSR)", e))?;
        let mut deny: u8 = 0;
        let mut filter = kvm_msr_filter {
            flags: KVM_MSR_FILTER_DEFAULT_ALLOW,
            ..Default::default()
        };
        filter.ranges[0].flags = KVM_MSR_FILTER_READ | KVM_MSR_FILTER_WRITE;
        filter.ranges[0].nmsrs = 1;
        filter.ranges[0].base = MSR_KVM_MIGRATION_CONTROL;
        filter.ranges[0].bitmap = &mut deny;
        // SAFETY: filter and the one-byte bitmap it points at live across the call; the kernel
        // copies both.
        unsafe { ioctls::set_msr_filter(vm.as_raw_fd(), &filter) }
            .map_err(|e| err("KVM_X86_SET_MSR_FILTER", e))?;
    }

    // SAFETY: KVM_CREATE_VCPU takes the vCPU id by value.
    let vcpu =
        unsafe { ioctls::create_vcpu(vm.as_raw_fd(), 0) }.map_err(|e| err("KVM_CREATE_VCPU", e))?;
    // SAFETY: fresh fd owned by nobody else.
    let vcpu = unsafe { OwnedFd::from_raw_fd(vcpu) };
    // SAFETY: KVM_GET_VCPU_MMAP_SIZE takes no argument.
    let run_size = unsafe { ioctls::vcpu_mmap_size(kvm.as_raw_fd(), 0) }
        .map_err(|e| err("KVM_GET_VCPU_MMAP_SIZE", e))? as usize;
    if run_size < std::mem::size_of::<kvm_run>() {
        return Err(format!(
            "kvm_run mmap size {run_size} is smaller than struct kvm_run"
        ));
    }
    // SAFETY: maps the vCPU's kvm_run area as KVM documents; checked below.
    let run_ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            run_size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            vcpu.as_raw_fd(),
            0,
        )
    };
    if run_ptr == libc::MAP_FAILED {
        return Err("mmap of kvm_run failed".into());
    }
    let run = run_ptr as *mut kvm_run;

    let mut sregs = kvm_sregs::default();
    // SAFETY: sregs is a valid out-buffer for KVM_GET_SREGS.
    unsafe { ioctls::get_sregs(vcpu.as_raw_fd(), &mut sregs) }
        .map_err(|e| err("KVM_GET_SREGS", e))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    // SAFETY: sregs is a valid kvm_sregs.
    unsafe { ioctls::set_sregs(vcpu.as_raw_fd(), &sregs) }.map_err(|e| err("KVM_SET_SREGS", e))?;
    let regs = kvm_regs {
        rip: 0x1000,
        rflags: 2,
        rdx: 0x3f8,
        rcx: MSR_KVM_MIGRATION_CONTROL as u64,
        rax: 1,
        ..Default::default()
    };
    // SAFETY: regs is a valid kvm_regs.
    unsafe { ioctls::set_regs(vcpu.as_raw_fd(), &regs) }.map_err(|e| err("KVM_SET_REGS", e))?;

    // A no-op SIGALRM handler without SA_RESTART turns a hung KVM_RUN into EINTR.
    // SAFETY: sigaction with a zeroed struct, an extern "C" handler and an empty mask.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_alarm as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGALRM, &sa, std::ptr::null_mut());
        libc::alarm((budget_s.ceil() as u32) + 3);
    }
    let mut cycles = Vec::with_capacity(iters);
    let t0 = std::time::Instant::now();
    let mut result = Ok(());
    for i in 0..iters {
        let a = crate::common::rdtsc();
        // SAFETY: KVM_RUN on our vCPU fd; kvm_run is mapped above.
        let r = unsafe { ioctls::run(vcpu.as_raw_fd(), 0) };
        let b = crate::common::rdtsc();
        if let Err(e) = r {
            result = Err(err("KVM_RUN", e));
            break;
        }
        // SAFETY: run points at the live kvm_run mapping; KVM filled exit_reason and the union
        // member for that reason before returning.
        let reason = unsafe { (*run).exit_reason };
        match (kind, reason) {
            (ExitKind::Pio, KVM_EXIT_IO) => {}
            (ExitKind::Wrmsr, KVM_EXIT_X86_WRMSR) => {
                // SAFETY: as above; msr is the active member for a WRMSR exit, and error = 0
                // tells KVM the write succeeded.
                unsafe { (*run).__bindgen_anon_1.msr.error = 0 };
            }
            _ => {
                result = Err(format!("unexpected exit reason {reason} for {kind:?}"));
                break;
            }
        }
        if i > 0 {
            // The first run includes vCPU start-up.
            cycles.push(b - a);
        }
        if t0.elapsed().as_secs_f64() > budget_s {
            break;
        }
    }
    // SAFETY: cancel the pending alarm and unmap kvm_run, which nothing references any more.
    unsafe {
        libc::alarm(0);
        libc::munmap(run_ptr, run_size);
    }
    drop(vcpu);
    drop(vm);
    drop(mem);
    result?;
    if cycles.is_empty() {
        return Err("no exit completed".into());
    }
    Ok(ExitSamples { kind, cycles })
}
