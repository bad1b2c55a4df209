//! The tracker through its public Rust API: hypercall validation (every rejection leaves the
//! map unchanged), the migration-control MSR, callbacks, reset, statistics and concurrency.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use pagenc::core::{Layout, PageRange, PageState, RamRange, MAX_GFN, PAGE_SHIFT};
use pagenc::hypercall::RejectReason;
use pagenc::tracker::{CursorState, TrackerError};
use pagenc::Tracker;

const GIB: u64 = 1 << 30;
const MSR: u32 = 0x4b564d08;
const ENC: u64 = 0x10;
const EINVAL_RET: u64 = (-22i64) as u64;
const ENOSYS_RET: u64 = (-1000i64) as u64;

/// A Q35-like guest: 2 GiB below the PCI hole, 2 GiB above 4 GiB.
fn q35() -> Tracker {
    Tracker::new(
        Layout::new(&[
            RamRange {
                gpa: 0,
                size: 2 * GIB,
            },
            RamRange {
                gpa: 4 * GIB,
                size: 2 * GIB,
            },
        ])
        .unwrap(),
    )
}

fn pr(start: u64, end: u64) -> PageRange {
    PageRange { start, end }
}

fn rejected(t: &Tracker, nr: u64, args: [u64; 3]) -> (RejectReason, u64, String) {
    let before = t.shared_ranges().unwrap();
    match t.handle_hypercall(nr, args) {
        Err(TrackerError::Guest(e)) => {
            assert_eq!(
                t.shared_ranges().unwrap(),
                before,
                "a rejected call changed the map"
            );
            (e.reason, e.kvm_ret(), e.to_string())
        }
        other => panic!("{nr} {args:x?} should be rejected, got {other:?}"),
    }
}

#[test]
fn every_bad_hypercall_is_rejected_with_nothing_changed() {
    let t = q35();
    t.map_gpa_range(0x10000, 4, 0).unwrap();
    let cases: &[(u64, [u64; 3], RejectReason, u64, &str)] = &[
        (
            11,
            [0x1000, 1, 0],
            RejectReason::UnknownHypercall,
            ENOSYS_RET,
            "nr 11",
        ),
        (
            12,
            [0x1001, 1, 0],
            RejectReason::Unaligned,
            EINVAL_RET,
            "0x1001",
        ),
        (
            12,
            [0x2000, 0, 0],
            RejectReason::ZeroLength,
            EINVAL_RET,
            "npages 0",
        ),
        (
            12,
            [0xffff_ffff_ffff_f000, 2, 0],
            RejectReason::OutOfRange,
            EINVAL_RET,
            "52-bit",
        ),
        (
            12,
            [(MAX_GFN - 1) << PAGE_SHIFT, 2, 0],
            RejectReason::OutOfRange,
            EINVAL_RET,
            "52-bit",
        ),
        (
            12,
            [0x1000, u64::MAX, 0],
            RejectReason::OutOfRange,
            EINVAL_RET,
            "52-bit",
        ),
        (
            12,
            [0x1000, 1, 0x20],
            RejectReason::ReservedAttrs,
            EINVAL_RET,
            "0x20",
        ),
        (
            12,
            [0x1000, 1, 1 << 63],
            RejectReason::ReservedAttrs,
            EINVAL_RET,
            "reserved bits",
        ),
        (
            12,
            [0x1000, 1, 3],
            RejectReason::BadPageSizeHint,
            EINVAL_RET,
            "hint 3",
        ),
        // kvm-ioctls' own test uses 0x8 thinking it is the encrypted bit: it is hint 8.
        (
            12,
            [0x1000, 1, 0x8],
            RejectReason::BadPageSizeHint,
            EINVAL_RET,
            "hint 8",
        ),
    ];
    for &(nr, args, reason, ret, text) in cases {
        let (r, kret, msg) = rejected(&t, nr, args);
        assert_eq!((r, kret), (reason, ret), "{nr} {args:x?}");
        assert!(
            msg.contains(text),
            "message {msg:?} should mention {text:?}"
        );
    }
    let s = t.stats().unwrap();
    assert_eq!(s.rejected[RejectReason::OutOfRange as usize], 3);
    assert_eq!(s.rejected[RejectReason::BadPageSizeHint as usize], 2);
    assert_eq!(s.hypercalls, 1 + cases.len() as u64);
    assert_eq!(t.shared_ranges().unwrap(), vec![pr(0x10, 0x14)]);
}

