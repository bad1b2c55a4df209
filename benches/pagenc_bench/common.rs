//! What every workload shares: time (TSC, thread CPU time), the deterministic random numbers,
//! the guest layouts and guest calls, and the loops that apply calls to a structure.

#![allow(unused_imports)]
use crate::prelude::*;

/// The time-stamp counter (invariant TSC on every x86-64 this targets).
#[inline(always)]
pub(crate) fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no preconditions on x86-64 and touches no memory.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// TSC ticks per nanosecond, against the monotonic clock over 200 ms.
pub(crate) fn tsc_ghz() -> f64 {
    let (t0, c0) = (Instant::now(), rdtsc());
    std::thread::sleep(Duration::from_millis(200));
    let (t1, c1) = (Instant::now(), rdtsc());
    (c1 - c0) as f64 / (t1 - t0).as_nanos() as f64
}

/// Cost of an empty rdtsc pair, subtracted from per-op samples.
pub(crate) fn rdtsc_overhead() -> u64 {
    let mut v: Vec<u64> = (0..10_000)
        .map(|_| {
            let a = rdtsc();
            let b = rdtsc();
            b - a
        })
        .collect();
    v.sort_unstable();
    v[v.len() / 2]
}

/// p50, p99 and max of cycle samples, in ns.
pub(crate) fn pcts(samples: &mut [u64], ghz: f64) -> (f64, f64, f64) {
    if samples.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize] as f64 / ghz;
    (at(0.5), at(0.99), samples[samples.len() - 1] as f64 / ghz)
}

/// This thread's CPU time in seconds. Throughput and scan timings use it rather than the wall
/// clock: the machine is shared, and time spent descheduled is not the structure's cost.
pub(crate) fn cpu_time() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-buffer; CLOCK_THREAD_CPUTIME_ID always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

// ---------------------------------------------------------------------------------------------
// Random numbers (deterministic: every structure sees the same data)

#[derive(Clone)]
pub(crate) struct Rng(pub(crate) u64);
impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        ((self.next() as u128 * n as u128) >> 64) as u64
    }
}

// ---------------------------------------------------------------------------------------------
// Guests

/// Pages in one GiB.
pub(crate) const GIB: u64 = 1 << 18;
/// KVM_HC_MAP_GPA_RANGE's 2 MiB and 1 GiB page-table levels, in pages.
pub(crate) const PTE_2M: u64 = 512;
pub(crate) const PTE_1G: u64 = 1 << 18;

/// A q35-like RAM layout of `pages`: up to 3 GiB below the PCI hole, the rest from 4 GiB.
pub(crate) fn layout_for(pages: u64) -> Layout {
    let low = pages.min(3 * GIB);
    let mut r = vec![RamRange {
        gpa: 0,
        size: low << 12,
    }];
    if pages > low {
        r.push(RamRange {
            gpa: 4 << 30,
            size: (pages - low) << 12,
        });
    }
    Layout::new(&r).expect("valid layout")
}

/// The gfn of the `idx`-th RAM page.
pub(crate) fn ram_gfn(layout: &Layout, mut idx: u64) -> u64 {
    for r in layout.ranges() {
        if idx < r.len() {
            return r.start + idx;
        }
        idx -= r.len();
    }
    panic!("RAM index {idx} past the end of RAM");
}

/// One guest call: `n` pages from `gfn` to shared or encrypted.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Op {
    pub(crate) gfn: u64,
    pub(crate) n: u64,
    pub(crate) shared: bool,
}

pub(crate) fn fmt_gib(pages: u64) -> String {
    if pages >= 1024 * GIB {
        format!("{}T", pages / (1024 * GIB))
    } else {
        format!("{}G", pages / GIB)
    }
}

/// Best of `reps` timings of `f`, in seconds, and its last result.
pub(crate) fn best<R>(reps: usize, mut f: impl FnMut() -> R) -> (f64, R) {
    let mut t = f64::MAX;
    let mut r = None;
    for _ in 0..reps {
        let s = cpu_time();
        r = Some(black_box(f()));
        t = t.min(cpu_time() - s);
    }
    (t, r.expect("reps >= 1"))
}

pub(crate) fn build<S: Store>(s: &mut S, layout: &Layout, ops: &[Op]) {
    for op in ops {
        s.apply(layout, op.gfn, op.n, op.shared);
    }
}

/// Runs `ops` on `s`, timing each call; returns the total seconds.
pub(crate) fn run_ops<S: Store>(
    s: &mut S,
    layout: &Layout,
    ops: &[Op],
    samples: &mut Vec<u64>,
) -> f64 {
    let t = cpu_time();
    for op in ops {
        let a = rdtsc();
        s.apply(layout, op.gfn, op.n, op.shared);
        samples.push(rdtsc() - a);
    }
    cpu_time() - t
}

/// `n` random, disjoint, non-adjacent ranges over the first `span` pages of RAM (1 to
/// min(slot/2, max_len) pages each, one per slot), as calls.
pub(crate) fn random_ranges(
    layout: &Layout,
    span: u64,
    n: u64,
    max_len: u64,
    seed: u64,
) -> Vec<Op> {
    let pages = span;
    let slot = pages / n;
    assert!(slot >= 2, "{n} ranges do not fit in {pages} pages");
    let mut rng = Rng(seed);
    (0..n)
        .map(|i| {
            let len = 1 + rng.below((slot / 2).clamp(1, max_len));
            let off = rng.below(slot - len);
            let idx = i * slot + off;
            // A range that would cross from low to high RAM is cut at the hole.
            let g = ram_gfn(layout, idx);
            let room = layout
                .ranges()
                .iter()
                .find(|r| r.contains(g))
                .map_or(1, |r| r.end - g);
            Op {
                gfn: g,
                n: len.min(room),
                shared: true,
            }
        })
        .collect()
}

/// Generates the calls of one hostile pattern lazily (1 TiB of alternating pages is 2^27 calls).
pub(crate) fn hostile_ops<'a>(
    layout: &'a Layout,
    pattern: &str,
    toggles: u64,
) -> Box<dyn Iterator<Item = Op> + 'a> {
    let alt = layout
        .ranges()
        .iter()
        .flat_map(|r| (r.start..r.end).step_by(2))
        .map(|g| Op {
            gfn: g,
            n: 1,
            shared: true,
        });
    match pattern {
        "alternate" => Box::new(alt),
        "toggles" => {
            let mut rng = Rng(5);
            let pages = layout.pages();
            Box::new(alt.chain((0..toggles).map(move |_| Op {
                gfn: ram_gfn(layout, rng.below(pages)),
                n: 1,
                shared: rng.next() & 1 == 0,
            })))
        }
        _ => {
            // Sawtooth: shared runs of 1..7 pages, each followed by a gap as long.
            Box::new(layout.ranges().iter().flat_map(|r| {
                let mut v = Vec::new();
                let (mut g, mut len) = (r.start, 1u64);
                while g + len <= r.end {
                    v.push(Op {
                        gfn: g,
                        n: len,
                        shared: true,
                    });
                    g += 2 * len;
                    len = len % 7 + 1;
                }
                v
            }))
        }
    }
}
