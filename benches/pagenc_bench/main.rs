//! pagenc against a bitmap (B0), a BTreeMap range set (B1), the rangemap crate, AMD's 2021
//! linked list (B2) and a real KVM exit (Bexit), in one process on the same data.
//!
//! `cargo bench --bench pagenc_bench` runs the full study (the numbers of docs/performance.md);
//! `cargo bench --bench pagenc_bench -- --quick` runs small sizes in a few seconds (CI, via
//! `make check-bench`). Timing never fails the run; a disagreement between the structures does
//! (exit status 1), since every structure must give the same answer to every query.
//!
//! Output: a table per workload on stdout, target/bench/results.json, and SVG plots of the
//! scaling study in target/bench/.
//!
//! One module per workload (w1.rs .. w6.rs, stall.rs, scaling.rs), beside the structures they
//! compare (baselines.rs), the KVM exit (kvmexit.rs, bexit.rs) and what they share (alloc.rs,
//! common.rs, report.rs).

mod alloc;
mod baselines;
mod bexit;
mod common;
mod kvmexit;
mod qemu_path;
mod report;
mod scaling;
mod stall;
mod svg;
mod w1;
mod w2;
mod w3;
mod w4;
mod w5;
mod w6;

/// What every workload module uses: std, pagenc, the baselines and the shared helpers.
mod prelude {
    pub(crate) use std::fmt::Write as _;
    pub(crate) use std::hint::black_box;
    pub(crate) use std::path::PathBuf;
    pub(crate) use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
    pub(crate) use std::sync::Mutex;
    pub(crate) use std::time::{Duration, Instant};

    pub(crate) use pagenc::core::PageRange;
    pub(crate) use pagenc::tracker::CursorState;
    pub(crate) use pagenc::{Layout, PageState, RamRange};

    pub(crate) use crate::alloc::*;
    pub(crate) use crate::baselines::{
        pagenc_cursor_shared, Pagenc, RangeMapSet, Store, B0, B1, B2,
    };
    pub(crate) use crate::common::*;
    pub(crate) use crate::report::*;
}

