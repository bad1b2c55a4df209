//! `pagenc::kvm::run::handle_exit` on real `struct kvm_run` buffers (the kvm-bindings type, in
//! page-aligned mappings; also of the size KVM_GET_VCPU_MMAP_SIZE reports, and a real vCPU's
//! mapping, where /dev/kvm exists), filled the way KVM fills them before it exits.
//!
//! The guest's VMMCALL never reaches KVM_EXIT_HYPERCALL on this machine's PVM-based KVM (see
//! docs/testing.md), so the hypercall exit is produced here by writing what x86.c writes:
//! exit_reason, hypercall.nr, args[0..3], ret = 0 and flags; nothing else is touched.

mod kvm_common;

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_run, KVM_EXIT_HLT, KVM_EXIT_INTERNAL_ERROR, KVM_EXIT_IO, KVM_EXIT_MMIO, KVM_EXIT_SHUTDOWN,
    KVM_EXIT_UNKNOWN, KVM_MSR_EXIT_REASON_INVAL, KVM_MSR_EXIT_REASON_UNKNOWN,
};
use kvm_common::{open_kvm, vcpu_mmap_size, Mapping, TinyVm};
use pagenc::kvm::consts::{
    KVM_EXIT_HYPERCALL, KVM_EXIT_HYPERCALL_LONG_MODE, KVM_EXIT_X86_RDMSR, KVM_EXIT_X86_WRMSR,
    KVM_HC_MAP_GPA_RANGE, KVM_MSR_EXIT_REASON_FILTER, MSR_KVM_MIGRATION_CONTROL,
};
use pagenc::kvm::run::{handle_exit, handle_exit_detailed, ExitError, ExitOutcome};
use pagenc::tracker::TrackerError;
use pagenc::{Layout, PageRange, PageState, RamRange, RejectReason, Tracker};

const NR: u64 = KVM_HC_MAP_GPA_RANGE as u64;
const ENCRYPTED: u64 = 0x10;
const EINVAL: u64 = (-22i64) as u64;
const ENOSYS: u64 = (-1000i64) as u64;
const GIB: u64 = 1 << 30;

/// 3 GiB below the PCI hole and 1 GiB above 4 GiB, as QEMU's q35 lays out a 4 GiB guest.
fn tracker() -> Tracker {
    Tracker::new(
        Layout::new(&[
            RamRange {
                gpa: 0,
                size: 3 * GIB,
            },
            RamRange {
                gpa: 4 * GIB,
                size: GIB,
            },
        ])
        .unwrap(),
    )
}

/// A stand-in kvm_run: a page-aligned mapping at least as large as `struct kvm_run`, first
/// filled with `fill` to show that nothing depends on bytes KVM does not write.
fn buffer(fill: u8) -> Mapping {
    let mut m = Mapping::anonymous(std::mem::size_of::<kvm_run>());
    m.bytes().fill(fill);
    m
}

/// What x86.c writes for a MAP_GPA_RANGE exit (`____kvm_emulate_hypercall`).
fn fill_hypercall(run: &mut kvm_run, nr: u64, args: [u64; 3], flags: u64) {
    run.exit_reason = KVM_EXIT_HYPERCALL;
    // SAFETY: writing the `hypercall` member, which the exit_reason just written selects.
    let hc = unsafe { &mut run.__bindgen_anon_1.hypercall };
    hc.nr = nr;
    hc.ret = 0;
    hc.args[..3].copy_from_slice(&args);
    hc.__bindgen_anon_1.flags = flags;
}

fn hypercall_ret(run: &kvm_run) -> u64 {
    // SAFETY: the test filled the `hypercall` member.
    unsafe { run.__bindgen_anon_1.hypercall.ret }
}

/// What `kvm_msr_user_space()` writes: exit_reason, msr.reason, index, data; error and pad
/// zeroed.
fn fill_msr(run: &mut kvm_run, exit_reason: u32, reason: u32, index: u32, data: u64) {
    run.exit_reason = exit_reason;
    // SAFETY: writing the `msr` member, which the exit_reason just written selects.
    let msr = unsafe { &mut run.__bindgen_anon_1.msr };
    msr.error = 0;
    msr.pad = [0; 7];
    msr.reason = reason;
    msr.index = index;
    msr.data = data;
}

/// (error, data) of the `msr` member.
fn msr_answer(run: &kvm_run) -> (u8, u64) {
    // SAFETY: the test filled the `msr` member.
    let msr = unsafe { &run.__bindgen_anon_1.msr };
    (msr.error, msr.data)
}

