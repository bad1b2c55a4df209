//! W2: runtime churn, coherent DMA allocate/free pairs over a base list.

#![allow(unused_imports)]
use crate::prelude::*;

/// Coherent DMA allocate/free pairs: order 0-4 at random addresses in the upper half of RAM
/// (the base lists live in the lower half, so churn does not erode them), about half the calls
/// encrypt (a free), with 16 to 256 allocations live.
pub(crate) struct Churn {
    pub(crate) rng: Rng,
    pub(crate) live: Vec<(u64, u64)>,
    pub(crate) lo: u64,
    pub(crate) pages: u64,
    pub(crate) layout: Layout,
}

impl Churn {
    fn new(layout: &Layout, seed: u64) -> Churn {
        Churn {
            rng: Rng(seed),
            live: Vec::with_capacity(256),
            lo: layout.pages() / 2,
            pages: layout.pages() - layout.pages() / 2,
            layout: layout.clone(),
        }
    }
    #[inline]
    fn next(&mut self) -> Op {
        let n = self.live.len();
        if n < 16 || (n < 256 && self.rng.next() & 1 == 0) {
            let len = 1u64 << self.rng.below(5);
            let g = ram_gfn(&self.layout, self.lo + self.rng.below(self.pages)) & !(len - 1);
            self.live.push((g, len));
            Op {
                gfn: g,
                n: len,
                shared: true,
            }
        } else {
            let (g, len) = self.live.swap_remove(self.rng.below(n as u64) as usize);
            Op {
                gfn: g,
                n: len,
                shared: false,
            }
        }
    }
}

/// Runs `n` churn calls on `s`; returns (seconds, per-call cycle samples, allocations made).
pub(crate) fn churn<S: Store>(
    s: &mut S,
    layout: &Layout,
    seed: u64,
    n: u64,
    samples: &mut Vec<u64>,
) -> (f64, u64) {
    let mut g = Churn::new(layout, seed);
    let a0 = ALLOCS.load(Ordering::Relaxed);
    let t = cpu_time();
    for _ in 0..n {
        let op = g.next();
        let a = rdtsc();
        s.apply(layout, op.gfn, op.n, op.shared);
        let b = rdtsc();
        if samples.len() < samples.capacity() {
            samples.push(b - a);
        }
    }
    let secs = cpu_time() - t;
    (secs, ALLOCS.load(Ordering::Relaxed) - a0)
}

