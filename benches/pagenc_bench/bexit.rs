//! Bexit: the KVM exit round trip every handler goal divides by.

#![allow(unused_imports)]
use crate::kvmexit;
use crate::prelude::*;

pub(crate) fn bexit(rep: &mut Report) {
    let mut rows = Vec::new();
    let mut chosen: Option<(f64, String)> = None;
    let iters = if rep.quick { 2_000 } else { 50_000 };
    let budget = if rep.quick { 0.3 } else { 3.0 };
    for kind in [kvmexit::ExitKind::Wrmsr, kvmexit::ExitKind::Pio] {
        match kvmexit::measure(kind, iters, budget) {
            Ok(mut s) => {
                let n = s.cycles.len();
                let (p50, p99, max) = pcts(&mut s.cycles, rep.ghz);
                rows.push(vec![
                    format!("{:?}", s.kind),
                    n.to_string(),
                    f(p50),
                    f(p99),
                    f(max),
                    f(p50 * rep.ghz),
                ]);
                if chosen.is_none() {
                    chosen = Some((
                        p50,
                        format!("measured: {:?} exit round trip p50 over {n} exits", s.kind),
                    ));
                }
            }
            Err(e) => rows.push(vec![
                format!("{kind:?}"),
                "0".into(),
                e,
                String::new(),
                String::new(),
                String::new(),
            ]),
        }
    }
    rows.push(vec![
        "constant".into(),
        "-".into(),
        f(rep.bexit_const_ns),
        String::new(),
        String::new(),
        "2530".into(),
    ]);
    match chosen {
        Some((ns, src)) => {
            rep.bexit_ns = ns;
            rep.bexit_source = src;
        }
        None => {
            rep.bexit_ns = rep.bexit_const_ns;
            rep.bexit_source = "constant: 2530 cycles (no working /dev/kvm)".into();
        }
    }
    rep.table(
        "bexit",
        &format!(
            "Bexit: KVM_RUN round trip of a 1-vCPU guest looping on an exit (ns); using {}",
            rep.bexit_source
        ),
        &["exit", "samples", "p50", "p99", "max", "p50_cycles"],
        &rows,
    );
}
