//! The migration stream through the public API: round trips of random and hostile maps, size
//! bounds, and every kind of corrupted stream giving its own error while leaving the destination
//! exactly as it was.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use pagenc::core::{Layout, PageMap, PageMapBuilder, PageRange, RamRange, PAGE_SHIFT};
use pagenc::stream::format::{self, put_varint, CHECKSUM_LEN, CHUNK_BYTES, HEADER_LEN};
use pagenc::stream::{
    self, CountField, LayoutField, StreamError, StreamErrorKind, StreamProblem, VarintProblem,
};
use pagenc::Tracker;
use proptest::prelude::*;

/// Pages per 2^15-page chunk.
const CHUNK: u64 = 1 << 15;
const GIB_PAGES: u64 = 1 << (30 - PAGE_SHIFT);

fn layout(ranges: &[(u64, u64)]) -> Layout {
    let ram: Vec<RamRange> = ranges
        .iter()
        .map(|&(start, pages)| RamRange {
            gpa: start << PAGE_SHIFT,
            size: pages << PAGE_SHIFT,
        })
        .collect();
    Layout::new(&ram).unwrap()
}

/// A map over `layout` with `ranges` shared (ascending, in RAM; adjacent ones merge).
fn map_of(layout: &Layout, ranges: &[PageRange]) -> PageMap {
    let mut b = PageMapBuilder::new(layout.clone());
    for &r in ranges {
        b.push(r).unwrap();
    }
    b.finish()
}

fn tracker_with(layout: &Layout, ranges: &[PageRange], msr: u64) -> Tracker {
    let t = Tracker::new(layout.clone());
    t.replace(map_of(layout, ranges), msr).unwrap();
    t
}

fn r(start: u64, end: u64) -> PageRange {
    PageRange { start, end }
}

/// The bytes a stream over `layout` takes besides its records: header, layout block, checksum.
fn overhead(layout: &Layout) -> usize {
    format::records_offset(layout.ranges().len()) + CHECKSUM_LEN
}

/// Saves `src` and loads it into a fresh tracker over the same layout; checks the result is the
/// same map and MSR value, and that `encoded_len` predicted the size.
fn round_trip(src: &Tracker) -> Result<usize, TestCaseError> {
    let bytes = stream::save_to_vec(src).unwrap();
    prop_assert_eq!(stream::encoded_len(src).unwrap(), bytes.len());
    let mut written = Vec::new();
    prop_assert_eq!(stream::save(src, &mut written).unwrap(), bytes.len());
    prop_assert_eq!(&written, &bytes);
    let dst = Tracker::new(src.layout().unwrap());
    // Something to be overwritten: the load replaces, it does not merge.
    dst.map_gpa_range(0, 1, 0).unwrap();
    if let Err(e) = stream::load(&dst, &bytes) {
        return Err(TestCaseError::fail(format!("load failed: {e}")));
    }
    prop_assert_eq!(dst.shared_ranges().unwrap(), src.shared_ranges().unwrap());
    prop_assert_eq!(
        dst.rdmsr(pagenc::kvm::consts::MSR_KVM_MIGRATION_CONTROL)
            .unwrap(),
        src.rdmsr(pagenc::kvm::consts::MSR_KVM_MIGRATION_CONTROL)
            .unwrap()
    );
    let (s, d) = (src.stats().unwrap(), dst.stats().unwrap());
    prop_assert_eq!(s.shared_pages, d.shared_pages);
    prop_assert_eq!(s.shared_ranges, d.shared_ranges);
    // The map is canonical, so re-encoding what was loaded gives the same bytes.
    prop_assert_eq!(stream::save_to_vec(&dst).unwrap(), bytes.clone());
    Ok(bytes.len())
}

/// What one chunk of a generated map looks like.
#[derive(Debug, Clone)]
enum ChunkShape {
    Empty,
    Full,
    /// A few runs: (offset, length) pairs, clipped to the chunk.
    Runs(Vec<(u64, u64)>),
    /// Every `stride`-th page from `first`, `fill` pages each time: a hostile pattern that the
    /// encoder writes as a bitmap when dense enough.
    Strided {
        first: u64,
        stride: u64,
        fill: u64,
        count: u64,
    },
}

fn shape_strategy() -> impl Strategy<Value = ChunkShape> {
    prop_oneof![
        2 => Just(ChunkShape::Empty),
        1 => Just(ChunkShape::Full),
        3 => proptest::collection::vec((0..CHUNK, 1..4000u64), 1..8).prop_map(ChunkShape::Runs),
        2 => (0..64u64, 2..6u64, 1..2u64, 100..CHUNK / 2).prop_map(|(first, stride, fill, count)| {
            ChunkShape::Strided { first, stride, fill: fill.min(stride - 1), count }
        }),
    ]
}

