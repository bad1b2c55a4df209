//! Arbitrary bytes into the stream loader.
//!
//! The first input byte picks the destination's RAM layout (its low bits, so that valid streams
//! for each can be in the corpus) and, with bit 7 set, has the CRC32C trailer recomputed over
//! the mutated bytes before the load, so that the fuzzer gets past the checksum to every check
//! behind it (without it nearly every mutation stops at the checksum); the rest is the stream. A load that fails must leave the destination
//! exactly as it was and call no callback; a load that succeeds must give a map that satisfies
//! the map's invariants, re-encodes to a stream that decodes to the same map, and matches the
//! header's counts. Peak heap during the load stays within twice a bitmap of RAM plus 1 MiB.

#![no_main]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use pagenc::core::{Layout, PageMapBuilder, PageRange, RamRange, PAGE_SHIFT};
use pagenc::stream;
use pagenc::Tracker;
use pagenc_fuzz::{measure_start, peak_since, Counting};

#[global_allocator]
static ALLOC: Counting = Counting;

const CHUNK: u64 = 1 << 15;

/// The destination layouts, in gfns `(start, end)`. The same list is in
/// `examples/fuzz_seeds.rs`, which writes the seed corpus.
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

fn layout(i: u8) -> Layout {
    let all = layouts();
    let ram: Vec<RamRange> = all[i as usize % all.len()]
        .iter()
        .map(|&(s, e)| RamRange {
            gpa: s << PAGE_SHIFT,
            size: (e - s) << PAGE_SHIFT,
        })
        .collect();
    Layout::new(&ram).unwrap()
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    let fixed: Vec<u8>;
    let bytes = if which & 0x80 != 0 && bytes.len() >= stream::format::CHECKSUM_LEN {
        let mut b = bytes.to_vec();
        let at = b.len() - stream::format::CHECKSUM_LEN;
        let crc = stream::format::checksum(&b[..at]);
        b[at..].copy_from_slice(&crc.to_be_bytes());
        fixed = b;
        &fixed[..]
    } else {
        bytes
    };
    let layout = layout(which & 0x7f);
    // A destination with a map of its own, so that a half-done load would show.
    let t = Tracker::new(layout.clone());
    let first = layout.ranges()[0];
    let mut b = PageMapBuilder::new(layout.clone());
    b.push(PageRange {
        start: first.start + 1,
        end: first.start + 3,
    })
    .unwrap();
    t.replace(b.finish(), 1).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    t.set_change_callback(Some(Box::new(move |_, _| {
        c.fetch_add(1, Ordering::Relaxed);
    })))
    .unwrap();
    let before = (t.shared_ranges().unwrap(), t.stats().unwrap());

    let base = measure_start();
    let result = stream::load(&t, bytes);
    let peak = peak_since(base);
    let ram_bitmap = layout
        .ranges()
        .iter()
        .map(|r| ((r.end - 1) / CHUNK - r.start / CHUNK + 1) as usize * 4096)
        .sum::<usize>();
    let bound = 2 * ram_bitmap + (1 << 20);
    assert!(peak <= bound, "load peaked at {peak} heap bytes > {bound}");
    assert_eq!(
        calls.load(Ordering::Relaxed),
        0,
        "a load must not call the change callback"
    );

    match result {
        Err(e) => {
            // The message must render, and nothing changed.
            assert!(!e.to_string().is_empty());
            assert_eq!(
                t.shared_ranges().unwrap(),
                before.0,
                "failed load ({e}) changed the map"
            );
            assert_eq!(
                t.stats().unwrap(),
                before.1,
                "failed load ({e}) changed the stats"
            );
        }
        Ok(()) => {
            t.with_map(|map, _| map.check_invariants())
                .unwrap()
                .unwrap();
            let ranges = t.shared_ranges().unwrap();
            let stats = t.stats().unwrap();
            // The header's counts were checked against the records.
            assert_eq!(stats.shared_ranges, ranges.len() as u64);
            assert_eq!(
                u64::from_be_bytes(bytes[40..48].try_into().unwrap()),
                ranges.len() as u64
            );
            assert_eq!(
                u64::from_be_bytes(bytes[32..40].try_into().unwrap()),
                stats.shared_pages
            );
            let again = stream::save_to_vec(&t).unwrap();
            assert_eq!(stream::encoded_len(&t).unwrap(), again.len());
            let (map, msr) = stream::decode(&layout, &again).unwrap();
            assert!(map.shared_ranges().eq(ranges.iter().copied()));
            assert_eq!(msr, stats.msr_value);
            // The encoder's output is canonical: encoding it again gives the same bytes.
            assert_eq!(stream::encode_to_vec(&map, msr), again);
        }
    }
});