fn call(t: &Tracker, m: &mut Mapping, nr: u64, args: [u64; 3], flags: u64) -> ExitOutcome {
    fill_hypercall(m.run(), nr, args, flags);
    let out = handle_exit(t, m.run()).unwrap();
    match out {
        ExitOutcome::Hypercall { ret, .. } => assert_eq!(hypercall_ret(m.run()), ret),
        other => panic!("expected a hypercall outcome, got {other:?}"),
    }
    out
}

fn accepted() -> ExitOutcome {
    ExitOutcome::Hypercall {
        ret: 0,
        rejected: false,
    }
}

fn rejected(ret: u64) -> ExitOutcome {
    ExitOutcome::Hypercall {
        ret,
        rejected: true,
    }
}

#[test]
fn map_gpa_range_updates_the_map_and_writes_ret() {
    let t = tracker();
    for fill in [0x00, 0xa5] {
        let mut m = buffer(fill);
        t.reset().unwrap();
        // Shared: 4 pages at 64 KiB, 4K hint, 64-bit guest.
        assert_eq!(
            call(
                &t,
                &mut m,
                NR,
                [0x10000, 4, 0],
                KVM_EXIT_HYPERCALL_LONG_MODE
            ),
            accepted()
        );
        assert_eq!(t.state(0x10000).unwrap(), PageState::Shared);
        assert_eq!(t.state(0x13fff).unwrap(), PageState::Shared);
        assert_eq!(t.state(0x14000).unwrap(), PageState::Encrypted);
        // The 2M and 1G hints are accepted and never decide alignment.
        call(
            &t,
            &mut m,
            NR,
            [0x14000, 1, 1],
            KVM_EXIT_HYPERCALL_LONG_MODE,
        );
        call(
            &t,
            &mut m,
            NR,
            [0x15000, 1, 2],
            KVM_EXIT_HYPERCALL_LONG_MODE,
        );
        assert_eq!(
            t.shared_ranges().unwrap(),
            vec![PageRange {
                start: 0x10,
                end: 0x16
            }]
        );
        // Encrypted again: splits the range.
        assert_eq!(
            call(
                &t,
                &mut m,
                NR,
                [0x12000, 1, ENCRYPTED],
                KVM_EXIT_HYPERCALL_LONG_MODE
            ),
            accepted()
        );
        assert_eq!(
            t.shared_ranges().unwrap(),
            vec![
                PageRange {
                    start: 0x10,
                    end: 0x12
                },
                PageRange {
                    start: 0x13,
                    end: 0x16
                }
            ]
        );
        // Outside RAM (the PCI hole, past the end): accepted, not stored.
        call(&t, &mut m, NR, [3 * GIB, 1 << 18, 0], 1);
        call(&t, &mut m, NR, [(1 << 52) - 4096, 1, 0], 1);
        assert_eq!(t.shared_ranges().unwrap().len(), 2);
        // The bytes next to `ret` are as KVM left them.
        // SAFETY: the hypercall member was filled above.
        let hc = unsafe { m.run().__bindgen_anon_1.hypercall };
        assert_eq!(hc.args[3..], [u64::from_ne_bytes([fill; 8]); 3]);
    }
}

#[test]
fn ret_is_written_even_when_kvm_left_garbage_there() {
    // KVM pre-sets ret = 0, but a handler that relied on that would pass a refused call off as
    // success, so make sure both outcomes are written over whatever was there.
    let t = tracker();
    let mut m = buffer(0);
    for (args, want) in [([0x1000, 1, 0], 0), ([0x1001, 1, 0], EINVAL)] {
        fill_hypercall(m.run(), NR, args, 1);
        // (Assigning to a union field is safe: it reads nothing.)
        m.run().__bindgen_anon_1.hypercall.ret = 0xdead_beef;
        handle_exit(&t, m.run()).unwrap();
        assert_eq!(hypercall_ret(m.run()), want);
    }
}

