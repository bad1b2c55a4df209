//! Writes the seed corpora of the fuzz targets (fuzz/fuzz_targets): valid streams of several
//! shapes for `stream_load`, realistic guest hypercall sequences for `hypercalls`.
//! `cargo run --example fuzz_seeds -- fuzz/corpus` (the fuzzers grow the corpora from there).

use std::fs;
use std::path::Path;

use pagenc::core::{Layout, PageMapBuilder, PageRange, RamRange, PAGE_SHIFT};
use pagenc::stream;

const CHUNK: u64 = 1 << 15;

/// Must match `layouts()` in fuzz/fuzz_targets/stream_load.rs.
fn layouts() -> [Vec<(u64, u64)>; 4] {
    [
        vec![(0, 4 * CHUNK)],
        vec![
            (16, 200),
            (512, CHUNK + 1000),
            (CHUNK + 4096, 2 * CHUNK + 100),
        ],
        vec![((1 << 33) + 5 * CHUNK, (1 << 33) + 8 * CHUNK)],
        vec![(0, 3 * CHUNK), (4 * CHUNK, 6 * CHUNK + 7)],
    ]
}

fn layout(ranges: &[(u64, u64)]) -> Layout {
    let ram: Vec<RamRange> = ranges
        .iter()
        .map(|&(s, e)| RamRange {
            gpa: s << PAGE_SHIFT,
            size: (e - s) << PAGE_SHIFT,
        })
        .collect();
    Layout::new(&ram).expect("valid layout")
}

/// Shapes of maps, as ranges relative to the layout's first RAM gfn (clipped to RAM).
fn shapes(base: u64) -> Vec<(&'static str, Vec<PageRange>, u64)> {
    let r = |s: u64, e: u64| PageRange {
        start: base + s,
        end: base + e,
    };
    let strided = |from: u64, step: u64, n: u64| {
        (0..n)
            .map(|k| r(from + k * step, from + k * step + 1))
            .collect::<Vec<_>>()
    };
    let mut mixed = vec![r(20, 40), r(CHUNK - 5, CHUNK + 5)];
    mixed.extend(strided(CHUNK + 100, 2, 3000));
    mixed.push(r(2 * CHUNK, 3 * CHUNK));
    vec![
        ("empty", vec![], 0),
        ("ready", vec![], 1),
        ("one", vec![r(40, 41)], 1),
        ("few", vec![r(40, 48), r(100, 164), r(1000, 1001)], 0),
        ("border", vec![r(CHUNK - 3, CHUNK + 3)], 1),
        ("full-chunk", vec![r(CHUNK, 2 * CHUNK)], 0),
        ("bitmap", strided(10, 2, 4000), 1),
        ("bitmap2", strided(CHUNK - 4000, 2, 4000), 0),
        ("mixed", mixed, 1),
    ]
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    fs::create_dir_all(dir).expect("corpus directory");
    fs::write(dir.join(format!("seed-{name}")), bytes).expect("seed file");
}

fn stream_seeds(dir: &Path) {
    for (i, ram) in layouts().iter().enumerate() {
        let l = layout(ram);
        let base = l.ranges()[0].start;
        for (name, ranges, msr) in shapes(base) {
            let mut b = PageMapBuilder::new(l.clone());
            for r in ranges {
                for piece in l.clip(r).collect::<Vec<_>>() {
                    // Clipped pieces of ascending ranges stay ascending.
                    let _ = b.push(piece);
                }
            }
            let encoded = stream::encode_to_vec(&b.finish(), msr);
            // Bit 7 of the first byte: the target recomputes the checksum after mutation, so
            // the fuzzer reaches the checks behind it; without it, the checksum itself is
            // fuzzed.
            for (fix, suffix) in [(0x80u8, ""), (0, "-crc")] {
                let mut bytes = vec![i as u8 | fix];
                bytes.extend(&encoded);
                write(dir, &format!("l{i}-{name}{suffix}"), &bytes);
            }
        }
    }
}

/// Opcodes of fuzz/fuzz_targets/hypercalls.rs.
struct Seq(Vec<u8>);

