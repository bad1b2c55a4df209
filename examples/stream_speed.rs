//! Measures the stream decoder on hostile 2 M-range maps (run with `--release`):
//! `cargo run --release --example stream_speed`. Prints ranges per second; asserts nothing
//! about time (machines differ), only that the decoded map is the source's.

use std::time::Instant;

use pagenc::core::{Layout, PageMapBuilder, PageRange, RamRange, PAGE_SHIFT};
use pagenc::stream;

fn run(name: &str, pages: u64, stride: u64) {
    let layout = Layout::new(&[RamRange {
        gpa: 0,
        size: pages << PAGE_SHIFT,
    }])
    .expect("valid layout");
    let mut b = PageMapBuilder::new(layout.clone());
    for g in (0..pages).step_by(stride as usize) {
        b.push(PageRange {
            start: g,
            end: g + 1,
        })
        .expect("ascending");
    }
    let map = b.finish();
    let ranges = map.shared_pages();
    let t0 = Instant::now();
    let bytes = stream::encode_to_vec(&map, 1);
    let enc = t0.elapsed();
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t0 = Instant::now();
        let (back, msr) = stream::decode(&layout, &bytes).expect("own stream decodes");
        best = best.min(t0.elapsed().as_secs_f64());
        assert_eq!(msr, 1);
        assert_eq!(back.shared_pages(), ranges);
    }
    println!(
        "{name}: {ranges} ranges, {} bytes ({:.2} B/range), encode {:.1} ms, decode {:.1} ms \
         = {:.1} M ranges/s",
        bytes.len(),
        bytes.len() as f64 / ranges as f64,
        enc.as_secs_f64() * 1e3,
        best * 1e3,
        ranges as f64 / best / 1e6
    );
}

fn main() {
    let n = 2 << 20;
    // Every other page of 16 GiB: written as bitmap chunks.
    run("every other page (bitmaps)", 2 * n, 2);
    // One page in 128 of 1 TiB: sparse enough to be written as range records.
    run("one page in 128 (range records)", 128 * n, 128);
}
