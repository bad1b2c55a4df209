//! Issue 10, point 3: the worst vCPU stall while the VMM changes the layout, saves, loads and
//! resets on a hostile guest (every other page shared: 512 GiB in the full run, 4 GiB quick).
//!
//! Two figures per operation. The lock hold: the operation's part that runs under the tracker's
//! lock, timed on the VMM thread through the public call that is exactly that part (the whole
//! `set_layout` and `reset`; `Tracker::snapshot` for a save, `Tracker::replace` for a load,
//! whose encoding and decoding run outside the lock). A vCPU waits at most that long. And the
//! observed stall: a vCPU thread toggles one page with MAP_GPA_RANGE in a loop and times every
//! call; the slowest call that overlapped the operation (a phase counter, bumped at its start
//! and end, tells which did). On a machine whose cores are shared with other work the second
//! figure includes preemption, which the slowest call outside every operation (the noise
//! floor) shows; the lock hold is what pagenc controls.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pagenc::core::{PageMapBuilder, PageRange};
use pagenc::stream;
use pagenc::{Layout, RamRange, Tracker};

use crate::prelude::*;

/// What the vCPU thread saw during one operation.
#[allow(dead_code)]
struct Seen {
    op_ms: f64,
    held_ms: f64,
    worst_ms: f64,
    calls: u64,
}

struct Probe {
    /// Odd while an operation runs.
    phase: AtomicU64,
    stop: AtomicU64,
    worst_in_ns: AtomicU64,
    calls_in: AtomicU64,
    worst_out_ns: AtomicU64,
}

fn vcpu(t: &Tracker, p: &Probe) {
    // gfn 1 is encrypted between shared gfns 0 and 2: each call flips it and merges or splits
    // a run in a bitmap chunk, a real update under the lock.
    let mut shared = true;
    while p.stop.load(Ordering::Relaxed) == 0 {
        let before = p.phase.load(Ordering::Acquire);
        let s = Instant::now();
        let _ = t.map_gpa_range(1 << 12, 1, if shared { 0 } else { 0x10 });
        let ns = s.elapsed().as_nanos() as u64;
        let after = p.phase.load(Ordering::Acquire);
        shared = !shared;
        if before % 2 == 1 || after != before {
            p.worst_in_ns.fetch_max(ns, Ordering::Relaxed);
            p.calls_in.fetch_add(1, Ordering::Relaxed);
        } else {
            p.worst_out_ns.fetch_max(ns, Ordering::Relaxed);
        }
    }
}

/// Runs each operation in turn with the vCPU thread hammering `t`; returns what it saw for
/// each and the noise floor (ms).
/// An operation: runs it and returns how long its locked part took (ms).
type Op<'a> = &'a mut dyn FnMut(&Tracker) -> f64;

fn ms(s: Instant) -> f64 {
    s.elapsed().as_secs_f64() * 1e3
}

