//! W4: hostile fragmentation (every other page, random toggles, sawtooth).

#![allow(unused_imports)]
use crate::prelude::*;

/// Applies the calls, timing each one (every 16th kept for the percentiles; the max over all).
pub(crate) fn run_hostile<S: Store>(
    s: &mut S,
    layout: &Layout,
    ops: impl Iterator<Item = Op>,
    samples: &mut Vec<u64>,
) -> (f64, u64, u64) {
    let mut max = 0u64;
    let mut n = 0u64;
    let t = cpu_time();
    for op in ops {
        let a = rdtsc();
        s.apply(layout, op.gfn, op.n, op.shared);
        let d = rdtsc() - a;
        max = max.max(d);
        if n % 16 == 0 {
            samples.push(d);
        }
        n += 1;
    }
    (cpu_time() - t, max, n)
}

/// A hash of the shared ranges, streamed (1 TiB guests have 10^8 ranges: no vectors).
pub(crate) fn range_hash(it: impl Iterator<Item = (u64, u64)>) -> (u64, u64) {
    let (mut n, mut h) = (0u64, 0u64);
    for (a, b) in it {
        n += 1;
        h = (h ^ a).wrapping_mul(0x100_0000_01b3).rotate_left(17) ^ b;
    }
    (n, h)
}

pub(crate) fn b0_runs(b0: &B0) -> impl Iterator<Item = (u64, u64)> + '_ {
    // Per 64-page word; runs that cross words are merged by the caller's coalescing wrapper.
    let mut pending: Option<(u64, u64)> = None;
    let mut out = b0.blocks.iter().flat_map(|(start, end, words)| {
        words.iter().enumerate().flat_map(move |(w, &word)| {
            let mut v: Vec<(u64, u64)> = Vec::new();
            let mut x = word;
            while x != 0 {
                let s = x.trailing_zeros() as u64;
                let len = ((!(x >> s)).trailing_zeros() as u64).min(64 - s);
                let a = start + w as u64 * 64 + s;
                v.push((a, (a + len).min(*end)));
                x = if s + len >= 64 {
                    0
                } else {
                    x & !(((1u64 << len) - 1) << s)
                };
            }
            v
        })
    });
    std::iter::from_fn(move || loop {
        match out.next() {
            Some((a, b)) => match &mut pending {
                Some(p) if p.1 == a => p.1 = b,
                _ => {
                    if let Some(done) = pending.replace((a, b)) {
                        return Some(done);
                    }
                }
            },
            None => return pending.take(),
        }
    })
}

/// Random RAM gfns for lookups.
pub(crate) fn random_gfns(layout: &Layout, n: usize, seed: u64) -> Vec<u64> {
    let mut rng = Rng(seed);
    (0..n)
        .map(|_| ram_gfn(layout, rng.below(layout.pages())))
        .collect()
}

/// ns per random lookup: pagenc on its map (one lock for the batch) and through Tracker::state.
pub(crate) fn lookup_pagenc(p: &Pagenc, gfns: &[u64]) -> (f64, f64, u64) {
    let (t, hits) = best(3, || {
        p.t.with_map(|m, _| {
            gfns.iter()
                .filter(|&&g| m.state(g) == PageState::Shared)
                .count() as u64
        })
        .expect("tracker usable")
    });
    let (t2, hits2) = best(1, || gfns.iter().filter(|&&g| p.get(g)).count() as u64);
    assert_eq!(hits, hits2);
    (
        t * 1e9 / gfns.len() as f64,
        t2 * 1e9 / gfns.len() as f64,
        hits,
    )
}

pub(crate) fn lookup<S: Store>(s: &S, gfns: &[u64]) -> (f64, u64) {
    let (t, hits) = best(3, || gfns.iter().filter(|&&g| s.get(g)).count() as u64);
    (t * 1e9 / gfns.len() as f64, hits)
}