#[test]
fn the_page_size_hint_never_decides_alignment_or_state() {
    let t = q35();
    // Linux sends the 4K hint for 2M runs; a 2M hint on a 4K-aligned address is still taken.
    t.map_gpa_range(0x20_0000, 512, 0).unwrap();
    t.map_gpa_range(0x1000, 1, 1).unwrap();
    // AMD's 2021 code tested `if (attrs)`, so DECRYPTED|PAGE_SZ_2M (= 1) counted as encrypted.
    assert_eq!(t.state(0x1000).unwrap(), PageState::Shared);
    t.map_gpa_range(0x1000, 1, ENC | 2).unwrap();
    assert_eq!(t.state(0x1000).unwrap(), PageState::Encrypted);
    assert_eq!(t.shared_ranges().unwrap(), vec![pr(0x200, 0x400)]);
}

#[test]
fn ranges_merge_both_ways_and_split_like_amds_list_should_have() {
    let t = q35();
    t.map_gpa_range(0x30 << 12, 0x10, 0).unwrap();
    t.map_gpa_range(0x10 << 12, 0x10, 0).unwrap();
    // Fills the gap: must merge with the range before AND the one after (AMD's forward merge
    // left the successor separate).
    t.map_gpa_range(0x20 << 12, 0x10, 0).unwrap();
    assert_eq!(t.shared_ranges().unwrap(), vec![pr(0x10, 0x40)]);
    // Starts before and overlaps: one range, not an overlapping second node.
    t.map_gpa_range(0x8 << 12, 0x10, 0).unwrap();
    assert_eq!(t.shared_ranges().unwrap(), vec![pr(0x8, 0x40)]);
    // Re-encrypting the middle splits it; re-encrypting what is encrypted is a no-op.
    t.map_gpa_range(0x18 << 12, 0x8, ENC).unwrap();
    let out = t.map_gpa_range(0x18 << 12, 0x8, ENC).unwrap();
    assert_eq!(out.summary.flipped, 0);
    assert_eq!(
        t.shared_ranges().unwrap(),
        vec![pr(0x8, 0x18), pr(0x20, 0x40)]
    );
    // Removing several whole ranges in one call removes all of them (AMD's removal stopped
    // after the first node it freed).
    t.map_gpa_range(0x100 << 12, 1, 0).unwrap();
    t.map_gpa_range(0, 0x1000, ENC).unwrap();
    assert_eq!(t.shared_ranges().unwrap(), vec![]);
}

#[test]
fn out_of_ram_ranges_are_accepted_clipped_and_counted() {
    let t = q35();
    // OVMF decrypts MMIO and non-existent space too: the PCI hole and beyond RAM.
    let out = t
        .map_gpa_range(2 * GIB - 0x1000, (2 * GIB + 0x1000) >> 12, 0)
        .unwrap();
    assert_eq!(out.summary.flipped, 1);
    assert_eq!(out.summary.clipped, (2 * GIB) >> 12);
    // Billions of pages up to the 52-bit limit: O(1) memory; RAM above 4 GiB becomes shared.
    t.map_gpa_range(4 * GIB, MAX_GFN - ((4 * GIB) >> 12), 0)
        .unwrap();
    let s = t.stats().unwrap();
    assert!(s.clipped_pages > 1 << 39);
    assert!(s.heap_bytes < 64 * 1024, "{} bytes", s.heap_bytes);
    assert_eq!(s.shared_pages, 1 + ((2 * GIB) >> 12));
    assert_eq!(t.shared_ranges().unwrap().len(), 2);
}