fn measure(t: &Tracker, ops: &mut [Op<'_>]) -> (Vec<Seen>, f64) {
    let p = Probe {
        phase: AtomicU64::new(0),
        stop: AtomicU64::new(0),
        worst_in_ns: AtomicU64::new(0),
        calls_in: AtomicU64::new(0),
        worst_out_ns: AtomicU64::new(0),
    };
    let mut seen = Vec::new();
    std::thread::scope(|s| {
        s.spawn(|| vcpu(t, &p));
        std::thread::sleep(Duration::from_millis(50));
        for op in ops.iter_mut() {
            p.worst_in_ns.store(0, Ordering::Relaxed);
            p.calls_in.store(0, Ordering::Relaxed);
            p.phase.fetch_add(1, Ordering::AcqRel);
            let s = Instant::now();
            let held_ms = op(t);
            let op_ms = ms(s);
            p.phase.fetch_add(1, Ordering::AcqRel);
            // Let the call that was blocked finish and report.
            std::thread::sleep(Duration::from_millis(20));
            seen.push(Seen {
                op_ms,
                held_ms,
                worst_ms: p.worst_in_ns.load(Ordering::Relaxed) as f64 / 1e6,
                calls: p.calls_in.load(Ordering::Relaxed),
            });
        }
        p.stop.store(1, Ordering::Relaxed);
    });
    (seen, p.worst_out_ns.load(Ordering::Relaxed) as f64 / 1e6)
}

pub(crate) fn stall(rep: &mut Report) {
    let gib = if rep.quick { 4 } else { 512 };
    let ram = |extra: bool| {
        let mut r = vec![RamRange {
            gpa: 0,
            size: (gib * GIB) << 12,
        }];
        if extra {
            // A 1 GiB DIMM hotplugged at 1 TiB.
            r.push(RamRange {
                gpa: 1 << 40,
                size: 1 << 30,
            });
        }
        Layout::new(&r).expect("valid layout")
    };
    let layout = ram(false);
    let build = Instant::now();
    let mut b = PageMapBuilder::new(layout.clone());
    for g in (0..gib * GIB).step_by(2) {
        b.push(PageRange {
            start: g,
            end: g + 1,
        })
        .expect("ascending RAM pages");
    }
    let t = Tracker::new(layout.clone());
    t.replace(b.finish(), 1).expect("same layout");
    let ranges = t.stats().expect("stats").shared_ranges;
    println!(
        "\n== Stall: {gib} GiB hostile guest, {ranges} shared ranges (built in {:.1} s)",
        build.elapsed().as_secs_f64()
    );

    // Each operation runs `reps` times: a vCPU thread preempted on a shared machine shows a
    // slow call whatever pagenc does, but only in some repetitions, while a stall pagenc causes
    // (its lock held) shows in every one. So the table gives the best and the worst repetition,
    // and the goal is judged on the best one, next to the noise floor.
    let reps = if rep.quick { 3 } else { 5 };
    let names = [
        "set_layout: hotplug 1 GiB",
        "set_layout: unplug it",
        "save (snapshot, then encode)",
        "reset, no change callback",
        "load (decode, then swap)",
        "reset, change callback installed",
    ];
    let mut best = [f64::MAX; 6];
    let mut best_held = [f64::MAX; 6];
    let mut worst_held = [0f64; 6];
    let mut worst = [0f64; 6];
    let mut op_ms = [0f64; 6];
    let mut floor = 0f64;
    let mut bytes = Vec::new();
    let (hot, orig) = (ram(true), layout.clone());
    let heard = std::sync::Arc::new(AtomicU64::new(0));
    // `heard` counts the callback's calls (vCPU toggles included): it only has to run.
    for with_callback in [false, true] {
        if with_callback {
            // With a change callback the reset reports every shared range under the lock (the
            // callback's ordering promise), so its stall grows with the ranges.
            let c = heard.clone();
            t.set_change_callback(Some(Box::new(move |_, _| {
                c.fetch_add(1, Ordering::Relaxed);
            })))
            .expect("callback");
        }
        for _ in 0..reps {
            let bytes = &mut bytes;
            let timed = |f: &mut dyn FnMut()| {
                let s = Instant::now();
                f();
                ms(s)
            };
            let mut hotplug =
                |t: &Tracker| timed(&mut || t.set_layout(hot.clone()).expect("layout"));
            let mut unplug =
                |t: &Tracker| timed(&mut || t.set_layout(orig.clone()).expect("layout"));
            let mut save = |t: &Tracker| {
                let s = Instant::now();
                let (map, msr) = t.snapshot().expect("snapshot");
                let held = ms(s);
                *bytes = stream::encode_to_vec(&map, msr);
                held
            };
            let mut reset = |t: &Tracker| timed(&mut || t.reset().expect("reset"));
            let (seen, fl) = if with_callback {
                measure(&t, &mut [&mut reset])
            } else {
                measure(&t, &mut [&mut hotplug, &mut unplug, &mut save, &mut reset])
            };
            let mut load = |t: &Tracker| {
                let (map, msr) = stream::decode(&orig, bytes).expect("decode");
                let s = Instant::now();
                t.replace(map, msr).expect("replace");
                ms(s)
            };
            let (seen2, fl2) = measure(&t, &mut [&mut load]);
            floor = floor.max(fl).max(fl2);
            let ops: Vec<usize> = if with_callback {
                vec![5, 4]
            } else {
                vec![0, 1, 2, 3, 4]
            };
            for (i, s) in ops.into_iter().zip(seen.iter().chain(&seen2)) {
                best_held[i] = best_held[i].min(s.held_ms);
                worst_held[i] = worst_held[i].max(s.held_ms);
                best[i] = best[i].min(s.worst_ms);
                worst[i] = worst[i].max(s.worst_ms);
                op_ms[i] = op_ms[i].max(s.op_ms);
                let _ = s.calls;
            }
        }
    }
    let mut rows = Vec::new();
    for i in 0..names.len() {
        rows.push(vec![
            names[i].to_string(),
            f(op_ms[i]),
            f(best_held[i]),
            f(worst_held[i]),
            f(best[i]),
            f(worst[i]),
        ]);
    }
    rows.push(vec![
        "(noise floor: slowest vCPU call outside every operation)".into(),
        "-".into(),
        "-".into(),
        "-".into(),
        "-".into(),
        f(floor),
    ]);
    rep.table(
        "stall",
        &format!(
            "Stall: lock hold and slowest vCPU MAP_GPA_RANGE call during each VMM operation, \
             {gib} GiB hostile guest ({ranges} shared ranges), best and worst of {reps} repetitions"
        ),
        &[
            "operation",
            "op ms (slowest)",
            "lock held ms (best)",
            "lock held ms (worst)",
            "vCPU stall ms (best)",
            "vCPU stall ms (worst)",
        ],
        &rows,
    );
    println!("   (stream {} bytes)", bytes.len());
    for i in 0..names.len() {
        rep.goal(
            "stall",
            &format!("lock held ms (best of {reps}), {}", names[i]),
            best_held[i],
            1.0,
            false,
        );
    }
}
