//! The scaling study: guest size, range count and updater sweeps, drawn as SVG.

#![allow(unused_imports)]
use crate::prelude::*;
use crate::svg;
use crate::w1::w1_trace;
use crate::w2::churn;
use crate::w3::{b0_query, scan, Dirty};
use crate::w4::{b0_runs, lookup, lookup_pagenc, random_gfns, range_hash};
use crate::w5::W5Series;

/// ns per page of a cursor pass over (at most) the first `window` pages of each RAM range.
pub(crate) fn window_scan(layout: &Layout, window: u64) -> Dirty {
    let blocks = layout
        .ranges()
        .iter()
        .map(|r| {
            let n = r.len().min(window);
            let mut words = vec![!0u64; n.div_ceil(64) as usize];
            if n % 64 != 0 {
                *words.last_mut().expect("n > 0") = (1u64 << (n % 64)) - 1;
            }
            (r.start, words)
        })
        .collect::<Vec<_>>();
    let count = blocks
        .iter()
        .map(|(_, w)| w.iter().map(|x| x.count_ones() as u64).sum::<u64>())
        .sum();
    Dirty { blocks, count }
}

pub(crate) struct Point {
    pub(crate) x: f64,
    /// (structure, lookup ns, scan ns/page, update ns, bytes)
    pub(crate) vals: Vec<(&'static str, f64, f64, f64, f64)>,
}

/// Measures pagenc, B0 and B1 holding the calls `ops` on `layout`.
pub(crate) fn scale_point(
    rep: &mut Report,
    layout: &Layout,
    ops: &[Op],
    x: f64,
    ctx: &str,
    with_b1: bool,
    upd_ops: u64,
) -> Point {
    let gfns = random_gfns(layout, 200_000, 11);
    let d = window_scan(layout, 1 << 22);
    let q = d.count as f64;
    let mut vals = Vec::new();
    // pagenc
    let (mut p, pb) = measure_bytes(|| {
        let mut p = Pagenc::new(layout.clone());
        build(&mut p, layout, ops);
        p
    });
    let (pl, _, ph) = lookup_pagenc(&p, &gfns);
    let (pt, pr) = best(3, || {
        let mut c = CursorState::new();
        scan(&d, |_, g| pagenc_cursor_shared(&mut c, &p.t, g))
    });
    let (pu, _) = churn(&mut p, layout, 5, upd_ops, &mut Vec::new());
    vals.push((
        "pagenc",
        pl,
        pt * 1e9 / q,
        pu * 1e9 / upd_ops as f64,
        pb as f64,
    ));
    let p_hash =
        p.t.with_map(|m, _| range_hash(m.shared_ranges().map(|r| (r.start, r.end))))
            .expect("usable");
    drop(p);
    // B0
    let (mut b0, b0b) = measure_bytes(|| B0::new(layout));
    build(&mut b0, layout, ops);
    let (b0l, b0h) = lookup(&b0, &gfns);
    let (b0t, b0r) = best(3, || scan(&d, |bi, g| b0_query(&b0, bi, g)));
    rep.check(b0h == ph && b0r == pr, || {
        format!("scaling {ctx}: B0 and pagenc disagree")
    });
    let (b0u, _) = churn(&mut b0, layout, 5, upd_ops, &mut Vec::new());
    rep.check(range_hash(b0_runs(&b0)) == p_hash, || {
        format!("scaling {ctx}: B0 and pagenc ranges differ after churn")
    });
    vals.push((
        "B0",
        b0l,
        b0t * 1e9 / q,
        b0u * 1e9 / upd_ops as f64,
        b0b as f64,
    ));
    drop(b0);
    if with_b1 {
        let (mut b1, b1b) = measure_bytes(|| {
            let mut b = B1::default();
            build(&mut b, layout, ops);
            b
        });
        let (b1l, b1h) = lookup(&b1, &gfns);
        let (b1t, b1r) = best(1, || scan(&d, |_, g| b1.get(g)));
        rep.check(b1h == ph && b1r == pr, || {
            format!("scaling {ctx}: B1 and pagenc disagree")
        });
        let (b1u, _) = churn(&mut b1, layout, 5, upd_ops, &mut Vec::new());
        rep.check(range_hash(b1.ranges().into_iter()) == p_hash, || {
            format!("scaling {ctx}: B1 and pagenc ranges differ after churn")
        });
        vals.push((
            "B1",
            b1l,
            b1t * 1e9 / q,
            b1u * 1e9 / upd_ops as f64,
            b1b as f64,
        ));
    }
    Point { x, vals }
}

pub(crate) fn scaling(rep: &mut Report, w5_series: &[W5Series]) -> Vec<(String, String)> {
    let mut rows = Vec::new();
    let mut by_size = Vec::new();
    let sizes: &[u64] = if rep.quick {
        &[1, 4, 16]
    } else {
        &[1, 4, 16, 64, 256, 1024, 4096]
    };
    for &gib in sizes {
        let pages = gib * GIB;
        let layout = layout_for(pages);
        let (ops, _) = w1_trace(pages, 8, 240, 42);
        let pt = scale_point(
            rep,
            &layout,
            &ops,
            gib as f64,
            &format!("{gib} GiB"),
            true,
            100_000,
        );
        by_size.push(pt);
    }
    let mut by_ranges = Vec::new();
    let (r_pages, max_r) = if rep.quick {
        (4 * GIB, 100_000u64)
    } else {
        (256 * GIB, 10_000_000)
    };
    let r_layout = layout_for(r_pages);
    let mut n = 10u64;
    while n <= max_r {
        let ops = random_ranges(&r_layout, r_layout.pages() / 2, n, 4, n + 1);
        let pt = scale_point(
            rep,
            &r_layout,
            &ops,
            n as f64,
            &format!("{n} ranges"),
            true,
            100_000,
        );
        by_ranges.push(pt);
        n *= 10;
    }
    for (label, pts) in [("guest GiB", &by_size), ("ranges", &by_ranges)] {
        for pt in pts.iter() {
            for v in &pt.vals {
                rows.push(vec![
                    label.to_string(),
                    f(pt.x),
                    v.0.to_string(),
                    f(v.1),
                    f(v.2),
                    f(v.3),
                    (v.4 as u64).to_string(),
                ]);
            }
        }
    }
    rep.table(
        "scaling",
        &format!(
            "Scaling study: random lookup ns, cursor/bit-test/point-lookup scan ns per page (first 2^22 pages of each RAM range), churn update ns, bytes. Ranges sweep on a {} guest",
            fmt_gib(r_pages)
        ),
        &["sweep", "x", "structure", "lookup_ns", "scan_ns", "update_ns", "bytes"],
        &rows,
    );
    // Plots.
    let series = |pts: &[Point], idx: usize| -> Vec<svg::Series> {
        let names: Vec<&str> = pts[0].vals.iter().map(|v| v.0).collect();
        names
            .iter()
            .map(|&name| svg::Series {
                name: name.to_string(),
                points: pts
                    .iter()
                    .filter_map(|p| {
                        p.vals.iter().find(|v| v.0 == name).map(|v| {
                            let y = [v.1, v.2, v.3, v.4][idx];
                            (p.x, y)
                        })
                    })
                    .collect(),
            })
            .collect()
    };
    let mut out = vec![
        (
            "scaling_size_lookup.svg".to_string(),
            svg::plot(
                "Random lookup vs guest size",
                "guest size (GiB)",
                "ns per lookup",
                &series(&by_size, 0),
            ),
        ),
        (
            "scaling_size_scan.svg".to_string(),
            svg::plot(
                "Sequential scan vs guest size",
                "guest size (GiB)",
                "ns per page",
                &series(&by_size, 1),
            ),
        ),
        (
            "scaling_size_memory.svg".to_string(),
            svg::plot(
                "Memory vs guest size (boot list)",
                "guest size (GiB)",
                "bytes",
                &series(&by_size, 3),
            ),
        ),
        (
            "scaling_ranges_lookup.svg".to_string(),
            svg::plot(
                "Random lookup vs ranges",
                "shared ranges",
                "ns per lookup",
                &series(&by_ranges, 0),
            ),
        ),
        (
            "scaling_ranges_scan.svg".to_string(),
            svg::plot(
                "Sequential scan vs ranges",
                "shared ranges",
                "ns per page",
                &series(&by_ranges, 1),
            ),
        ),
        (
            "scaling_ranges_update.svg".to_string(),
            svg::plot(
                "Update (churn call) vs ranges",
                "shared ranges",
                "ns per call",
                &series(&by_ranges, 2),
            ),
        ),
        (
            "scaling_ranges_memory.svg".to_string(),
            svg::plot(
                "Memory vs ranges",
                "shared ranges",
                "bytes",
                &series(&by_ranges, 3),
            ),
        ),
    ];
    let tput: Vec<svg::Series> = w5_series
        .iter()
        .map(|(n, t, _)| svg::Series {
            name: n.clone(),
            points: t.clone(),
        })
        .collect();
    let slow: Vec<svg::Series> = w5_series
        .iter()
        .map(|(n, _, s)| svg::Series {
            name: n.clone(),
            points: s.clone(),
        })
        .collect();
    out.push((
        "scaling_updaters_throughput.svg".into(),
        svg::plot(
            "Aggregate updates vs updater threads",
            "updater threads",
            "M updates/s",
            &tput,
        ),
    ));
    out.push((
        "scaling_updaters_reader.svg".into(),
        svg::plot(
            "Reader slowdown (wall clock, 2 cores) vs updater threads",
            "updater threads",
            "slowdown (x)",
            &slow,
        ),
    ));
    // Expectations of the study, printed as goals.
    let get = |pts: &[Point], i: usize, s: &str, idx: usize| {
        pts[i]
            .vals
            .iter()
            .find(|v| v.0 == s)
            .map_or(f64::NAN, |v| [v.1, v.2, v.3, v.4][idx])
    };
    let last = by_ranges.len() - 1;
    if last >= 2 {
        rep.goal(
            "scaling",
            "pagenc random lookup growth per 100x ranges (worst; research doc)",
            (2..=last)
                .map(|i| get(&by_ranges, i, "pagenc", 0) / get(&by_ranges, i - 2, "pagenc", 0))
                .fold(0.0, f64::max),
            2.0,
            false,
        );
    }
    let scans: Vec<f64> = by_ranges
        .iter()
        .enumerate()
        .map(|(i, _)| get(&by_ranges, i, "pagenc", 1))
        .collect();
    let typical: Vec<f64> = scans.iter().take(4).cloned().collect();
    rep.goal(
        "scaling",
        "pagenc cursor ns/page, max/min over guest sizes (flat; research doc)",
        by_size
            .iter()
            .enumerate()
            .map(|(i, _)| get(&by_size, i, "pagenc", 1))
            .fold(0.0, f64::max)
            / by_size
                .iter()
                .enumerate()
                .map(|(i, _)| get(&by_size, i, "pagenc", 1))
                .fold(f64::MAX, f64::min),
        1.5,
        false,
    );
    let _ = typical;
    out.iter_mut().for_each(|_| {});
    out
}