#[test]
fn every_rejection_writes_its_code_and_changes_nothing() {
    let t = tracker();
    let mut m = buffer(0);
    call(&t, &mut m, NR, [0x100000, 16, 0], 1);
    let before = t.shared_ranges().unwrap();
    let stats_before = t.stats().unwrap();
    let cases: &[(&str, u64, [u64; 3], u64, RejectReason)] = &[
        (
            "nr 1",
            1,
            [0x200000, 1, 0],
            ENOSYS,
            RejectReason::UnknownHypercall,
        ),
        (
            "nr 0",
            0,
            [0x200000, 1, 0],
            ENOSYS,
            RejectReason::UnknownHypercall,
        ),
        (
            "nr 13",
            13,
            [0x200000, 1, 0],
            ENOSYS,
            RejectReason::UnknownHypercall,
        ),
        (
            "unaligned",
            NR,
            [0x200001, 1, 0],
            EINVAL,
            RejectReason::Unaligned,
        ),
        (
            "unaligned 0x800",
            NR,
            [0x200800, 1, 0],
            EINVAL,
            RejectReason::Unaligned,
        ),
        (
            "npages 0",
            NR,
            [0x200000, 0, 0],
            EINVAL,
            RejectReason::ZeroLength,
        ),
        (
            "gfn wraps",
            NR,
            [!0xfff, 2, 0],
            EINVAL,
            RejectReason::OutOfRange,
        ),
        (
            "npages max",
            NR,
            [0x1000, u64::MAX, 0],
            EINVAL,
            RejectReason::OutOfRange,
        ),
        (
            "ends past 52 bits",
            NR,
            [(1 << 52) - 4096, 2, 0],
            EINVAL,
            RejectReason::OutOfRange,
        ),
        (
            "starts at 2^52",
            NR,
            [1 << 52, 1, 0],
            EINVAL,
            RejectReason::OutOfRange,
        ),
        (
            "attrs bit 5",
            NR,
            [0x200000, 1, 1 << 5],
            EINVAL,
            RejectReason::ReservedAttrs,
        ),
        (
            "attrs bit 63",
            NR,
            [0x200000, 1, 1 << 63],
            EINVAL,
            RejectReason::ReservedAttrs,
        ),
        (
            "hint 3",
            NR,
            [0x200000, 1, 3],
            EINVAL,
            RejectReason::BadPageSizeHint,
        ),
        (
            "hint 0xf",
            NR,
            [0x200000, 1, 0xf],
            EINVAL,
            RejectReason::BadPageSizeHint,
        ),
        (
            "hint 3, encrypted",
            NR,
            [0x100000, 1, 3 | ENCRYPTED],
            EINVAL,
            RejectReason::BadPageSizeHint,
        ),
    ];
    for (i, &(what, nr, args, want, reason)) in cases.iter().enumerate() {
        assert_eq!(call(&t, &mut m, nr, args, 1), rejected(want), "{what}");
        assert_eq!(t.shared_ranges().unwrap(), before, "{what}: map changed");
        let s = t.stats().unwrap();
        assert!(
            s.rejected[reason as usize] > stats_before.rejected[reason as usize],
            "{what}: not counted as {reason:?}"
        );
        assert_eq!(
            s.rejected.iter().sum::<u64>(),
            stats_before.rejected.iter().sum::<u64>() + i as u64 + 1
        );
    }
    // The page that "hint 3, encrypted" named is still shared.
    assert_eq!(t.state(0x100000).unwrap(), PageState::Shared);
}

#[test]
fn a_32_bit_guest() {
    let t = tracker();
    let mut m = buffer(0x5a);
    // flags 0: the call came from a 32-bit guest. KVM already truncated the registers;
    // handle_exit takes them as 32-bit values too.
    assert_eq!(call(&t, &mut m, NR, [0x3000, 2, 0], 0), accepted());
    assert_eq!(t.state(0x3000).unwrap(), PageState::Shared);
    assert_eq!(call(&t, &mut m, NR, [0x3001, 1, 0], 0), rejected(EINVAL));
    assert_eq!(call(&t, &mut m, 2, [0x3000, 1, 0], 0), rejected(ENOSYS));
    // Upper halves that a 32-bit guest cannot have set are ignored, as KVM ignores them.
    assert_eq!(
        call(
            &t,
            &mut m,
            NR | 0xffff_ffff_0000_0000,
            [0x1_0000_4000, 0x1_0000_0001, 0x1_0000_0010],
            0
        ),
        accepted()
    );
    assert_eq!(t.state(0x4000).unwrap(), PageState::Encrypted);
    assert_eq!(t.state(0x1_0000_4000).unwrap(), PageState::Encrypted);
    // The same call from a 64-bit guest is refused (reserved attribute bits).
    assert_eq!(
        call(
            &t,
            &mut m,
            NR,
            [0x1_0000_4000, 1, 0x1_0000_0000],
            KVM_EXIT_HYPERCALL_LONG_MODE
        ),
        rejected(EINVAL)
    );
}

