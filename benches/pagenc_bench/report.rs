//! Report: printed tables, target/bench/results.json, and the goal verdicts.

#![allow(unused_imports)]
use crate::prelude::*;

#[derive(Clone)]
pub(crate) enum J {
    N(f64),
    S(String),
    B(bool),
    A(Vec<J>),
    O(Vec<(String, J)>),
}

impl J {
    pub(crate) fn write(&self, out: &mut String) {
        match self {
            J::N(v) if v.is_finite() => {
                let _ = write!(out, "{v}");
            }
            J::N(_) => out.push_str("null"),
            J::B(b) => {
                let _ = write!(out, "{b}");
            }
            J::S(s) => {
                out.push('"');
                for c in s.chars() {
                    match c {
                        '"' => out.push_str("\\\""),
                        '\\' => out.push_str("\\\\"),
                        '\n' => out.push_str("\\n"),
                        c if (c as u32) < 0x20 => {
                            let _ = write!(out, "\\u{:04x}", c as u32);
                        }
                        c => out.push(c),
                    }
                }
                out.push('"');
            }
            J::A(v) => {
                out.push('[');
                for (i, x) in v.iter().enumerate() {
                    if i > 0 {
                        out.push_str(",\n");
                    }
                    x.write(out);
                }
                out.push(']');
            }
            J::O(v) => {
                out.push('{');
                for (i, (k, x)) in v.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    J::S(k.clone()).write(out);
                    out.push_str(": ");
                    x.write(out);
                }
                out.push('}');
            }
        }
    }
}

pub(crate) struct Goal {
    pub(crate) workload: &'static str,
    pub(crate) what: String,
    pub(crate) measured: f64,
    pub(crate) limit: f64,
    /// True when the goal is "at least `limit`".
    pub(crate) at_least: bool,
    pub(crate) pass: bool,
}

pub(crate) struct Report {
    pub(crate) quick: bool,
    pub(crate) ghz: f64,
    pub(crate) tsc_overhead: u64,
    /// Bexit round trip (p50) in ns, and where it came from.
    pub(crate) bexit_ns: f64,
    pub(crate) bexit_source: String,
    /// AMD's bare-metal 2,530-cycle figure converted with this TSC.
    pub(crate) bexit_const_ns: f64,
    pub(crate) sections: Vec<(String, J)>,
    pub(crate) goals: Vec<Goal>,
    pub(crate) errors: Vec<String>,
}

impl Report {
    pub(crate) fn table(&mut self, key: &str, title: &str, head: &[&str], rows: &[Vec<String>]) {
        let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
        for r in rows {
            for (i, c) in r.iter().enumerate() {
                w[i] = w[i].max(c.len());
            }
        }
        println!("\n== {title}");
        let line = |cells: Vec<&str>| {
            let mut s = String::new();
            for (i, c) in cells.iter().enumerate() {
                let _ = write!(s, "{:>width$}  ", c, width = w[i]);
            }
            println!("{}", s.trim_end());
        };
        line(head.to_vec());
        for r in rows {
            line(r.iter().map(|s| s.as_str()).collect());
        }
        let json_rows = rows
            .iter()
            .map(|r| {
                J::O(
                    head.iter()
                        .zip(r)
                        .map(|(h, c)| {
                            let v = c.parse::<f64>().map(J::N).unwrap_or(J::S(c.clone()));
                            (h.to_string(), v)
                        })
                        .collect(),
                )
            })
            .collect();
        self.sections.push((
            key.to_string(),
            J::O(vec![
                ("title".into(), J::S(title.into())),
                ("rows".into(), J::A(json_rows)),
            ]),
        ));
    }

    pub(crate) fn goal(
        &mut self,
        workload: &'static str,
        what: &str,
        measured: f64,
        limit: f64,
        at_least: bool,
    ) {
        let pass = if at_least {
            measured >= limit
        } else {
            measured <= limit
        };
        println!(
            "   goal [{}] {}: {} {} {} -> {}",
            workload,
            what,
            f(measured),
            if at_least { ">=" } else { "<=" },
            f(limit),
            if pass { "PASS" } else { "MISS" }
        );
        self.goals.push(Goal {
            workload,
            what: what.to_string(),
            measured,
            limit,
            at_least,
            pass,
        });
    }

    pub(crate) fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            let m = what();
            println!("   CROSS-CHECK FAILED: {m}");
            self.errors.push(m);
        }
    }

    /// All structures must hold exactly the same ranges.
    pub(crate) fn same_ranges(&mut self, ctx: &str, sets: &[(&str, Vec<(u64, u64)>)]) {
        let (n0, r0) = &sets[0];
        for (n, r) in &sets[1..] {
            self.check(r == r0, || {
                let i = r0.iter().zip(r).position(|(a, b)| a != b).unwrap_or(r0.len().min(r.len()));
                format!(
                    "{ctx}: {n} holds {} ranges, {n0} {}; first difference at index {i}: {:?} vs {:?}",
                    r.len(),
                    r0.len(),
                    r.get(i),
                    r0.get(i)
                )
            });
        }
    }
}

/// A number for a table: 3 significant digits.
pub(crate) fn f(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 1e6 {
        format!("{v:.3e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}