#[test]
fn migration_control_msr() {
    let t = q35();
    let seen = Arc::new(Mutex::new(vec![]));
    let s2 = seen.clone();
    t.set_readiness_callback(Some(Box::new(move |ready, v| {
        s2.lock().unwrap().push((ready, v))
    })))
    .unwrap();
    assert_eq!(t.rdmsr(MSR).unwrap(), 0);
    t.wrmsr(MSR, 1).unwrap();
    t.wrmsr(MSR, 1).unwrap();
    assert!(t.is_ready());
    assert_eq!(t.rdmsr(MSR).unwrap(), 1);
    match t.wrmsr(MSR, 3) {
        Err(TrackerError::Guest(e)) => {
            assert_eq!(e.reason, RejectReason::ReservedMsrBits);
            assert!(e.to_string().contains("0x3"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(t.rdmsr(MSR).unwrap(), 1, "a refused write changes nothing");
    assert!(matches!(
        t.wrmsr(0x10, 1),
        Err(TrackerError::NotOurMsr { index: 0x10 })
    ));
    assert!(matches!(t.rdmsr(0x10), Err(TrackerError::NotOurMsr { .. })));
    // CPU offline or kexec: back to not ready.
    t.wrmsr(MSR, 0).unwrap();
    assert!(!t.is_ready());
    t.wrmsr(MSR, 1).unwrap();
    t.reset().unwrap();
    assert!(!t.is_ready());
    assert_eq!(
        *seen.lock().unwrap(),
        vec![(true, 1), (false, 0), (true, 1), (false, 0)],
        "every change once, in order; repeated writes are not changes"
    );
    let s = t.stats().unwrap();
    assert_eq!(s.msr_writes, 4);
    assert_eq!(s.rejected[RejectReason::ReservedMsrBits as usize], 1);
}

#[test]
fn change_callback_hears_exactly_the_flips() {
    let t = q35();
    let seen = Arc::new(Mutex::new(vec![]));
    let s2 = seen.clone();
    t.set_change_callback(Some(Box::new(move |r, st| {
        s2.lock().unwrap().push((r, st))
    })))
    .unwrap();
    t.map_gpa_range(0x10 << 12, 0x10, 0).unwrap();
    t.map_gpa_range(0x18 << 12, 0x10, 0).unwrap();
    t.map_gpa_range(0x0, 0x8, ENC).unwrap();
    t.map_gpa_range(0x14 << 12, 0x2, ENC).unwrap();
    // Across the PCI hole: two RAM pieces, reported as two ranges.
    t.map_gpa_range(2 * GIB - 0x2000, (2 * GIB + 0x4000) >> 12, 0)
        .unwrap();
    t.reset().unwrap();
    let hole_end = (4 * GIB) >> 12;
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            (pr(0x10, 0x20), PageState::Shared),
            (pr(0x20, 0x28), PageState::Shared),
            (pr(0x14, 0x16), PageState::Encrypted),
            (
                pr(((2 * GIB) >> 12) - 2, (2 * GIB) >> 12),
                PageState::Shared
            ),
            (pr(hole_end, hole_end + 2), PageState::Shared),
            (pr(0x10, 0x14), PageState::Encrypted),
            (pr(0x16, 0x28), PageState::Encrypted),
            (
                pr(((2 * GIB) >> 12) - 2, (2 * GIB) >> 12),
                PageState::Encrypted
            ),
            (pr(hole_end, hole_end + 2), PageState::Encrypted),
        ]
    );
    // Hypercall flips only (a reset is not the guest's doing).
    assert_eq!(
        t.stats().unwrap().pages_flipped,
        0x10 + 0x8 + 0x2 + 0x2 + 0x2
    );
}

#[test]
fn a_callback_calling_back_in_gets_reentrant_not_a_deadlock() {
    let t = Arc::new(q35());
    let t2 = Arc::downgrade(&t);
    let results = Arc::new(Mutex::new(vec![]));
    let r2 = results.clone();
    t.set_change_callback(Some(Box::new(move |_, _| {
        let t = t2.upgrade().unwrap();
        r2.lock()
            .unwrap()
            .push(t.map_gpa_range(0x5000, 1, 0).map(|_| ()));
        r2.lock().unwrap().push(t.state(0).map(|_| ()));
    })))
    .unwrap();
    t.map_gpa_range(0x1000, 1, 0).unwrap();
    assert_eq!(
        *results.lock().unwrap(),
        vec![Err(TrackerError::Reentrant), Err(TrackerError::Reentrant)]
    );
    // Another thread is not re-entrant.
    let t3 = t.clone();
    std::thread::spawn(move || t3.state(0).unwrap())
        .join()
        .unwrap();
    t.set_change_callback(None).unwrap();
}

#[test]
fn cursor_sees_changes_made_after_it_cached_a_run() {
    let t = q35();
    let mut c = CursorState::new();
    let run = c.query(&t, 0x100).unwrap();
    assert_eq!(run.state, PageState::Encrypted);
    assert_eq!(run.range.end, MAX_GFN);
    t.map_gpa_range(0x200 << 12, 4, 0).unwrap();
    let run = c.query(&t, 0x101).unwrap();
    assert_eq!((run.state, run.range.end), (PageState::Encrypted, 0x200));
    let run = c.query(&t, 0x201).unwrap();
    assert_eq!((run.state, run.range.end), (PageState::Shared, 0x204));
}

#[test]
fn concurrent_updaters_and_a_reader_see_no_torn_ranges() {
    // Each updater flips whole 64-page blocks of its own window; a reader iterating runs must
    // only ever see block boundaries as run boundaries (a page is old or new, never half-done).
    let t = Arc::new(q35());
    let stop = Arc::new(AtomicBool::new(false));
    const BLOCK: u64 = 64;
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let t = t.clone();
            std::thread::spawn(move || {
                let mut x = w + 1;
                for _ in 0..3000 {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                    let block = w * 64 + (x >> 33) % 64;
                    let attrs = if x >> 63 == 0 { 0 } else { ENC };
                    t.map_gpa_range((block * BLOCK) << PAGE_SHIFT, BLOCK, attrs)
                        .unwrap();
                }
            })
        })
        .collect();
    let reader = {
        let (t, stop) = (t.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut scans = 0;
            while !stop.load(Ordering::Relaxed) || scans == 0 {
                for run in t.runs(pr(0, 4 * 64 * BLOCK), false) {
                    let run = run.unwrap();
                    assert_eq!(run.range.start % BLOCK, 0, "torn run {run:?}");
                    assert_eq!(run.range.end % BLOCK, 0, "torn run {run:?}");
                }
                let mut c = CursorState::new();
                let mut g = 0;
                while g < 4 * 64 * BLOCK {
                    let run = c.query(&t, g).unwrap();
                    assert_eq!(run.range.end % BLOCK, 0, "torn cursor run {run:?}");
                    g += 7;
                }
                scans += 1;
            }
            scans
        })
    };
    for w in writers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    assert!(reader.join().unwrap() > 0);
    t.stats().unwrap();
    for r in t.shared_ranges().unwrap() {
        assert_eq!((r.start % BLOCK, r.end % BLOCK), (0, 0));
    }
}