pub(crate) fn w4(rep: &mut Report) {
    let guests: &[u64] = if rep.quick {
        &[GIB]
    } else {
        &[16 * GIB, 1024 * GIB]
    };
    let toggles: u64 = if rep.quick { 100_000 } else { 10_000_000 };
    let mut rows = Vec::new();
    let mut worst_mem: f64 = 0.0;
    let mut worst_real: f64 = 0.0;
    let mut worst_max_call: f64 = 0.0;
    let mut worst_lookup: f64 = 0.0;
    let mut build_2m = f64::NAN;
    for &pages in guests {
        let layout = layout_for(pages);
        let gfns = random_gfns(&layout, 1_000_000, 3);
        for pattern in ["alternate", "toggles", "sawtooth"] {
            let mut samples = Vec::with_capacity((pages / 16) as usize + 1_000_000);
            let (mut p, pb, pr) = measure_real(|| Pagenc::new(layout.clone()));
            let ((secs, max, calls), pb2, pr2) = measure_real(|| {
                run_hostile(
                    &mut p,
                    &layout,
                    hostile_ops(&layout, pattern, toggles),
                    &mut samples,
                )
            });
            for x in samples.iter_mut() {
                *x = x.saturating_sub(rep.tsc_overhead);
            }
            let (p50, p99, _) = pcts(&mut samples, rep.ghz);
            let pmax = max as f64 / rep.ghz;
            samples.clear();
            samples.shrink_to_fit();
            let pbytes = pb + pb2;
            // Issue 12: what malloc really spends, against a bitmap of RAM (1 bit per page).
            let real_vs_bitmap = (pr + pr2) as f64 / (layout.pages() / 8) as f64;
            worst_real = worst_real.max(real_vs_bitmap);
            let (mut b0, b0b) = measure_bytes(|| B0::new(&layout));
            let (b0secs, b0max, _) = run_hostile(
                &mut b0,
                &layout,
                hostile_ops(&layout, pattern, toggles),
                &mut Vec::new(),
            );
            let (pn, n) =
                p.t.with_map(|m, _| range_hash(m.shared_ranges().map(|r| (r.start, r.end))))
                    .expect("usable");
            let bn = range_hash(b0_runs(&b0));
            rep.check((pn, n) == bn, || {
                format!(
                    "W4 {pattern} {}: pagenc has {pn} ranges (hash {n:x}), B0 {} ({:x})",
                    fmt_gib(pages),
                    bn.0,
                    bn.1
                )
            });
            let (pl, pl_t, hits) = lookup_pagenc(&p, &gfns);
            let (b0l, b0hits) = lookup(&b0, &gfns);
            rep.check(hits == b0hits, || {
                format!("W4 {pattern}: lookups disagree, pagenc {hits} B0 {b0hits}")
            });
            // B1 only where it fits in memory and time (16 GiB: about 2M ranges).
            let (b1secs, b1b, b1l) = if pages <= 16 * GIB {
                let (mut b1, b1b) = measure_bytes(B1::default);
                let ((s, _, _), b1b2) = measure_bytes(|| {
                    run_hostile(
                        &mut b1,
                        &layout,
                        hostile_ops(&layout, pattern, toggles),
                        &mut Vec::new(),
                    )
                });
                let (l, h) = lookup(&b1, &gfns);
                rep.check(
                    range_hash(b1.ranges().into_iter()) == bn && h == b0hits,
                    || format!("W4 {pattern}: B1 disagrees with B0"),
                );
                (s, (b1b + b1b2) as f64, l)
            } else {
                (f64::NAN, f64::NAN, f64::NAN)
            };
            let mem = pbytes as f64 / (1.25 * b0b as f64 + 65536.0);
            worst_mem = worst_mem.max(mem);
            worst_max_call = worst_max_call.max(pmax);
            worst_lookup = worst_lookup.max(pl / b0l);
            if pattern == "alternate" && pages == 16 * GIB {
                build_2m = secs;
            }
            rows.push(vec![
                fmt_gib(pages),
                pattern.to_string(),
                calls.to_string(),
                pn.to_string(),
                f(secs),
                f(p50),
                f(p99),
                f(pmax),
                pbytes.to_string(),
                b0b.to_string(),
                f(pbytes as f64 / b0b as f64),
                f(real_vs_bitmap),
                f(b1b),
                f(pl),
                f(pl_t),
                f(b0l),
                f(b1l),
                f(b0secs),
                f(b0max as f64 / rep.ghz),
                f(b1secs),
            ]);
            drop(b0);
            drop(p);
        }
    }
    rep.table(
        "w4",
        "W4 hostile fragmentation (build s = all calls, CPU time; p50/p99/max ns per call, B0_max the same for B0; lookups ns, random RAM pages, lookup_locked through Tracker::state; B1 skipped at 1 TiB: 10^8 ranges)",
        &[
            "guest", "pattern", "calls", "ranges", "build_s", "p50", "p99", "max", "pagenc_B",
            "B0_B", "pagenc/B0", "real/bitmap", "B1_B", "lookup", "lookup_locked", "B0_lookup", "B1_lookup",
            "B0_build_s", "B0_max", "B1_build_s",
        ],
        &rows,
    );
    rep.goal(
        "W4",
        "pagenc bytes / (1.25 x B0 + 64 KiB) (worst)",
        worst_mem,
        1.0,
        false,
    );
    rep.goal(
        "W4",
        "pagenc real footprint / bitmap of RAM (malloc_usable_size; worst; issue 12: RAM/8 + 1 %)",
        worst_real,
        1.01,
        false,
    );
    rep.goal(
        "W4",
        "slowest single call / Bexit(measured) (research doc)",
        worst_max_call / rep.bexit_ns,
        1.0,
        false,
    );
    rep.goal(
        "W4",
        "slowest single call / Bexit(2530 cycles) (research doc)",
        worst_max_call / rep.bexit_const_ns,
        1.0,
        false,
    );
    rep.goal(
        "W4",
        "random lookup / B0 (worst) (research doc)",
        worst_lookup,
        2.0,
        false,
    );
    if build_2m.is_finite() {
        rep.goal(
            "W4",
            "building 2M fragments (16 GiB alternate), s (research doc)",
            build_2m,
            1.0,
            false,
        );
    }
}