/// Pages shared by a list of chunk shapes laid out from gfn `base`, as ascending ranges.
fn ranges_of(base: u64, shapes: &[ChunkShape]) -> Vec<PageRange> {
    let mut shared = vec![false; shapes.len() * CHUNK as usize];
    for (i, s) in shapes.iter().enumerate() {
        let c = &mut shared[i * CHUNK as usize..(i + 1) * CHUNK as usize];
        match s {
            ChunkShape::Empty => {}
            ChunkShape::Full => c.fill(true),
            ChunkShape::Runs(runs) => {
                for &(o, n) in runs {
                    let end = (o + n).min(CHUNK);
                    c[o as usize..end as usize].fill(true);
                }
            }
            ChunkShape::Strided {
                first,
                stride,
                fill,
                count,
            } => {
                for k in 0..*count {
                    let s = first + k * stride;
                    let e = (s + fill).min(CHUNK);
                    if s >= CHUNK {
                        break;
                    }
                    c[s as usize..e as usize].fill(true);
                }
            }
        }
    }
    let mut out: Vec<PageRange> = Vec::new();
    for (g, &s) in shared.iter().enumerate() {
        if s {
            let g = base + g as u64;
            match out.last_mut() {
                Some(p) if p.end == g => p.end += 1,
                _ => out.push(r(g, g + 1)),
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Maps built from random chunk shapes (empty, full, runs, dense hostile patterns) in a
    /// layout that starts high (gfns past 2^32, where 32-bit page numbers break) and has a hole:
    /// every map comes back exactly, in at most 16 bytes per range plus the header.
    #[test]
    fn chunk_shapes_round_trip(
        shapes in proptest::collection::vec(shape_strategy(), 1..7),
        hole in 0..3usize,
        high in any::<bool>(),
        msr in 0..2u64,
    ) {
        let base = if high { (1u64 << 33) + 7 * CHUNK } else { 0 };
        let n = shapes.len() as u64;
        // RAM is the whole span except chunk `hole` (if it exists) minus a ragged edge.
        let mut ram = vec![];
        let hole = hole as u64;
        if hole < n {
            if hole > 0 {
                ram.push((base, hole * CHUNK));
            }
            if hole + 1 < n {
                ram.push((base + (hole + 1) * CHUNK, (n - hole - 1) * CHUNK));
            }
        } else {
            ram.push((base, n * CHUNK));
        }
        prop_assume!(!ram.is_empty());
        let layout = layout(&ram);
        let all = ranges_of(base, &shapes);
        let ranges: Vec<PageRange> = all.iter().flat_map(|&x| layout.clip(x).collect::<Vec<_>>()).collect();
        let src = tracker_with(&layout, &ranges, msr);
        let len = round_trip(&src)?;
        let count = src.stats().unwrap().shared_ranges as usize;
        let fixed = overhead(&layout);
        prop_assert!(len <= fixed + 16 * count, "{} bytes for {} ranges", len, count);
        // Never more than a bitmap of the chunks that hold RAM, plus record headers.
        prop_assert!(len <= fixed + n as usize * (CHUNK_BYTES + 16), "{} bytes", len);
    }

    /// Maps made by random hypercalls on a small, ragged layout.
    #[test]
    fn hypercall_maps_round_trip(
        ops in proptest::collection::vec((0..5 * CHUNK, 1..2 * CHUNK, any::<bool>(), 0..4u32), 1..40),
        msr in 0..2u64,
    ) {
        let layout = layout(&[(0, 640), (1024, CHUNK + 77), (3 * CHUNK + 5, CHUNK)]);
        let fixed = overhead(&layout);
        let t = Tracker::new(layout);
        for (gfn, n, shared, shape) in ops {
            let attrs = if shared { 0 } else { 0x10 };
            match shape {
                // Short calls at a stride: fragmentation.
                0 => for k in 0..(n % 700) {
                    let _ = t.map_gpa_range((gfn + 2 * k) << PAGE_SHIFT, 1, attrs);
                },
                1 => { let _ = t.map_gpa_range(gfn << PAGE_SHIFT, n % 64 + 1, attrs); }
                _ => { let _ = t.map_gpa_range(gfn << PAGE_SHIFT, n, attrs); }
            }
        }
        t.wrmsr(pagenc::kvm::consts::MSR_KVM_MIGRATION_CONTROL, msr).unwrap();
        let len = round_trip(&t)?;
        let count = t.stats().unwrap().shared_ranges as usize;
        prop_assert!(len <= fixed + 16 * count, "{} bytes for {} ranges", len, count);
    }

    /// Random damage to a valid stream: the load either fails and changes nothing, or succeeds
    /// with a map that itself round-trips. Never a panic.
    #[test]
    fn damaged_streams_never_half_load(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let (layout, src) = small_source();
        let mut bytes = stream::save_to_vec(&src).unwrap();
        for (i, b) in edits {
            let i = i.index(bytes.len());
            bytes[i] = b;
        }
        if let Some(c) = cut {
            bytes.truncate(c.index(bytes.len()));
        }
        let (dst, calls) = watched_destination(&layout);
        let before = snapshot(&dst);
        match stream::load(&dst, &bytes) {
            Ok(()) => {
                round_trip(&dst)?;
            }
            Err(e) => {
                prop_assert_eq!(snapshot(&dst), before, "changed by failed load: {}", e);
                prop_assert_eq!(calls.load(Ordering::SeqCst), 0);
            }
        }
    }
}

/// A 1 GiB layout (8 chunks) with ranges, a hostile chunk written as a bitmap, and MSR ready.
fn small_source() -> (Layout, Tracker) {
    let layout = layout(&[(0, GIB_PAGES)]);
    let mut ranges = vec![r(16, 32), r(100, 101), r(CHUNK - 3, CHUNK + 40)];
    for k in 0..3000 {
        let s = 3 * CHUNK + 2 * k;
        ranges.push(r(s, s + 1));
    }
    ranges.push(r(5 * CHUNK, 7 * CHUNK));
    (layout.clone(), tracker_with(&layout, &ranges, 1))
}

type Snapshot = (Vec<PageRange>, u64, u64);

fn snapshot(t: &Tracker) -> Snapshot {
    let s = t.stats().unwrap();
    (t.shared_ranges().unwrap(), s.msr_value, s.shared_pages)
}

/// A destination with a map of its own, MSR not ready, and both callbacks counting calls.
fn watched_destination(layout: &Layout) -> (Tracker, Arc<AtomicUsize>) {
    let t = tracker_with(layout, &[r(7, 9), r(2 * CHUNK, 2 * CHUNK + 300)], 0);
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    t.set_change_callback(Some(Box::new(move |_, _| {
        c.fetch_add(1, Ordering::SeqCst);
    })))
    .unwrap();
    let c = calls.clone();
    t.set_readiness_callback(Some(Box::new(move |_, _| {
        c.fetch_add(1, Ordering::SeqCst);
    })))
    .unwrap();
    (t, calls)
}

/// Loads `bytes` into a watched destination over `layout`; returns the error after checking
/// that the destination did not change and no callback ran.
fn load_fails(layout: &Layout, bytes: &[u8]) -> StreamError {
    let (dst, calls) = watched_destination(layout);
    let before = snapshot(&dst);
    let e = stream::load(&dst, bytes).expect_err("a corrupted stream must be refused");
    assert_eq!(
        snapshot(&dst),
        before,
        "destination changed by a failed load ({e})"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "callback ran on a failed load ({e})"
    );
    assert!(!e.to_string().is_empty());
    e
}

/// Hand-assembles a stream so that each field can be set wrong on purpose.
struct Raw {
    version: u16,
    flags: u16,
    ram_pages: u64,
    ram_end: u64,
    /// The layout block: the source's RAM ranges.
    ram: Vec<PageRange>,
    msr: u64,
    shared_pages: Option<u64>,
    ranges: Option<u64>,
    records: Option<u64>,
    body: Vec<u8>,
    /// Counted as the records are added.
    n_records: u64,
    n_pages: u64,
    n_ranges: u64,
}

impl Raw {
    fn new(layout: &Layout) -> Raw {
        Raw {
            version: format::VERSION,
            flags: 0,
            ram_pages: layout.pages(),
            ram_end: layout.ranges().last().unwrap().end,
            ram: layout.ranges().to_vec(),
            msr: 0,
            shared_pages: None,
            ranges: None,
            records: None,
            body: vec![],
            n_records: 0,
            n_pages: 0,
            n_ranges: 0,
        }
    }

    fn range(mut self, start: u64, len: u64) -> Raw {
        self.body.push(format::TAG_RANGE);
        put_varint(&mut self.body, start);
        put_varint(&mut self.body, len);
        self.n_records += 1;
        self.n_pages = self.n_pages.wrapping_add(len);
        self.n_ranges += 1;
        self
    }

    /// A bitmap record of `chunks` chunks from `start`, with `set` pages (relative) shared.
    fn bitmap(mut self, start: u64, chunks: u64, set: &[u64]) -> Raw {
        self.body.push(format::TAG_BITMAP);
        put_varint(&mut self.body, start);
        put_varint(&mut self.body, chunks);
        let at = self.body.len();
        self.body.resize(at + chunks as usize * CHUNK_BYTES, 0);
        for &p in set {
            self.body[at + (p / 8) as usize] |= 1 << (p % 8);
        }
        self.n_records += 1;
        self.n_pages += set.len() as u64;
        self.n_ranges += set.len() as u64;
        self
    }

    fn bytes(&self) -> Vec<u8> {
        let mut b = format::MAGIC.to_vec();
        b.extend_from_slice(&self.version.to_be_bytes());
        b.extend_from_slice(&self.flags.to_be_bytes());
        b.extend_from_slice(&self.ram_pages.to_be_bytes());
        b.extend_from_slice(&self.ram_end.to_be_bytes());
        b.extend_from_slice(&self.msr.to_be_bytes());
        b.extend_from_slice(&self.shared_pages.unwrap_or(self.n_pages).to_be_bytes());
        b.extend_from_slice(&self.ranges.unwrap_or(self.n_ranges).to_be_bytes());
        b.extend_from_slice(&self.records.unwrap_or(self.n_records).to_be_bytes());
        assert_eq!(b.len(), HEADER_LEN);
        b.extend_from_slice(&(self.ram.len() as u32).to_be_bytes());
        for r in &self.ram {
            b.extend_from_slice(&r.start.to_be_bytes());
            b.extend_from_slice(&r.end.to_be_bytes());
        }
        b.extend_from_slice(&self.body);
        // A right checksum, so that each test reaches the check it is about.
        let crc = format::checksum(&b);
        b.extend_from_slice(&crc.to_be_bytes());
        b
    }

    /// Offset of the first record.
    fn first(&self) -> usize {
        format::records_offset(self.ram.len())
    }
}

#[test]
fn hand_built_stream_loads() {
    // The reference for the corruption tests below: the same streams without the damage load.
    let l = layout(&[(0, 4 * CHUNK)]);
    let raw = Raw::new(&l)
        .range(100, 10)
        .bitmap(CHUNK, 1, &[0, 2, 4])
        .range(2 * CHUNK, 5);
    let mut raw = raw;
    raw.msr = 1;
    // The range at 2 * CHUNK follows the bitmap directly: allowed (kinds differ), and the
    // bitmap's runs do not touch it, so 5 ranges.
    let dst = Tracker::new(l.clone());
    stream::load(&dst, &raw.bytes()).unwrap();
    assert_eq!(
        dst.shared_ranges().unwrap(),
        vec![
            r(100, 110),
            r(CHUNK, CHUNK + 1),
            r(CHUNK + 2, CHUNK + 3),
            r(CHUNK + 4, CHUNK + 5),
            r(2 * CHUNK, 2 * CHUNK + 5)
        ]
    );
    assert!(dst.is_ready());
}

#[test]
fn header_corruptions_give_their_own_errors() {
    let l = layout(&[(0, 4 * CHUNK)]);
    let good = || Raw::new(&l).range(100, 10);

    let mut b = good().bytes();
    b[0] = b'X';
    let e = load_fails(&l, &b);
    assert!(
        matches!(e, StreamError::BadMagic { found } if &found == b"XGEL"),
        "{e}"
    );

    for v in [0u16, 1, 3, 0xffff] {
        let mut raw = good();
        raw.version = v;
        let e = load_fails(&l, &raw.bytes());
        assert!(
            matches!(e, StreamError::UnsupportedVersion { found } if found == v),
            "{e}"
        );
        let msg = e.to_string();
        assert!(msg.contains(&format!("version {v}")), "{msg}");
        assert!(msg.contains("reads versions 2"), "{msg}");
        let want = if v > 2 {
            StreamProblem::NewerVersion
        } else {
            StreamProblem::OldVersion
        };
        assert_eq!(e.problem(), want, "{e}");
    }
    // A newer version is refused even when the stream is too short for this version's header.
    let mut raw = good();
    raw.version = 3;
    let e = load_fails(&l, &raw.bytes()[..6]);
    assert_eq!(e.kind(), StreamErrorKind::UnsupportedVersion, "{e}");
    assert!(e.to_string().contains("newer"), "{e}");

    let mut raw = good();
    raw.flags = 0x8000;
    let e = load_fails(&l, &raw.bytes());
    assert!(
        matches!(e, StreamError::ReservedFlags { flags: 0x8000 }),
        "{e}"
    );

    // Same RAM size, different end: a different layout.
    let other = layout(&[(0, CHUNK), (2 * CHUNK, 3 * CHUNK)]);
    let e = load_fails(&other, &good().bytes());
    assert!(
        matches!(
            e,
            StreamError::LayoutMismatch { field: LayoutField::RamEnd, stream, destination }
                if stream == 4 * CHUNK && destination == 5 * CHUNK
        ),
        "{e}"
    );
    let smaller = layout(&[(0, 3 * CHUNK)]);
    let e = load_fails(&smaller, &good().bytes());
    assert!(
        matches!(
            e,
            StreamError::LayoutMismatch { field: LayoutField::RamPages, stream, destination }
                if stream == 4 * CHUNK && destination == 3 * CHUNK
        ),
        "{e}"
    );

    let mut raw = good();
    raw.msr = 0x3;
    let e = load_fails(&l, &raw.bytes());
    assert!(matches!(e, StreamError::BadMsr { value: 3 }), "{e}");

    let mut raw = good();
    raw.records = Some(u64::MAX);
    let e = load_fails(&l, &raw.bytes());
    assert!(
        matches!(
            e,
            StreamError::RecordCountTooLarge {
                count: u64::MAX,
                max: 1
            }
        ),
        "{e}"
    );

    // One more record announced than present: the records end where the record should be.
    let mut raw = good();
    raw.records = Some(2);
    raw.body.extend_from_slice(&[1, 0x81, 0x81]);
    let second = raw.first() + 3;
    let e = load_fails(&l, &raw.bytes());
    assert!(
        matches!(e, StreamError::Truncated { what: "range start", offset, .. } if offset == second + 1),
        "{e}"
    );

    let mut raw = good();
    raw.shared_pages = Some(11);
    let e = load_fails(&l, &raw.bytes());
    assert!(
        matches!(
            e,
            StreamError::CountMismatch {
                field: CountField::SharedPages,
                header: 11,
                actual: 10
            }
        ),
        "{e}"
    );
    let mut raw = good();
    raw.ranges = Some(0);
    let e = load_fails(&l, &raw.bytes());
    assert!(
        matches!(
            e,
            StreamError::CountMismatch {
                field: CountField::Ranges,
                header: 0,
                actual: 1
            }
        ),
        "{e}"
    );

    let mut raw = good();
    raw.body.push(0);
    let e = load_fails(&l, &raw.bytes());
    assert!(
        matches!(e, StreamError::TrailingBytes { offset, count: 1 } if offset == raw.first() + 3),
        "{e}"
    );

    // Any damage the checksum sees is named as such, before any other field is believed.
    let mut b = good().bytes();
    b[HEADER_LEN - 1] ^= 1;
    let e = load_fails(&l, &b);
    assert!(matches!(e, StreamError::ChecksumMismatch { .. }), "{e}");
    assert_eq!(e.problem(), StreamProblem::Damaged);
    assert!(e.to_string().contains("damaged"), "{e}");
}

#[test]
fn record_corruptions_give_their_own_errors() {
    let l = layout(&[(0, CHUNK), (2 * CHUNK, 2 * CHUNK + 100)]);
    let first = Raw::new(&l).first(); // offset of the first record
    let second = first + 3; // after `range(100, 10)`: tag and two 1-byte varints

    let e = load_fails(&l, &Raw::new(&l).range(100, 10).range(50, 5).bytes());
    assert!(
        matches!(e, StreamError::Unsorted { offset, start: 50, prev_start: 100 } if offset == second),
        "{e}"
    );
    let e = load_fails(&l, &Raw::new(&l).range(100, 10).range(105, 20).bytes());
    assert!(
        matches!(
            e,
            StreamError::Overlap {
                start: 105,
                prev_end: 110,
                ..
            }
        ),
        "{e}"
    );
    let e = load_fails(&l, &Raw::new(&l).range(100, 10).range(110, 20).bytes());
    assert!(
        matches!(e, StreamError::NotMerged { start: 110, .. }),
        "{e}"
    );
    // Two bitmap records that touch must have been one record.
    let e = load_fails(
        &l,
        &Raw::new(&l)
            .bitmap(2 * CHUNK, 1, &[0])
            .bitmap(3 * CHUNK, 1, &[5])
            .bytes(),
    );
    assert!(
        matches!(e, StreamError::NotMerged { start, .. } if start == 3 * CHUNK),
        "{e}"
    );
    // A bitmap overlapping a range.
    let e = load_fails(
        &l,
        &Raw::new(&l)
            .range(2 * CHUNK, 10)
            .bitmap(2 * CHUNK, 1, &[20])
            .bytes(),
    );
    assert!(matches!(e, StreamError::Overlap { .. }), "{e}");

    let e = load_fails(&l, &Raw::new(&l).range(100, 0).bytes());
    assert!(
        matches!(e, StreamError::EmptyRecord { offset, start: 100 } if offset == first),
        "{e}"
    );
    let e = load_fails(&l, &Raw::new(&l).bitmap(CHUNK, 0, &[]).bytes());
    assert!(matches!(e, StreamError::EmptyRecord { .. }), "{e}");

    // Past the end of RAM, in the hole, straddling the hole, past 2^64.
    for (start, len) in [
        (4 * CHUNK + 100, 1),
        (CHUNK + 5, 3),
        (CHUNK - 2, 4),
        (u64::MAX - 3, 10),
        (1 << 40, 1),
    ] {
        let e = load_fails(&l, &Raw::new(&l).range(start, len).bytes());
        assert!(
            matches!(e, StreamError::OutOfRam { offset, start: s, .. } if offset == first && s == start),
            "[{start:#x}, +{len}): {e}"
        );
    }
    // A bitmap bit past the ragged end of RAM (4 * CHUNK + 100).
    let e = load_fails(&l, &Raw::new(&l).bitmap(4 * CHUNK, 1, &[3, 100]).bytes());
    assert!(
        matches!(e, StreamError::OutOfRam { start, len: 1, .. } if start == 4 * CHUNK + 100),
        "{e}"
    );
    // A bitmap over the hole, and a bitmap whose chunk count runs past 2^64 pages.
    let e = load_fails(&l, &Raw::new(&l).bitmap(CHUNK, 1, &[7]).bytes());
    assert!(matches!(e, StreamError::OutOfRam { .. }), "{e}");
    let mut raw = Raw::new(&l);
    raw.body = vec![format::TAG_BITMAP];
    put_varint(&mut raw.body, 2 * CHUNK);
    put_varint(&mut raw.body, u64::MAX >> 10);
    raw.n_records = 1;
    let e = load_fails(&l, &raw.bytes());
    assert!(matches!(e, StreamError::OutOfRam { .. }), "{e}");
    // A chunk count the remaining bytes cannot hold is caught before anything is read.
    let mut raw = Raw::new(&l);
    raw.body = vec![format::TAG_BITMAP];
    put_varint(&mut raw.body, 2 * CHUNK);
    put_varint(&mut raw.body, 1000);
    raw.body.extend_from_slice(&[0xff; 64]);
    raw.n_records = 1;
    let e = load_fails(&l, &raw.bytes());
    assert!(
        matches!(e, StreamError::Truncated { what: "bitmap", needed, available: 64, .. } if needed == 1000 * CHUNK_BYTES as u64),
        "{e}"
    );

    let e = load_fails(&l, &Raw::new(&l).bitmap(2 * CHUNK + 8, 1, &[0]).bytes());
    assert!(
        matches!(e, StreamError::BitmapUnaligned { start, .. } if start == 2 * CHUNK + 8),
        "{e}"
    );
    let e = load_fails(&l, &Raw::new(&l).bitmap(2 * CHUNK, 2, &[9]).bytes());
    assert!(
        matches!(e, StreamError::EmptyBitmapChunk { chunk_start, .. } if chunk_start == 3 * CHUNK),
        "{e}"
    );

    let mut raw = Raw::new(&l);
    raw.body = vec![0x03, 0, 1];
    raw.n_records = 1;
    let e = load_fails(&l, &raw.bytes());
    assert!(
        matches!(e, StreamError::UnknownRecord { offset, tag: 3 } if offset == first),
        "{e}"
    );

    let mut raw = Raw::new(&l);
    raw.body = vec![format::TAG_RANGE, 0xe4, 0x80, 0x00, 1];
    raw.n_records = 1;
    let e = load_fails(&l, &raw.bytes());
    assert!(
        matches!(e, StreamError::BadVarint { offset, problem: VarintProblem::Overlong } if offset == first + 1),
        "{e}"
    );
    let mut raw = Raw::new(&l);
    raw.body = vec![format::TAG_RANGE];
    raw.body.extend_from_slice(&[0xff; 9]);
    raw.body.extend_from_slice(&[0x02, 1]);
    raw.n_records = 1;
    let e = load_fails(&l, &raw.bytes());
    assert!(
        matches!(
            e,
            StreamError::BadVarint {
                problem: VarintProblem::Overflow,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn every_error_kind_is_distinct() {
    // The C layer reports these numbers; a test there checks each one, so they must differ.
    use StreamErrorKind as K;
    let all = [
        K::Io,
        K::Tracker,
        K::Truncated,
        K::BadMagic,
        K::UnsupportedVersion,
        K::ReservedFlags,
        K::LayoutMismatch,
        K::BadMsr,
        K::RecordCountTooLarge,
        K::BadVarint,
        K::UnknownRecord,
        K::EmptyRecord,
        K::Unsorted,
        K::Overlap,
        K::NotMerged,
        K::OutOfRam,
        K::BitmapUnaligned,
        K::EmptyBitmapChunk,
        K::TrailingBytes,
        K::CountMismatch,
        K::ChecksumMismatch,
    ];
    let mut codes: Vec<u32> = all.iter().map(|&k| k as u32).collect();
    codes.sort();
    codes.dedup();
    assert_eq!(codes.len(), all.len());
}

#[test]
fn truncation_at_every_offset_is_refused() {
    let (layout, src) = small_source();
    let bytes = stream::save_to_vec(&src).unwrap();
    for cut in 0..bytes.len() {
        let e = load_fails(&layout, &bytes[..cut]);
        assert!(
            matches!(
                e.kind(),
                StreamErrorKind::Truncated | StreamErrorKind::ChecksumMismatch
            ),
            "cut at {cut}: {e}"
        );
    }
    // And the whole stream loads.
    let dst = Tracker::new(layout);
    stream::load(&dst, &bytes).unwrap();
    assert_eq!(dst.shared_ranges().unwrap(), src.shared_ranges().unwrap());
}

#[test]
fn load_from_a_callback_is_refused_not_deadlocked() {
    let l = layout(&[(0, CHUNK)]);
    let t = Arc::new(Tracker::new(l.clone()));
    let bytes = stream::save_to_vec(&tracker_with(&l, &[r(1, 2)], 0)).unwrap();
    let seen = Arc::new(std::sync::Mutex::new(None));
    let (t2, seen2) = (Arc::downgrade(&t), seen.clone());
    t.set_change_callback(Some(Box::new(move |_, _| {
        if let Some(t) = t2.upgrade() {
            *seen2.lock().unwrap() = Some(stream::load(&t, &bytes).map_err(|e| e.kind()));
        }
    })))
    .unwrap();
    t.map_gpa_range(5 << PAGE_SHIFT, 1, 0).unwrap();
    assert_eq!(*seen.lock().unwrap(), Some(Err(StreamErrorKind::Tracker)));
    assert_eq!(t.shared_ranges().unwrap(), vec![r(5, 6)]);
}

/// An ordinary SEV guest: swiotlb, per-CPU shared pages, a few driver buffers. Prints the
/// bytes per range.
#[test]
fn ordinary_maps_take_few_bytes_per_range() {
    // 16 GiB: 3 GiB below the PCI hole, 13 GiB above 4 GiB.
    let l = layout(&[(0, 3 * GIB_PAGES), (4 * GIB_PAGES, 13 * GIB_PAGES)]);
    let t = Tracker::new(l);
    let shared = |gfn: u64, n: u64| t.map_gpa_range(gfn << PAGE_SHIFT, n, 0).unwrap();
    shared(0xbc000, 0x4000); // 64 MiB swiotlb below 4 GiB
    for cpu in 0..64u64 {
        shared(0x1_0000 + cpu * 0x200, 1); // GHCB
        shared(0x20_0000 + cpu * 0x1001, 2); // per-CPU kvmclock / steal time
    }
    for k in 0..100u64 {
        shared(0x30_0000 + k * 0x1333, 1 + k % 17); // driver DMA buffers above 4 GiB
    }
    let ranges = t.stats().unwrap().shared_ranges;
    let len = stream::encoded_len(&t).unwrap();
    let fixed = overhead(&t.layout().unwrap());
    let per_range = (len - fixed) as f64 / ranges as f64;
    eprintln!("ordinary 16 GiB map: {ranges} ranges, {len} bytes, {per_range:.2} bytes/range");
    assert!(len <= fixed + 16 * ranges as usize);
    round_trip(&t).unwrap();
}

/// Every other page shared: the worst case for ranges. The stream must stay within a bitmap of
/// RAM plus the header and one record header.
#[test]
fn hostile_maps_stay_within_a_bitmap_of_ram() {
    for (name, ram) in [
        ("1 GiB", vec![(0, GIB_PAGES)]),
        (
            "16 GiB",
            vec![(0, 3 * GIB_PAGES), (4 * GIB_PAGES, 13 * GIB_PAGES)],
        ),
    ] {
        let l = layout(&ram);
        let mut b = PageMapBuilder::new(l.clone());
        for rr in l.ranges() {
            for g in (rr.start..rr.end).step_by(2) {
                b.push(r(g, g + 1)).unwrap();
            }
        }
        let t = Tracker::new(l.clone());
        t.replace(b.finish(), 0).unwrap();
        let bytes = stream::save_to_vec(&t).unwrap();
        let bound = (l.pages() / 8) as usize + overhead(&l) + 2 * 24;
        eprintln!(
            "hostile {name}: {} ranges, {} bytes, bitmap of RAM {} bytes",
            l.pages() / 2,
            bytes.len(),
            l.pages() / 8
        );
        assert!(bytes.len() <= bound, "{name}: {} > {bound}", bytes.len());
        let (map, msr) = stream::decode(&l, &bytes).unwrap();
        assert_eq!(msr, 0);
        assert_eq!(map.shared_pages(), l.pages() / 2);
        assert!(map.shared_ranges().eq(t.shared_ranges().unwrap()));
    }
}

#[test]
fn a_failing_writer_gives_an_io_error() {
    struct Broken;
    impl std::io::Write for Broken {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("socket closed"))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let (_, src) = small_source();
    let e = stream::save(&src, &mut Broken).unwrap_err();
    assert_eq!(e.kind(), StreamErrorKind::Io);
    assert!(e.to_string().contains("socket closed"), "{e}");
    // The lower-level encoder writes what encode_to_vec returns.
    let mut out = Vec::new();
    let n = src
        .with_map(|map, msr| stream::encode(map, msr, &mut out))
        .unwrap()
        .unwrap();
    assert_eq!(n, out.len());
    assert_eq!(out, stream::save_to_vec(&src).unwrap());
    // 3000 single pages as range records would take at least 3 bytes each: the hostile chunk
    // must have gone out as a bitmap.
    assert!(out.len() < 3 * 3000, "{} bytes", out.len());
}

/// Issue 10, point 1: two layouts with the same RAM size and the same end of RAM are still
/// different layouts. Saved with RAM [0,3G)+[4G,9G), the stream must not load into
/// [0,2G)+[3G,9G) (version 1 compared only size and end and loaded it).
#[test]
fn a_stream_for_another_layout_of_the_same_size_and_end_is_refused() {
    let src_layout = layout(&[(0, 3 * GIB_PAGES), (4 * GIB_PAGES, 5 * GIB_PAGES)]);
    let dst_layout = layout(&[(0, 2 * GIB_PAGES), (3 * GIB_PAGES, 6 * GIB_PAGES)]);
    assert_eq!(src_layout.pages(), dst_layout.pages());
    assert_eq!(
        src_layout.ranges().last().unwrap().end,
        dst_layout.ranges().last().unwrap().end
    );
    // Shared pages that are RAM on both sides, so that only the layout can tell them apart.
    let src = tracker_with(
        &src_layout,
        &[r(16, 32), r(5 * GIB_PAGES, 5 * GIB_PAGES + 9)],
        1,
    );
    let bytes = stream::save_to_vec(&src).unwrap();
    let e = load_fails(&dst_layout, &bytes);
    assert!(
        matches!(
            e,
            StreamError::LayoutRangeMismatch {
                index: 0,
                stream: Some(s),
                destination: Some(d),
                ..
            } if s == r(0, 3 * GIB_PAGES) && d == r(0, 2 * GIB_PAGES)
        ),
        "{e}"
    );
    assert_eq!(e.kind(), StreamErrorKind::LayoutMismatch);
    assert_eq!(e.problem(), StreamProblem::WrongLayout);
    let msg = e.to_string();
    assert!(msg.contains("another RAM layout"), "{msg}");
    assert!(msg.contains("gpa [0x0, 0xc0000000)"), "{msg}");
    // A destination with one range more (same size and end: [0,3G) split at 1G... cannot be,
    // ranges are coalesced; so: the same ranges plus a hotplugged DIMM) is another layout too.
    let more = layout(&[
        (0, 3 * GIB_PAGES),
        (4 * GIB_PAGES, 5 * GIB_PAGES),
        (64 * GIB_PAGES, 1),
    ]);
    let e = load_fails(&more, &bytes);
    assert_eq!(e.problem(), StreamProblem::WrongLayout, "{e}");
    // The same layout, described in other pieces, is the same layout.
    let same = layout(&[
        (4 * GIB_PAGES, 5 * GIB_PAGES),
        (0, GIB_PAGES),
        (GIB_PAGES, 2 * GIB_PAGES),
    ]);
    let dst = Tracker::new(same);
    stream::load(&dst, &bytes).unwrap();
    assert_eq!(dst.shared_ranges().unwrap(), src.shared_ranges().unwrap());
}

/// Issue 10, point 2: every single-byte change of a valid stream is refused through the public
/// API, and the destination stays as it was (version 1 loaded 3.5 % of them: one bit in a start
/// gfn moved a shared range). Every value at every offset of a range-record stream; three
/// values per offset of a stream with a 4 KiB bitmap record.
#[test]
fn every_single_byte_change_is_refused() {
    let l = layout(&[(0, 3 * CHUNK), (4 * CHUNK, 2 * CHUNK)]);
    let src = tracker_with(
        &l,
        &[
            r(16, 32),
            r(100, 101),
            r(CHUNK - 3, CHUNK + 40),
            r(5 * CHUNK, 5 * CHUNK + 7),
        ],
        1,
    );
    let bytes = stream::save_to_vec(&src).unwrap();
    let mut refused = 0;
    for i in 0..bytes.len() {
        for v in 0..=255u8 {
            if v == bytes[i] {
                continue;
            }
            let mut b = bytes.clone();
            b[i] = v;
            load_fails(&l, &b);
            refused += 1;
        }
    }
    assert_eq!(refused, bytes.len() * 255);

    let (layout, src) = small_source();
    let bytes = stream::save_to_vec(&src).unwrap();
    assert!(bytes.len() > CHUNK_BYTES, "the stream has a bitmap record");
    for i in 0..bytes.len() {
        for x in [0x01u8, 0x80, 0xff] {
            let mut b = bytes.clone();
            b[i] ^= x;
            let e = load_fails(&layout, &b);
            // Only the magic and the version come before the checksum.
            if i >= 6 {
                assert_eq!(
                    e.problem(),
                    StreamProblem::Damaged,
                    "byte {i} ^ {x:#x}: {e}"
                );
            }
        }
    }
}