#[test]
fn layout_changes_keep_what_is_still_ram() {
    let t = q35();
    t.map_gpa_range(GIB, 16, 0).unwrap();
    t.map_gpa_range(5 * GIB, 16, 0).unwrap();
    // Hot-unplug the upper RAM, hotplug a DIMM at 8 GiB.
    t.set_layout(
        Layout::new(&[
            RamRange {
                gpa: 0,
                size: 2 * GIB,
            },
            RamRange {
                gpa: 8 * GIB,
                size: GIB,
            },
        ])
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        t.shared_ranges().unwrap(),
        vec![pr(GIB >> 12, (GIB >> 12) + 16)]
    );
    t.map_gpa_range(8 * GIB, 1, 0).unwrap();
    assert_eq!(t.stats().unwrap().ram_pages, (3 * GIB) >> 12);
}

#[test]
fn bad_layouts_explain_themselves() {
    let cases: &[(&[RamRange], &str)] = &[
        (
            &[RamRange {
                gpa: 0x800,
                size: 0x1000,
            }],
            "0x800",
        ),
        (&[RamRange { gpa: 0, size: 0 }], "size 0"),
        (
            &[
                RamRange {
                    gpa: 0,
                    size: 0x3000,
                },
                RamRange {
                    gpa: 0x2000,
                    size: 0x1000,
                },
            ],
            "overlap",
        ),
        (
            &[RamRange {
                gpa: !0xfff,
                size: 0x2000,
            }],
            "52-bit",
        ),
    ];
    for (ram, text) in cases {
        let e = Layout::new(ram).unwrap_err().to_string();
        assert!(e.contains(text), "{e:?} should mention {text:?}");
    }
    let many = vec![
        RamRange {
            gpa: 0,
            size: 0x1000
        };
        5000
    ];
    assert!(Layout::new(&many).unwrap_err().to_string().contains("5000"));
}

#[test]
fn replace_refuses_a_map_built_for_another_layout() {
    let t = q35();
    t.map_gpa_range(0x1000, 1, 0).unwrap();
    let other = Layout::new(&[RamRange { gpa: 0, size: GIB }]).unwrap();
    let map = pagenc::core::PageMap::new(other);
    assert_eq!(t.replace(map, 1), Err(TrackerError::LayoutMismatch));
    assert_eq!(t.shared_ranges().unwrap(), vec![pr(1, 2)]);
    assert!(!t.is_ready());
    let same = pagenc::core::PageMap::new(t.layout().unwrap());
    t.replace(same, 1).unwrap();
    assert_eq!(t.shared_ranges().unwrap(), vec![]);
    assert!(t.is_ready());
}