#[test]
fn long_mode_is_bit_0_of_flags_whatever_the_layout() {
    let t = tracker();
    let mut m = buffer(0);
    // Other flag bits (KVM's must-be-zero bits) do not matter; bit 0 alone says 64-bit.
    fill_hypercall(m.run(), NR, [0x1_0000_0000, 1, 0], 0x8000_0000_0000_0001);
    assert_eq!(handle_exit(&t, m.run()).unwrap(), accepted());
    assert_eq!(t.state(0x1_0000_0000).unwrap(), PageState::Shared);
    // Kernels before 6.5 wrote `__u32 longmode` and left `pad` alone.
    fill_hypercall(m.run(), NR, [0x1_0000_1000, 1, 0], 0);
    // SAFETY: the hypercall member was just filled.
    unsafe {
        let u = &mut m.run().__bindgen_anon_1.hypercall.__bindgen_anon_1;
        u.flags = 0xffff_ffff_0000_0000; // stale `pad`
        u.longmode = 1;
    }
    assert_eq!(handle_exit(&t, m.run()).unwrap(), accepted());
    assert_eq!(t.state(0x1_0000_1000).unwrap(), PageState::Shared);
}

#[test]
fn migration_control_msr() {
    let t = tracker();
    let changes = Arc::new(Mutex::new(Vec::new()));
    let c = changes.clone();
    t.set_readiness_callback(Some(Box::new(move |ready, v| {
        c.lock().unwrap().push((ready, v))
    })))
    .unwrap();
    let mut m = buffer(0xff);
    let rd = |t: &Tracker, m: &mut Mapping| {
        fill_msr(
            m.run(),
            KVM_EXIT_X86_RDMSR,
            KVM_MSR_EXIT_REASON_FILTER,
            MSR_KVM_MIGRATION_CONTROL,
            0,
        );
        let out = handle_exit(t, m.run()).unwrap();
        let (error, data) = msr_answer(m.run());
        assert_eq!(error, 0);
        assert_eq!(out, ExitOutcome::MsrRead { value: data });
        data
    };
    let wr = |t: &Tracker, m: &mut Mapping, value: u64| {
        fill_msr(
            m.run(),
            KVM_EXIT_X86_WRMSR,
            KVM_MSR_EXIT_REASON_FILTER,
            MSR_KVM_MIGRATION_CONTROL,
            value,
        );
        let out = handle_exit(t, m.run()).unwrap();
        let (error, data) = msr_answer(m.run());
        assert_eq!(data, value, "a write leaves msr.data alone");
        match out {
            ExitOutcome::MsrWrite { accepted } => assert_eq!(error, u8::from(!accepted)),
            other => panic!("{other:?}"),
        }
        out
    };
    assert_eq!(rd(&t, &mut m), 0);
    assert!(!t.is_ready());
    assert_eq!(wr(&t, &mut m, 1), ExitOutcome::MsrWrite { accepted: true });
    assert!(t.is_ready());
    assert_eq!(rd(&t, &mut m), 1);
    // Reserved bits: #GP (msr.error = 1), the value stays.
    for bad in [2, 3, 1 << 32, 1 << 63, u64::MAX] {
        assert_eq!(
            wr(&t, &mut m, bad),
            ExitOutcome::MsrWrite { accepted: false },
            "{bad:#x}"
        );
        assert_eq!(rd(&t, &mut m), 1);
    }
    assert_eq!(
        t.stats().unwrap().rejected[RejectReason::ReservedMsrBits as usize],
        5
    );
    // Writing READY again is taken and is no change; 0 (CPU offline, kexec) is not-ready.
    assert_eq!(wr(&t, &mut m, 1), ExitOutcome::MsrWrite { accepted: true });
    assert_eq!(wr(&t, &mut m, 0), ExitOutcome::MsrWrite { accepted: true });
    assert!(!t.is_ready());
    assert_eq!(rd(&t, &mut m), 0);
    assert_eq!(*changes.lock().unwrap(), vec![(true, 1), (false, 0)]);
}

/// The whole run as bytes, to check that a not-handled exit leaves it untouched.
fn image(m: &mut Mapping) -> Vec<u8> {
    m.bytes().to_vec()
}