pub(crate) fn w2(rep: &mut Report) {
    let pages = if rep.quick { GIB } else { 16 * GIB };
    let n_ops: u64 = if rep.quick { 200_000 } else { 10_000_000 };
    let layout = layout_for(pages);
    let mut rows = Vec::new();
    for base_n in [300u64, 10_000] {
        let base = random_ranges(&layout, layout.pages() / 2, base_n, 16, 7 + base_n);
        let seed = 99 + base_n;
        let mut samples: Vec<u64> = Vec::with_capacity(n_ops.min(2_000_000) as usize);
        let mut row = |name: &str,
                       ops: u64,
                       secs: f64,
                       samples: &mut Vec<u64>,
                       bytes: u64,
                       ranges: usize,
                       allocs: u64,
                       rep: &Report| {
            for x in samples.iter_mut() {
                *x = x.saturating_sub(rep.tsc_overhead);
            }
            let (p50, p99, max) = pcts(samples, rep.ghz);
            samples.clear();
            let ns = secs * 1e9 / ops as f64;
            rows.push(vec![
                base_n.to_string(),
                name.to_string(),
                ops.to_string(),
                f(ns),
                f(ops as f64 / secs / 1e6),
                f(p50),
                f(p99),
                f(max),
                bytes.to_string(),
                ranges.to_string(),
                f(bytes as f64 / ranges.max(1) as f64),
                f(allocs as f64 / ops as f64),
            ]);
            (ns, p50, p99)
        };
        // pagenc
        let (mut p, pb) = measure_bytes(|| {
            let mut p = Pagenc::new(layout.clone());
            build(&mut p, &layout, &base);
            p
        });
        let ((secs, allocs), pb2) =
            measure_bytes(|| churn(&mut p, &layout, seed, n_ops, &mut samples));
        let pr = p.ranges();
        let (pns, p50, p99) = row(
            "pagenc",
            n_ops,
            secs,
            &mut samples,
            pb + pb2,
            pr.len(),
            allocs,
            rep,
        );
        // B0
        let (mut b0, b0b) = measure_bytes(|| B0::new(&layout));
        build(&mut b0, &layout, &base);
        let (secs, allocs) = churn(&mut b0, &layout, seed, n_ops, &mut samples);
        row("B0", n_ops, secs, &mut samples, b0b, pr.len(), allocs, rep);
        let b0r = b0.ranges();
        drop(b0);
        // B1
        let (mut b1, b1b) = measure_bytes(|| {
            let mut b = B1::default();
            build(&mut b, &layout, &base);
            b
        });
        let ((secs, allocs), b1b2) =
            measure_bytes(|| churn(&mut b1, &layout, seed, n_ops, &mut samples));
        let (b1ns, ..) = row(
            "B1",
            n_ops,
            secs,
            &mut samples,
            b1b + b1b2,
            pr.len(),
            allocs,
            rep,
        );
        let b1r = b1.ranges();
        drop(b1);
        // rangemap
        let (mut rm, rmb) = measure_bytes(|| {
            let mut b = RangeMapSet::default();
            build(&mut b, &layout, &base);
            b
        });
        let ((secs, allocs), rmb2) =
            measure_bytes(|| churn(&mut rm, &layout, seed, n_ops, &mut samples));
        row(
            "rangemap",
            n_ops,
            secs,
            &mut samples,
            rmb + rmb2,
            pr.len(),
            allocs,
            rep,
        );
        let rmr = rm.ranges();
        drop(rm);
        rep.same_ranges(
            &format!("W2 base {base_n}"),
            &[("pagenc", pr), ("B0", b0r), ("B1", b1r), ("rangemap", rmr)],
        );
        // B2, capped: it is O(ranges) per call. Checked against B1 after the same calls.
        let b2_ops = if base_n > 1000 {
            n_ops.min(20_000)
        } else {
            n_ops.min(200_000)
        };
        let (mut b2, b2b) = measure_bytes(|| {
            let mut b = B2::default();
            build(&mut b, &layout, &base);
            b
        });
        let (secs, allocs) = churn(&mut b2, &layout, seed, b2_ops, &mut samples);
        let (b2ns, ..) = row(
            "B2 (capped)",
            b2_ops,
            secs,
            &mut samples,
            b2b,
            b2.len,
            allocs,
            rep,
        );
        let mut b1 = B1::default();
        build(&mut b1, &layout, &base);
        churn(&mut b1, &layout, seed, b2_ops, &mut Vec::new());
        rep.same_ranges(
            &format!("W2 base {base_n} (B2 run)"),
            &[("B1", b1.ranges()), ("B2", b2.ranges())],
        );
        drop(b2);
        let w = if base_n == 300 { "W2" } else { "W2-1e4" };
        if base_n == 300 {
            rep.goal(
                "W2",
                "handler p50 / Bexit(measured)",
                p50 / rep.bexit_ns,
                0.05,
                false,
            );
            rep.goal(
                "W2",
                "handler p99 / Bexit(measured)",
                p99 / rep.bexit_ns,
                0.25,
                false,
            );
            rep.goal(
                "W2",
                "handler p50 / Bexit(2530 cycles)",
                p50 / rep.bexit_const_ns,
                0.05,
                false,
            );
            rep.goal(
                "W2",
                "handler p99 / Bexit(2530 cycles)",
                p99 / rep.bexit_const_ns,
                0.25,
                false,
            );
            rep.goal(
                "W2",
                "updates per second, M (research doc)",
                1e3 / pns,
                5.0,
                true,
            );
            rep.goal(
                "W2",
                "pagenc / B1 time per call (research doc)",
                pns / b1ns,
                1.5,
                false,
            );
        } else {
            rep.goal(
                w,
                "B2 / pagenc time per call at 1e4 ranges",
                b2ns / pns,
                100.0,
                true,
            );
        }
    }
    rep.table(
        "w2",
        "W2 runtime churn: coherent alloc/free pairs over a base list (ns per call; latency from rdtsc per call)",
        &[
            "base", "structure", "calls", "ns/call", "Mcalls/s", "p50", "p99", "max", "bytes",
            "ranges", "B/range", "allocs/call",
        ],
        &rows,
    );
    // Memory goals from the rows: pagenc at most about 16 B/range and at most B1.
    let get = |base: &str, s: &str, col: usize| -> f64 {
        rows.iter()
            .find(|r| r[0] == base && r[1] == s)
            .map_or(f64::NAN, |r| r[col].parse().unwrap_or(f64::NAN))
    };
    rep.goal(
        "W2",
        "bytes per range, 300 base (about 16)",
        get("300", "pagenc", 10),
        20.0,
        false,
    );
    rep.goal(
        "W2",
        "bytes per range, 1e4 base (about 16)",
        get("10000", "pagenc", 10),
        20.0,
        false,
    );
    rep.goal(
        "W2",
        "pagenc bytes / B1 bytes, 300 base",
        get("300", "pagenc", 8) / get("300", "B1", 8),
        1.0,
        false,
    );
    rep.goal(
        "W2",
        "pagenc bytes / B1 bytes, 1e4 base",
        get("10000", "pagenc", 8) / get("10000", "B1", 8),
        1.0,
        false,
    );
    rep.goal(
        "W2",
        "allocations per call in steady state (research doc)",
        get("300", "pagenc", 11),
        0.01,
        false,
    );
}
