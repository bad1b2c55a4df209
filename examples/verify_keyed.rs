//! The keyed-mode verifier as a command (`pagenc::transport::Verifier`), for tests that migrate
//! real QEMUs through the simulated SEV firmware with a different memory key per side
//! (tests/e2e, scripts/demo.py):
//!
//! ```text
//! cargo run --release --example verify_keyed -- \
//!     --src-key HEX64 --dst-key HEX64 --shared FILE \
//!     --range GPA SRC_DUMP DST_DUMP [--range GPA SRC_DUMP DST_DUMP ...]
//! ```
//!
//! - `--src-key`, `--dst-key`: the two simulated memory keys, 64 hex digits each (32 bytes).
//! - `--shared FILE`: the final page list's shared ranges, one `GPA SIZE` pair a line (decimal
//!   or 0x-hex, bytes; `#` starts a comment), e.g. from `query-pagenc` with `ranges: true`.
//! - `--range GPA SRC DST`: a guest-RAM range dumped from both sides (QEMU's `pmemsave` of the
//!   same guest-physical range), starting at `GPA`. Only guest RAM: not ROM, VRAM or MMIO, and
//!   not RAM hidden by an overlay at the time of the dump (pmemsave reads through the flat view).
//!
//! Prints `verify-keyed: pages N shared-ok N encrypted-ok N mismatches N` and up to 64
//! mismatching pages, each saying what the list demands and what the destination holds.
//! Exit status: 0 every page as the list says, 1 mismatches, 2 bad arguments or unreadable dumps.

use std::fs::File;
use std::io::{self, Read};
use std::process::ExitCode;

use pagenc::transport::{Verifier, VerifyError};

const CHUNK: usize = 1 << 20;

struct Args {
    src_key: [u8; 32],
    dst_key: [u8; 32],
    shared: Vec<(u64, u64)>,
    ranges: Vec<(u64, String, String)>,
}

fn parse_u64(s: &str, what: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|e| format!("{what} {s:?} is not a number (decimal or 0x-hex): {e}"))
}

fn parse_key(s: &str, what: &str) -> Result<[u8; 32], String> {
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "{what} must be 64 hex digits (32 bytes); got {} characters",
            s.len()
        ));
    }
    let mut k = [0u8; 32];
    for (i, b) in k.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|e| format!("{what}: {e}"))?;
    }
    Ok(k)
}

fn parse_shared(path: &str) -> Result<Vec<(u64, u64)>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("--shared {path}: {e}"))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() != 2 {
            return Err(format!(
                "--shared {path} line {}: {line:?}: want two fields, GPA SIZE",
                n + 1
            ));
        }
        out.push((
            parse_u64(f[0], &format!("{path}:{} gpa", n + 1))?,
            parse_u64(f[1], &format!("{path}:{} size", n + 1))?,
        ));
    }
    Ok(out)
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let (mut src_key, mut dst_key, mut shared) = (None, None, None);
    let mut ranges = Vec::new();
    let next = |it: &mut dyn Iterator<Item = String>, opt: &str| {
        it.next().ok_or_else(|| format!("{opt} needs a value"))
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--src-key" => src_key = Some(parse_key(&next(&mut it, &a)?, "--src-key")?),
            "--dst-key" => dst_key = Some(parse_key(&next(&mut it, &a)?, "--dst-key")?),
            "--shared" => shared = Some(parse_shared(&next(&mut it, &a)?)?),
            "--range" => {
                let gpa = parse_u64(&next(&mut it, &a)?, "--range GPA")?;
                let src = next(&mut it, "--range SRC_DUMP")?;
                let dst = next(&mut it, "--range DST_DUMP")?;
                ranges.push((gpa, src, dst));
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if ranges.is_empty() {
        return Err("at least one --range GPA SRC_DUMP DST_DUMP is required".into());
    }
    Ok(Args {
        src_key: src_key.ok_or("--src-key is required")?,
        dst_key: dst_key.ok_or("--dst-key is required")?,
        shared: shared.ok_or("--shared is required")?,
        ranges,
    })
}

/// Reads up to `buf.len()` bytes (less only at the end of the file).
fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn check_range(v: &mut Verifier, gpa: u64, src: &str, dst: &str) -> Result<(), String> {
    let open = |p: &str| File::open(p).map_err(|e| format!("{p}: {e}"));
    let (mut fs, mut fd) = (open(src)?, open(dst)?);
    let (ls, ld) = (
        fs.metadata().map_err(|e| format!("{src}: {e}"))?.len(),
        fd.metadata().map_err(|e| format!("{dst}: {e}"))?.len(),
    );
    if ls != ld {
        return Err(format!(
            "range at {gpa:#x}: {src} has {ls} bytes but {dst} has {ld}; dump the same range on \
             both sides"
        ));
    }
    let (mut bs, mut bd) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut at = gpa;
    loop {
        let ns = read_full(&mut fs, &mut bs).map_err(|e| format!("{src}: {e}"))?;
        let nd = read_full(&mut fd, &mut bd).map_err(|e| format!("{dst}: {e}"))?;
        if ns == 0 && nd == 0 {
            return Ok(());
        }
        v.check(at, &bs[..ns], &bd[..nd])
            .map_err(|e: VerifyError| e.to_string())?;
        at += ns as u64;
    }
}

fn run() -> Result<bool, String> {
    let a = parse_args()?;
    let mut v = Verifier::new(a.src_key, a.dst_key, &a.shared).map_err(|e| e.to_string())?;
    for (gpa, src, dst) in &a.ranges {
        check_range(&mut v, *gpa, src, dst)?;
    }
    let r = v.report();
    println!("verify-keyed: {r}");
    for m in &r.first {
        println!("  {m}");
    }
    if r.mismatches > r.first.len() as u64 {
        println!("  ... and {} more", r.mismatches - r.first.len() as u64);
    }
    Ok(r.ok())
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("verify-keyed: {e}");
            ExitCode::from(2)
        }
    }
}