impl Seq {
    /// `n` pages (1..=65536) from `gfn`.
    fn map(mut self, gfn: u16, n: u32, attr_index: u8) -> Seq {
        self.0.push(if n > 1024 { 8 } else { 0 });
        self.0.extend(gfn.to_be_bytes());
        self.0.extend(((n - 1) as u16).to_be_bytes());
        self.0.push(attr_index);
        self
    }
    fn huge(mut self, gpa: u64, n: u64, attr_index: u8) -> Seq {
        self.0.push(1);
        self.0.extend(gpa.to_be_bytes());
        self.0.extend(n.to_be_bytes());
        self.0.push(attr_index);
        self
    }
    fn raw(mut self, nr: u8, gpa: u64, n: u64, attrs: u64) -> Seq {
        self.0.push(2);
        self.0.push(nr);
        self.0.extend(gpa.to_be_bytes());
        self.0.extend(n.to_be_bytes());
        self.0.extend(attrs.to_be_bytes());
        self
    }
    fn fragment(mut self, gfn: u16, step: u8, count: u16, encrypt: bool) -> Seq {
        self.0.push(3);
        self.0.extend(gfn.to_be_bytes());
        self.0.push(step);
        self.0.extend(count.to_be_bytes());
        self.0.push(encrypt as u8);
        self
    }
    fn msr(mut self, other_index: bool, value: u8) -> Seq {
        self.0.push(4);
        self.0.push(other_index as u8);
        self.0.push(value);
        self
    }
    fn reset(mut self) -> Seq {
        self.0.push(5);
        self
    }
    fn query(mut self, gfn: u16, off: u8) -> Seq {
        self.0.push(6);
        self.0.extend(gfn.to_be_bytes());
        self.0.push(off);
        self
    }
    fn top(mut self, back: u16, n: u16, attr_index: u8) -> Seq {
        self.0.push(7);
        self.0.extend(back.to_be_bytes());
        self.0.extend(n.to_be_bytes());
        self.0.push(attr_index);
        self
    }
}

fn hypercall_seeds(dir: &Path) {
    let s = || Seq(vec![]);
    // attr index 0 = shared (4K), 1 = encrypted (4K), 4 = encrypted 2M hint, 9 = reserved bit.
    let boot = s()
        .map(600, 16384, 0) // swiotlb
        .map(40, 1, 0) // GHCB / kvmclock pages
        .map(41, 1, 0)
        .map(43, 2, 0)
        .msr(false, 1) // KVM_MIGRATION_READY
        .query(600, 0)
        .query(600 + 16384, 0)
        .query(41, 7);
    let convert = s()
        .map(1000, 512, 0)
        .map(1100, 64, 1)
        .map(1050, 100, 4)
        .map(32760, 20, 0) // across a chunk border
        .query(32767, 0)
        .map(32765, 5, 1);
    let kexec = s()
        .map(600, 16384, 0)
        .msr(false, 1)
        .reset()
        .map(700, 8, 0)
        .msr(false, 0)
        .query(600, 0);
    let hostile = s()
        .fragment(512, 2, 4095, false)
        .fragment(32768 + 4096, 2, 4095, false)
        .fragment(520, 4, 1000, true)
        .query(513, 0)
        .map(0, 65536, 1);
    let huge = s()
        .huge(0, u64::MAX, 0)
        .huge(0, 1 << 40, 0)
        .huge(0x1000, (1 << 40) - 1, 1)
        .top(1, 1, 0)
        .top(1, 2, 0)
        .top(0, 1, 0)
        .huge(0x1234, 1, 0);
    let bad = s()
        .raw(0, 0x5000, 1, 0x20)
        .raw(0, 0x5000, 1, 3)
        .raw(0, 0x5000, 0, 0)
        .raw(0, 0x5001, 1, 0)
        .raw(3, 0x5000, 1, 0)
        .msr(false, 2)
        .msr(true, 1)
        .msr(false, 3);
    for (name, seq) in [
        ("boot", boot),
        ("convert", convert),
        ("kexec", kexec),
        ("hostile", hostile),
        ("huge", huge),
        ("bad", bad),
    ] {
        write(dir, name, &seq.0);
    }
}

fn main() {
    let root = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "fuzz/corpus".into());
    let root = Path::new(&root);
    stream_seeds(&root.join("stream_load"));
    hypercall_seeds(&root.join("hypercalls"));
    println!("seeds written under {}", root.display());
}