#[test]
fn msr_exits_that_are_not_ours_are_left_alone() {
    let t = tracker();
    let mut m = buffer(0x77);
    let cases = [
        // Another MSR (IA32_TSC, the KVM system-time MSR, the index next to ours).
        (KVM_EXIT_X86_RDMSR, KVM_MSR_EXIT_REASON_FILTER, 0x10),
        (KVM_EXIT_X86_WRMSR, KVM_MSR_EXIT_REASON_FILTER, 0x4b56_4d01),
        (
            KVM_EXIT_X86_WRMSR,
            KVM_MSR_EXIT_REASON_FILTER,
            MSR_KVM_MIGRATION_CONTROL + 1,
        ),
        (
            KVM_EXIT_X86_RDMSR,
            KVM_MSR_EXIT_REASON_FILTER,
            MSR_KVM_MIGRATION_CONTROL - 1,
        ),
        // Our MSR, but exiting for a reason the VMM's own MSR handling asked for.
        (
            KVM_EXIT_X86_RDMSR,
            KVM_MSR_EXIT_REASON_UNKNOWN,
            MSR_KVM_MIGRATION_CONTROL,
        ),
        (
            KVM_EXIT_X86_WRMSR,
            KVM_MSR_EXIT_REASON_UNKNOWN,
            MSR_KVM_MIGRATION_CONTROL,
        ),
        (
            KVM_EXIT_X86_WRMSR,
            KVM_MSR_EXIT_REASON_INVAL,
            MSR_KVM_MIGRATION_CONTROL,
        ),
        (KVM_EXIT_X86_RDMSR, 0, MSR_KVM_MIGRATION_CONTROL),
    ];
    for (exit_reason, reason, index) in cases {
        fill_msr(m.run(), exit_reason, reason, index, 1);
        // error = 0x42 marks "not written by pagenc".
        m.run().__bindgen_anon_1.msr.error = 0x42;
        let before = image(&mut m);
        assert_eq!(
            handle_exit(&t, m.run()).unwrap(),
            ExitOutcome::NotHandled { exit_reason },
            "{exit_reason} reason {reason} index {index:#x}"
        );
        assert!(image(&mut m) == before, "run modified for index {index:#x}");
    }
    assert!(
        !t.is_ready(),
        "a not-handled write must not reach the tracker"
    );
}

#[test]
fn other_exit_reasons_are_left_alone() {
    let t = tracker();
    let mut m = buffer(0x3c);
    for exit_reason in [
        KVM_EXIT_UNKNOWN,
        KVM_EXIT_IO,
        KVM_EXIT_HLT,
        KVM_EXIT_MMIO,
        KVM_EXIT_SHUTDOWN,
        KVM_EXIT_INTERNAL_ERROR,
        31,
        0xffff_ffff,
    ] {
        m.run().exit_reason = exit_reason;
        let before = image(&mut m);
        assert_eq!(
            handle_exit(&t, m.run()).unwrap(),
            ExitOutcome::NotHandled { exit_reason }
        );
        assert!(
            image(&mut m) == before,
            "run modified for exit {exit_reason}"
        );
    }
    assert_eq!(t.stats().unwrap().hypercalls, 0);
}

#[test]
fn a_call_from_inside_a_callback_fails_but_still_answers_the_guest() {
    let t = Arc::new(tracker());
    let weak = Arc::downgrade(&t);
    let seen: Arc<Mutex<Vec<(ExitError, u64, u8)>>> = Arc::default();
    let seen2 = seen.clone();
    let calls = Arc::new(AtomicUsize::new(0));
    let calls2 = calls.clone();
    t.set_change_callback(Some(Box::new(move |_, _| {
        calls2.fetch_add(1, Ordering::SeqCst);
        let t = weak.upgrade().unwrap();
        let mut m = buffer(0);
        fill_hypercall(m.run(), NR, [0x9000, 1, 0], 1);
        let e = handle_exit(&t, m.run()).unwrap_err();
        let ret = hypercall_ret(m.run());
        fill_msr(
            m.run(),
            KVM_EXIT_X86_WRMSR,
            KVM_MSR_EXIT_REASON_FILTER,
            MSR_KVM_MIGRATION_CONTROL,
            1,
        );
        let e2 = handle_exit(&t, m.run()).unwrap_err();
        assert_eq!(e2.error, TrackerError::Reentrant);
        assert_eq!(e2.exit_reason, KVM_EXIT_X86_WRMSR);
        seen2.lock().unwrap().push((e, ret, msr_answer(m.run()).0));
    })))
    .unwrap();
    let mut m = buffer(0);
    call(&t, &mut m, NR, [0x8000, 1, 0], 1);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let seen = seen.lock().unwrap();
    let (e, ret, msr_error) = &seen[0];
    assert_eq!(e.error, TrackerError::Reentrant);
    assert_eq!(e.exit_reason, KVM_EXIT_HYPERCALL);
    assert!(e.to_string().contains("KVM_EXIT_HYPERCALL"), "{e}");
    // The guest is not told the inner update was recorded.
    assert_eq!(*ret, EINVAL);
    assert_eq!(*msr_error, 1);
    assert_eq!(t.state(0x9000).unwrap(), PageState::Encrypted);
    t.set_change_callback(None).unwrap();
}