#[test]
fn a_change_invalidates_the_cursors_copy_of_a_bitmap_chunk() {
    // Over a fragmented (bitmap) chunk the cursor answers from a copy of the chunk's words. A
    // writer thread changes the map between the reader's walks (pattern swaps with `replace`,
    // single-page flips through the hypercall path); the reader keeps one cursor throughout and
    // must see every change at once, to the exact run end, including a run that leaves the
    // chunk into a full chunk.
    const CHUNK: u64 = 1 << 15;
    let t = Arc::new(q35());
    let layout = t.with_map(|m, _| m.layout().clone()).unwrap();
    // Pattern k: in chunk 1, pages with offset % (k + 2) == 0 shared; chunk 2 fully shared
    // when k is odd, so the run at the end of chunk 1 continues into it.
    let pattern = move |k: u64| {
        let mut m = pagenc::core::PageMap::new(layout.clone());
        for off in (0..CHUNK).step_by(k as usize + 2) {
            m.set(
                pr(CHUNK + off, CHUNK + off + 1),
                PageState::Shared,
                &mut |_| {},
            );
        }
        if k % 2 == 1 {
            m.set(
                pr(CHUNK - 1 + CHUNK, 3 * CHUNK),
                PageState::Shared,
                &mut |_| {},
            );
        }
        m
    };
    assert!(pattern(0).bitmap_words(CHUNK).is_some());
    let (to_reader, from_writer) = std::sync::mpsc::channel::<Vec<(u64, PageState, u64)>>();
    let (to_writer, from_reader) = std::sync::mpsc::channel::<()>();
    let writer = {
        let t = t.clone();
        std::thread::spawn(move || {
            for k in 0..6u64 {
                let m = pattern(k);
                t.replace(m.clone(), 0).unwrap();
                let mut expect = vec![];
                // Flip one page the reader's copy has cached (from the previous round).
                let g = CHUNK + 1 + k;
                let shared_now = m.state(g) == PageState::Shared;
                t.map_gpa_range(g << PAGE_SHIFT, 1, if shared_now { ENC } else { 0 })
                    .unwrap();
                let m = t.with_map(|m, _| m.clone()).unwrap();
                // The flipped page first: the cursor's cached run (from the last walk's final
                // query, far away) does not hold it, so only the generation can refresh the
                // copy. Then the chunk up and down, then a page in the middle.
                let walk = (CHUNK..2 * CHUNK).chain((CHUNK..2 * CHUNK).rev());
                for g in [g].into_iter().chain(walk).chain([CHUNK + 12345]) {
                    let run = m.run_at(g);
                    expect.push((g, run.state, run.range.end));
                }
                to_reader.send(expect).unwrap();
                from_reader.recv().unwrap();
            }
        })
    };
    let mut c = CursorState::new();
    let mut rounds = 0;
    for expect in from_writer {
        for &(g, state, end) in &expect {
            let run = c.query(&t, g).unwrap();
            assert_eq!((run.state, run.range.end), (state, end), "gfn {g:#x}");
        }
        rounds += 1;
        to_writer.send(()).unwrap();
    }
    writer.join().unwrap();
    assert_eq!(rounds, 6);
}

/// Issue 10, point 4: what the run iterator guarantees when the map changes between two calls,
/// as the header now says: runs stay contiguous and cover the range, each is exact when
/// returned, but two consecutive runs may have the same state. (The old header promised
/// maximal, alternating runs unconditionally; this pins down what really holds.)
#[test]
fn runs_under_changes_between_calls_are_contiguous_and_exact_when_returned() {
    let t = Tracker::new(
        Layout::new(&[RamRange {
            gpa: 0,
            size: 1 << 30,
        }])
        .unwrap(),
    );
    let gfn = |g: u64| g << 12;
    t.map_gpa_range(gfn(10), 10, 0).unwrap();
    let all = PageRange { start: 0, end: 100 };
    let mut runs = vec![];
    for (step, run) in t.runs(all, false).enumerate() {
        let run = run.unwrap();
        // Exact now: every page in its state, and the state changes at its end (or the end
        // of the range).
        for g in run.range.start..run.range.end {
            assert_eq!(t.state(gfn(g)).unwrap(), run.state, "{run:?} page {g:#x}");
        }
        if run.range.end < all.end {
            assert_ne!(t.state(gfn(run.range.end)).unwrap(), run.state, "{run:?}");
        }
        runs.push(run);
        // Between calls: the page after the shared run [10, 20) turns shared too.
        if step == 1 {
            t.map_gpa_range(gfn(20), 5, 0).unwrap();
        }
    }
    for w in runs.windows(2) {
        assert_eq!(w[0].range.end, w[1].range.start, "contiguous: {runs:?}");
    }
    assert_eq!(runs.first().unwrap().range.start, all.start);
    assert_eq!(runs.last().unwrap().range.end, all.end);
    // [0,10) enc, [10,20) shared, then [20,25) shared: not alternating, as documented.
    assert_eq!(runs[1].range, PageRange { start: 10, end: 20 });
    assert_eq!(runs[2].range, PageRange { start: 20, end: 25 });
    assert_eq!(runs[1].state, runs[2].state);
}