use prelude::*;
use w2::churn;
use w3::{make_dirty, scan};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    if !quick && !args.iter().any(|a| a == "--bench") {
        // `cargo test --all-targets` runs bench binaries without arguments, in the debug
        // profile: building is the test there; `make check-bench` runs the quick mode.
        println!(
            "pagenc_bench: built; run it with `cargo bench --bench pagenc_bench [-- --quick]`"
        );
        return;
    }
    let only: Option<String> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1).cloned());
    let run = |w: &str| only.as_deref().is_none_or(|o| o.split(',').any(|x| x == w));
    let t0 = Instant::now();
    let ghz = tsc_ghz();
    let mut rep = Report {
        quick,
        ghz,
        tsc_overhead: rdtsc_overhead(),
        bexit_ns: 0.0,
        bexit_source: String::new(),
        bexit_const_ns: 2530.0 / ghz,
        sections: Vec::new(),
        goals: Vec::new(),
        errors: Vec::new(),
    };
    println!(
        "pagenc_bench ({} mode): TSC {:.3} GHz, rdtsc pair {} cycles (subtracted from per-call samples), {} CPUs, load average {}",
        if quick { "quick" } else { "full" },
        ghz,
        rep.tsc_overhead,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
    );
    if only.as_deref() == Some("micro") {
        // Profiling aid: the W3 cursor over 1e5 ranges at 1 % dirty, in a loop.
        let layout = layout_for(16 * GIB);
        let mut p = Pagenc::new(layout.clone());
        build(
            &mut p,
            &layout,
            &random_ranges(&layout, layout.pages(), 100_000, 256, 100_000),
        );
        let d = make_dirty(&layout, 1, 1);
        let (t, _) = best(200, || {
            let mut c = CursorState::new();
            scan(&d, |_, g| pagenc_cursor_shared(&mut c, &p.t, g))
        });
        println!("micro: {} ns per queried page", f(t * 1e9 / d.count as f64));
        return;
    }
    if only.as_deref() == Some("micro-hostile") {
        // Profiling aid: the W3 cursor over the hostile every-other-page list at 10 % dirty.
        let layout = layout_for(16 * GIB);
        let p = Pagenc::new(layout.clone());
        for r in layout.ranges() {
            for g in (r.start..r.end).step_by(2) {
                p.call(g, 1, true);
            }
        }
        let d = make_dirty(&layout, 10, 10);
        let (t, _) = best(20, || {
            let mut c = CursorState::new();
            scan(&d, |_, g| pagenc_cursor_shared(&mut c, &p.t, g))
        });
        println!(
            "micro-hostile: {} ns per queried page",
            f(t * 1e9 / d.count as f64)
        );
        return;
    }
    if only.as_deref() == Some("micro-churn") {
        // Profiling aid: the W2 hypercall path, 300 base ranges.
        let layout = layout_for(16 * GIB);
        let mut p = Pagenc::new(layout.clone());
        build(
            &mut p,
            &layout,
            &random_ranges(&layout, layout.pages() / 2, 300, 16, 307),
        );
        let (secs, _) = churn(&mut p, &layout, 399, 5_000_000, &mut Vec::new());
        println!("micro-churn: {} ns per call", f(secs * 1e9 / 5e6));
        return;
    }
    bexit::bexit(&mut rep);
    if run("w1") {
        w1::w1(&mut rep);
    }
    if run("w2") {
        w2::w2(&mut rep);
    }
    if run("w3") {
        w3::w3(&mut rep);
    }
    if run("w4") {
        w4::w4(&mut rep);
    }
    let mut w5s = Vec::new();
    if run("w5") {
        w5s = w5::w5(&mut rep);
    }
    if run("w6") {
        w6::w6(&mut rep);
    }
    if run("stall") {
        stall::stall(&mut rep);
    }
    let mut plots = Vec::new();
    if run("scaling") {
        plots = scaling::scaling(&mut rep, &w5s);
    }

    // Summary of goals.
    println!("\n== Goals");
    let mut goal_rows = Vec::new();
    for g in &rep.goals {
        goal_rows.push(vec![
            g.workload.to_string(),
            g.what.clone(),
            f(g.measured),
            format!("{} {}", if g.at_least { ">=" } else { "<=" }, f(g.limit)),
            if g.pass { "PASS" } else { "MISS" }.to_string(),
        ]);
    }
    let goals_json = J::A(
        rep.goals
            .iter()
            .map(|g| {
                J::O(vec![
                    ("workload".into(), J::S(g.workload.into())),
                    ("goal".into(), J::S(g.what.clone())),
                    ("measured".into(), J::N(g.measured)),
                    ("limit".into(), J::N(g.limit)),
                    ("at_least".into(), J::B(g.at_least)),
                    ("pass".into(), J::B(g.pass)),
                ])
            })
            .collect(),
    );
    rep.table(
        "goals_table",
        "Goals (ratio or value, limit, verdict)",
        &["workload", "goal", "measured", "limit", "verdict"],
        &goal_rows,
    );

    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    let _ = std::fs::create_dir_all(&dir);
    let mut top = vec![
        (
            "mode".to_string(),
            J::S(if quick { "quick" } else { "full" }.into()),
        ),
        ("tsc_ghz".into(), J::N(ghz)),
        ("bexit_ns".into(), J::N(rep.bexit_ns)),
        ("bexit_source".into(), J::S(rep.bexit_source.clone())),
        ("bexit_const_ns".into(), J::N(rep.bexit_const_ns)),
        ("seconds".into(), J::N(t0.elapsed().as_secs_f64())),
        (
            "cross_check_errors".into(),
            J::A(rep.errors.iter().map(|e| J::S(e.clone())).collect()),
        ),
        ("goals".into(), goals_json),
    ];
    top.extend(rep.sections.iter().cloned());
    let mut s = String::new();
    J::O(top).write(&mut s);
    s.push('\n');
    let path = dir.join("results.json");
    match std::fs::write(&path, s) {
        Ok(()) => println!("\nwrote {}", path.display()),
        Err(e) => println!("\ncould not write {}: {e}", path.display()),
    }
    for (name, body) in &plots {
        let p = dir.join(name);
        if let Err(e) = std::fs::write(&p, body) {
            println!("could not write {}: {e}", p.display());
        }
    }
    if !plots.is_empty() {
        println!("wrote {} plots to {}", plots.len(), dir.display());
    }
    let misses = rep.goals.iter().filter(|g| !g.pass).count();
    println!(
        "{} goals, {} met, {} missed (timing never fails the run); {} cross-check failures; {:.1} s",
        rep.goals.len(),
        rep.goals.len() - misses,
        misses,
        rep.errors.len(),
        t0.elapsed().as_secs_f64()
    );
    if !rep.errors.is_empty() {
        for e in &rep.errors {
            eprintln!("cross-check failed: {e}");
        }
        std::process::exit(1);
    }
}
