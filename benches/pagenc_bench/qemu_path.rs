//! W3 as QEMU runs it: the series' per-page path (its run cache in backends/pagenc.c, a call
//! through the C ABI when a run ends), in C, against the libpagenc.a cargo just built.
//!
//! The bench writes the layout, the guest calls and the dirty bitmaps to a file, compiles
//! `qemu_path.c` with the system C compiler (`cc`, as QEMU's build would) against the staticlib
//! and include/pagenc.h, and runs it (niced). The C program measures the walk alone, the walk
//! with a bit test, and the walk with the series' path in one process, so its ratios are as
//! good as the Rust ones; it exits non-zero when its answers disagree. Without a C compiler
//! the table says so and the run goes on (a missing tool is not a wrong answer).

#![allow(unused_imports)]
use crate::prelude::*;
use crate::w3::Dirty;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One dirty fraction, ns per queried page, as the C program printed it.
pub(crate) struct QemuRow {
    pub(crate) pct: u64,
    pub(crate) pages: u64,
    pub(crate) loop_ns: f64,
    pub(crate) b0_ns: f64,
    pub(crate) qemu_ns: f64,
    pub(crate) abi_ns: f64,
    pub(crate) call_ns: f64,
    pub(crate) shared: u64,
}

/// The staticlib of this build: cargo puts it two levels above the bench executable
/// (target/<profile>/deps/pagenc_bench-*).
fn staticlib() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let lib = exe.parent()?.parent()?.join("libpagenc.a");
    lib.exists().then_some(lib)
}

/// Compiles the C program once per bench run; the error says what is missing.
pub(crate) fn compile(out_dir: &Path) -> Result<PathBuf, String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let lib = staticlib().ok_or("no libpagenc.a next to the bench executable")?;
    let exe = out_dir.join("qemu_path");
    let mut cmd = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()));
    cmd.args(["-O2", "-std=gnu11", "-Wall", "-I"])
        .arg(root.join("include"))
        .arg(root.join("benches/pagenc_bench/qemu_path.c"))
        .arg(&lib)
        // What libpagenc.a needs (meson.options: native_static_libs).
        .args([
            "-lgcc_s",
            "-lutil",
            "-lrt",
            "-lpthread",
            "-lm",
            "-ldl",
            "-lc",
        ])
        .arg("-o")
        .arg(&exe);
    match cmd.output() {
        Ok(o) if o.status.success() => Ok(exe),
        Ok(o) => Err(format!(
            "cc failed: {}",
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .take(5)
                .collect::<Vec<_>>()
                .join(" | ")
        )),
        Err(e) => Err(format!("no C compiler ({e})")),
    }
}

/// Runs the series' path over one list: the RAM ranges are one RAMBlock (pc.ram), its pages in
/// layout order, the dirty bitmaps the same pages as the Rust scan's.
pub(crate) fn measure(
    exe: &Path,
    layout: &Layout,
    ops: &[Op],
    dirties: &[(u64, Dirty)],
    reps: u64,
    tag: &str,
) -> Result<Vec<QemuRow>, String> {
    let input = exe.with_file_name(format!("qemu_path_{tag}.bin"));
    let mut buf: Vec<u8> = Vec::new();
    let mut put = |v: u64| buf.extend_from_slice(&v.to_le_bytes());
    put(0x7061_6765_6e63_3031);
    put(reps);
    put(layout.ranges().len() as u64);
    for r in layout.ranges() {
        put(r.start << 12);
        put(r.len() << 12);
    }
    put(ops.len() as u64);
    for op in ops {
        put(op.gfn);
        put(op.n);
        put(op.shared as u64);
    }
    put(dirties.len() as u64);
    for (pct, d) in dirties {
        // The RAM ranges' bitmaps one after the other: every range but the last is a
        // multiple of 64 pages on these layouts, so the words concatenate.
        let words: Vec<u64> = d
            .blocks
            .iter()
            .flat_map(|(_, w)| w.iter().copied())
            .collect();
        put(*pct);
        put(words.len() as u64);
        for w in words {
            put(w);
        }
    }
    std::fs::File::create(&input)
        .and_then(|mut f| f.write_all(&buf))
        .map_err(|e| format!("writing {}: {e}", input.display()))?;
    let out = Command::new("nice")
        .args(["-n", "5"])
        .arg(exe)
        .arg(&input)
        .output()
        .map_err(|e| format!("running {}: {e}", exe.display()))?;
    let _ = std::fs::remove_file(&input);
    if !out.status.success() {
        return Err(format!(
            "qemu_path exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut rows = Vec::new();
    for line in text.lines() {
        let kv = |k: &str| -> Result<f64, String> {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{k}=")))
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("qemu_path printed {line:?}, without {k}="))
        };
        rows.push(QemuRow {
            pct: kv("pct")? as u64,
            pages: kv("pages")? as u64,
            loop_ns: kv("loop")?,
            b0_ns: kv("b0")?,
            qemu_ns: kv("qemu")?,
            abi_ns: kv("abi")?,
            call_ns: kv("call")?,
            shared: kv("shared")? as u64,
        });
    }
    Ok(rows)
}