/// Runs the hypercall and MSR paths through `m` as a kvm_run.
fn exercise(m: &mut Mapping) {
    let t = tracker();
    assert_eq!(call(&t, m, NR, [0x7000, 3, 0], 1), accepted());
    assert_eq!(call(&t, m, NR, [0x7000, 3, 4], 1), rejected(EINVAL));
    assert_eq!(
        t.shared_ranges().unwrap(),
        vec![PageRange { start: 7, end: 10 }]
    );
    fill_msr(
        m.run(),
        KVM_EXIT_X86_WRMSR,
        KVM_MSR_EXIT_REASON_FILTER,
        MSR_KVM_MIGRATION_CONTROL,
        1,
    );
    assert_eq!(
        handle_exit(&t, m.run()).unwrap(),
        ExitOutcome::MsrWrite { accepted: true }
    );
    assert!(t.is_ready());
}

#[test]
fn buffers_of_the_size_kvm_reports() {
    let Some(kvm) = open_kvm("buffers_of_the_size_kvm_reports") else {
        return;
    };
    let size = vcpu_mmap_size(kvm.as_fd());
    assert!(size >= std::mem::size_of::<kvm_run>(), "mmap size {size}");
    // An anonymous mapping of that size...
    exercise(&mut Mapping::anonymous(size));
    // ...and a real vCPU's kvm_run mapping (never run here: written by hand as KVM would).
    let mut vm = TinyVm::new(kvm.as_fd(), 0x10000);
    exercise(&mut vm.run);
}

#[test]
fn the_detailed_handler_says_why() {
    let t = tracker();
    let mut m = buffer(0);
    fill_hypercall(m.run(), NR, [0x5000, 1, 1 << 40], 1);
    let (out, why) = handle_exit_detailed(&t, m.run()).unwrap();
    assert_eq!(out, rejected(EINVAL));
    let why = why.unwrap();
    assert_eq!(why.reason, RejectReason::ReservedAttrs);
    assert_eq!(why.args, [0x5000, 1, 1 << 40]);
    assert!(why.to_string().contains("0x10000000000"), "{why}");
    // A 32-bit guest's call is reported with the 32-bit values it made.
    fill_hypercall(m.run(), 0x1_0000_0001, [0x1_0000_5000, 1, 0], 0);
    let (out, why) = handle_exit_detailed(&t, m.run()).unwrap();
    assert_eq!(out, rejected(ENOSYS));
    let why = why.unwrap();
    assert_eq!((why.reason, why.nr), (RejectReason::UnknownHypercall, 1));
    assert_eq!(why.args[0], 0x5000);
    // Accepted calls and handled MSR accesses carry no detail; refused MSR writes do.
    fill_hypercall(m.run(), NR, [0x5000, 1, 0], 1);
    assert_eq!(
        handle_exit_detailed(&t, m.run()).unwrap(),
        (accepted(), None)
    );
    fill_msr(
        m.run(),
        KVM_EXIT_X86_WRMSR,
        KVM_MSR_EXIT_REASON_FILTER,
        MSR_KVM_MIGRATION_CONTROL,
        4,
    );
    let (out, why) = handle_exit_detailed(&t, m.run()).unwrap();
    assert_eq!(out, ExitOutcome::MsrWrite { accepted: false });
    assert_eq!(why.unwrap().reason, RejectReason::ReservedMsrBits);
    m.run().exit_reason = KVM_EXIT_HLT;
    assert_eq!(
        handle_exit_detailed(&t, m.run()).unwrap(),
        (
            ExitOutcome::NotHandled {
                exit_reason: KVM_EXIT_HLT
            },
            None
        )
    );
}
