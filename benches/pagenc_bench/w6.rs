//! W6: the migration stream, save and load with full validation.

#![allow(unused_imports)]
use crate::prelude::*;

pub(crate) fn w6(rep: &mut Report) {
    let pages = if rep.quick { GIB } else { 16 * GIB };
    let layout = layout_for(pages);
    let mut lists: Vec<(String, Vec<Op>)> = [300u64, 100_000]
        .iter()
        .filter(|&&n| !rep.quick || n <= 10_000 || n == 100_000)
        .map(|&n| {
            (
                n.to_string(),
                random_ranges(&layout, layout.pages(), n, 64, 77 + n),
            )
        })
        .collect();
    let hostile: Vec<Op> = hostile_ops(&layout, "alternate", 0).collect();
    lists.push((format!("hostile {}", hostile.len()), hostile));
    let mut rows = Vec::new();
    let (mut worst_load, mut worst_save, mut worst_bpr) = (f64::MAX, f64::MAX, 0.0f64);
    let mut hostile_vs_bitmap = f64::NAN;
    for (name, ops) in &lists {
        let mut src = Pagenc::new(layout.clone());
        build(&mut src, &layout, ops);
        let ranges = src.ranges();
        let n = ranges.len() as f64;
        let (save_t, bytes) = best(3, || pagenc::stream::save_to_vec(&src.t).expect("save"));
        let dst = Pagenc::new(layout.clone());
        let (load_t, ()) = best(3, || pagenc::stream::load(&dst.t, &bytes).expect("load"));
        let (dec_t, _) = best(3, || {
            pagenc::stream::decode(&layout, &bytes).expect("decode")
        });
        rep.same_ranges(
            &format!("W6 {name}"),
            &[("source", ranges.clone()), ("loaded", dst.ranges())],
        );
        // A corrupted stream must be refused or give some valid map, never panic.
        let mut bad = bytes.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x5a;
        let probe = Pagenc::new(layout.clone());
        let _ = pagenc::stream::load(&probe.t, &bad);
        bad.truncate(bad.len() - 1);
        rep.check(pagenc::stream::load(&probe.t, &bad).is_err(), || {
            format!("W6 {name}: a truncated stream was accepted")
        });
        let bitmap = pages / 8;
        let amd = 12.0 * n + 4.0;
        let bpr = bytes.len() as f64 / n;
        worst_load = worst_load.min(n / load_t / 1e6);
        worst_save = worst_save.min(n / save_t / 1e6);
        worst_bpr = worst_bpr.max(bpr);
        if name.starts_with("hostile") {
            hostile_vs_bitmap = bytes.len() as f64 / (bitmap as f64 + 56.0);
        }
        rows.push(vec![
            name.clone(),
            ranges.len().to_string(),
            bytes.len().to_string(),
            f(bpr),
            f(amd),
            bitmap.to_string(),
            f(save_t * 1e3),
            f(n / save_t / 1e6),
            f(dec_t * 1e3),
            f(load_t * 1e3),
            f(n / load_t / 1e6),
        ]);
    }
    rep.table(
        "w6",
        &format!(
            "W6 stream save/load on a {} guest (save_to_vec; load = decode with full validation + replace; AMD = its be32 CONT/start/end format, 12 B/range)",
            fmt_gib(pages)
        ),
        &[
            "list", "ranges", "bytes", "B/range", "AMD_bytes", "bitmap_bytes", "save_ms",
            "save_Mranges/s", "decode_ms", "load_ms", "load_Mranges/s",
        ],
        &rows,
    );
    rep.goal(
        "W6",
        "load with full validation, M ranges/s (slowest list)",
        worst_load,
        20.0,
        true,
    );
    rep.goal(
        "W6",
        "stream bytes per range (worst list)",
        worst_bpr,
        16.0,
        false,
    );
    rep.goal(
        "W6",
        "save, M ranges/s (slowest list; research doc)",
        worst_save,
        50.0,
        true,
    );
    rep.goal(
        "W6",
        "hostile stream / (bitmap + 56 B header), 1 % allowed for record headers (research doc)",
        hostile_vs_bitmap,
        1.01,
        false,
    );
}
