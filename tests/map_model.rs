//! The page map and the tracker against a plain per-page model: random sequences of updates,
//! resets, layout changes, queries and iteration, including hostile fragmentation and ranges far
//! larger than RAM.

use pagenc::core::{Layout, PageMap, PageRange, PageState, RamRange, MAX_GFN, PAGE_SHIFT};
use pagenc::tracker::CursorState;
use pagenc::Tracker;
use proptest::prelude::*;

/// One bool per gfn below `limit`; true = shared. Pages at or above `limit` are never RAM in
/// these tests, so the model needs nothing there.
#[derive(Clone)]
struct Model {
    ram: Vec<bool>,
    shared: Vec<bool>,
}

impl Model {
    fn new(layout: &Layout, limit: u64) -> Model {
        let mut ram = vec![false; limit as usize];
        for r in layout.ranges() {
            for g in r.start..r.end {
                ram[g as usize] = true;
            }
        }
        Model {
            shared: vec![false; limit as usize],
            ram,
        }
    }

    fn set(&mut self, range: PageRange, state: PageState) -> (u64, Vec<PageRange>) {
        let mut flips = vec![];
        let mut flipped = 0;
        let end = range.end.min(self.ram.len() as u64);
        for g in range.start.min(end)..end {
            let g = g as usize;
            let want = state == PageState::Shared;
            if self.ram[g] && self.shared[g] != want {
                self.shared[g] = want;
                flipped += 1;
                match flips.last_mut() {
                    Some(PageRange { end, .. }) if *end == g as u64 => *end += 1,
                    _ => flips.push(PageRange {
                        start: g as u64,
                        end: g as u64 + 1,
                    }),
                }
            }
        }
        (flipped, flips)
    }

    fn ranges(&self) -> Vec<PageRange> {
        let mut out: Vec<PageRange> = vec![];
        for (g, &s) in self.shared.iter().enumerate() {
            if s {
                match out.last_mut() {
                    Some(r) if r.end == g as u64 => r.end += 1,
                    _ => out.push(PageRange {
                        start: g as u64,
                        end: g as u64 + 1,
                    }),
                }
            }
        }
        out
    }

    fn state(&self, g: u64) -> PageState {
        if self.shared.get(g as usize) == Some(&true) {
            PageState::Shared
        } else {
            PageState::Encrypted
        }
    }

    /// Where the state at `g` ends (the model's run end).
    fn run_end(&self, g: u64) -> u64 {
        let s = self.state(g);
        let mut e = g + 1;
        while (e as usize) < self.shared.len() && self.state(e) == s {
            e += 1;
        }
        if e as usize >= self.shared.len() && s == PageState::Encrypted {
            MAX_GFN
        } else {
            e
        }
    }
}

/// Pages per chunk in the map (2^15): tests straddle chunk borders on purpose.
const CHUNK: u64 = 1 << 15;
/// The model covers 6 chunks.
const LIMIT: u64 = 6 * CHUNK;

fn layout_strategy() -> impl Strategy<Value = Vec<RamRange>> {
    // Up to 4 disjoint RAM ranges inside [0, LIMIT), like RAM below and above a PCI hole.
    proptest::collection::btree_set(0..LIMIT / 64, 2..=8).prop_map(|cuts| {
        let cuts: Vec<u64> = cuts.into_iter().map(|c| c * 64).collect();
        cuts.chunks(2)
            .filter(|p| p.len() == 2)
            .map(|p| RamRange {
                gpa: p[0] << PAGE_SHIFT,
                size: (p[1] - p[0]) << PAGE_SHIFT,
            })
            .collect()
    })
}

#[derive(Debug, Clone)]
enum Op {
    Set(u64, u64, bool),
    Fragment(u64, u64, u64, bool),
    Ascending(u64, u64, u64, bool),
    Huge(bool),
    Reset,
    Relayout(Vec<RamRange>),
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..LIMIT, 1..3 * CHUNK, any::<bool>()).prop_map(|(s, n, sh)| Op::Set(s, n, sh)),
        4 => (0..LIMIT, 1..64u64, any::<bool>()).prop_map(|(s, n, sh)| Op::Set(s, n, sh)),
        2 => (0..LIMIT, 1..4u64, 500..3000u64, any::<bool>())
            .prop_map(|(s, step, n, sh)| Op::Fragment(s, step, n, sh)),
        2 => (0..LIMIT, 1..600u64, 2..40u64, any::<bool>())
            .prop_map(|(s, n, count, sh)| Op::Ascending(s, n, count, sh)),
        1 => any::<bool>().prop_map(Op::Huge),
        1 => Just(Op::Reset),
        1 => layout_strategy().prop_map(Op::Relayout),
    ]
}

fn check(map: &PageMap, model: &Model) -> Result<(), TestCaseError> {
    prop_assert_eq!(map.check_invariants(), Ok(()));
    let got: Vec<PageRange> = map.shared_ranges().collect();
    prop_assert_eq!(&got, &model.ranges());
    prop_assert_eq!(
        map.shared_pages(),
        model.shared.iter().filter(|&&s| s).count() as u64
    );
    prop_assert_eq!(map.range_count(), got.len() as u64);
    // Memory stays within a bitmap of the model's address space plus the directory.
    prop_assert!(map.heap_bytes() as u64 <= LIMIT / 8 * 5 / 4 + 64 * 1024);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn map_matches_per_page_model(ram in layout_strategy(), ops in proptest::collection::vec(op_strategy(), 1..40), probes in proptest::collection::vec(0..LIMIT, 32)) {
        let layout = Layout::new(&ram).unwrap();
        let mut map = PageMap::new(layout.clone());
        let mut model = Model::new(&layout, LIMIT);
        for op in ops {
            let state = |sh: bool| if sh { PageState::Shared } else { PageState::Encrypted };
            // A snapshot shares the chunks copy-on-write: whatever the op does to the map, the
            // snapshot must keep the map as it was.
            let snap = map.snapshot();
            let before = model.ranges();
            match op {
                Op::Set(s, n, sh) => {
                    let r = PageRange { start: s, end: s + n };
                    let mut flips = vec![];
                    let sum = map.set(r, state(sh), &mut |f| flips.push(f));
                    let (flipped, want) = model.set(r, state(sh));
                    prop_assert_eq!(sum.flipped, flipped);
                    prop_assert_eq!(flips, want, "flips must be the maximal changed ranges");
                    let in_ram: u64 = layout_pages_in(map.layout(), r);
                    prop_assert_eq!(sum.clipped, n - in_ram);
                }
                Op::Fragment(s, step, n, sh) => {
                    // A guest that fragments memory on purpose: one page every `step + 1`.
                    for i in 0..n {
                        let g = s + i * (step + 1);
                        let r = PageRange { start: g, end: g + 1 };
                        map.set(r, state(sh), &mut |_| {});
                        model.set(r, state(sh));
                    }
                }
                Op::Ascending(s, n, count, sh) => {
                    // swiotlb: adjacent calls in ascending order, each extending the last range.
                    for i in 0..count {
                        let r = PageRange { start: s + i * n, end: s + (i + 1) * n };
                        let sum = map.set(r, state(sh), &mut |_| {});
                        prop_assert_eq!(sum.flipped, model.set(r, state(sh)).0);
                    }
                }
                Op::Huge(sh) => {
                    // OVMF-style call over the whole 52-bit space: clipped to RAM, O(1) memory.
                    let r = PageRange { start: 0, end: MAX_GFN };
                    map.set(r, state(sh), &mut |_| {});
                    model.set(r, state(sh));
                }
                Op::Reset => {
                    let mut flips = vec![];
                    let old = map.clear(Some(&mut |f| flips.push(f)));
                    prop_assert_eq!(flips, model.ranges());
                    prop_assert!(old.shared_ranges().eq(model.ranges()));
                    model.set(PageRange { start: 0, end: LIMIT }, PageState::Encrypted);
                }
                Op::Relayout(ram) => {
                    let new = Layout::new(&ram).unwrap();
                    map.set_layout(new.clone());
                    let mut m2 = Model::new(&new, LIMIT);
                    for r in model.ranges() {
                        m2.set(r, PageState::Shared);
                    }
                    model = m2;
                }
            }
            prop_assert!(snap.shared_ranges().eq(before.iter().copied()), "the snapshot changed");
            check(&map, &model)?;
        }
        for g in probes {
            let run = map.run_at(g);
            prop_assert_eq!(run.state, model.state(g), "state of gfn {}", g);
            prop_assert_eq!(run.range.end, model.run_end(g), "run end of gfn {}", g);
            prop_assert_eq!(map.state(g), model.state(g));
        }
    }

    #[test]
    fn tracker_cursor_and_runs_match_model(ram in layout_strategy(), ops in proptest::collection::vec((0..LIMIT, 1..2 * CHUNK, any::<bool>()), 1..30), step in 1..4000u64) {
        let layout = Layout::new(&ram).unwrap();
        let tracker = Tracker::new(layout.clone());
        let mut model = Model::new(&layout, LIMIT);
        for (s, n, sh) in ops {
            let attrs = if sh { 0 } else { 0x10 };
            let out = tracker.map_gpa_range(s << PAGE_SHIFT, n, attrs).unwrap();
            let st = if sh { PageState::Shared } else { PageState::Encrypted };
            let (flipped, _) = model.set(PageRange { start: s, end: s + n }, st);
            prop_assert_eq!(out.summary.flipped, flipped);
        }
        // Ascending cursor walk with a stride, as the RAM loop does over dirty pages.
        let mut cur = CursorState::new();
        let mut g = 0;
        while g < LIMIT {
            let run = cur.query(&tracker, g).unwrap();
            prop_assert_eq!(run.state, model.state(g));
            prop_assert_eq!(run.range.end, model.run_end(g));
            g += step;
        }
        // Runs over a window: alternate, cover it exactly, and agree with the model.
        let window = PageRange { start: step, end: LIMIT - step };
        let mut pos = window.start;
        let mut prev: Option<PageState> = None;
        for run in tracker.runs(window, false) {
            let run = run.unwrap();
            prop_assert_eq!(run.range.start, pos);
            prop_assert!(prev != Some(run.state), "runs must be maximal");
            for probe in [run.range.start, run.range.end - 1] {
                prop_assert_eq!(model.state(probe), run.state);
            }
            prev = Some(run.state);
            pos = run.range.end;
        }
        prop_assert_eq!(pos, window.end);
        let shared: Vec<PageRange> = tracker.runs(PageRange { start: 0, end: MAX_GFN }, true).map(|r| r.unwrap().range).collect();
        prop_assert_eq!(shared, model.ranges());
    }
}

fn layout_pages_in(layout: &Layout, r: PageRange) -> u64 {
    layout.clip(r).map(|p| p.len()).sum()
}

#[test]
fn hostile_fragmentation_stays_under_a_bitmap() {
    // 16 GiB guest, every other page shared: 2 M ranges must cost about a bitmap (512 KiB), not
    // the 68 MiB a BTreeMap of ranges would take.
    let pages = 16u64 << (30 - PAGE_SHIFT);
    let layout = Layout::new(&[RamRange {
        gpa: 0,
        size: pages << PAGE_SHIFT,
    }])
    .unwrap();
    let mut map = PageMap::new(layout);
    for g in (0..pages).step_by(2) {
        map.set(
            PageRange {
                start: g,
                end: g + 1,
            },
            PageState::Shared,
            &mut |_| {},
        );
    }
    assert_eq!(map.range_count(), pages / 2);
    let bitmap = (pages / 8) as usize;
    assert!(
        map.heap_bytes() <= bitmap * 5 / 4 + 64 * 1024,
        "{} bytes for a {} byte bitmap",
        map.heap_bytes(),
        bitmap
    );
    assert!(map.heap_bytes() < 640 * 1024);
    println!(
        "hostile 16 GiB: {} ranges in {} bytes",
        map.range_count(),
        map.heap_bytes()
    );
    // Encrypting all of RAM again in one call (Linux's E820 reset) empties it.
    let sum = map.set(
        PageRange {
            start: 0,
            end: pages,
        },
        PageState::Encrypted,
        &mut |_| {},
    );
    assert_eq!(sum.flipped, pages / 2);
    assert_eq!(map.range_count(), 0);
    assert!(map.heap_bytes() < 4096);
}

#[test]
fn ordinary_layout_costs_about_32_bytes_a_range_or_less() {
    // 300 scattered shared ranges in a 16 GiB guest (per-CPU pages, DMA buffers): 2.3 ranges in
    // each of 128 chunks, so the per-chunk cost dominates: a 16-byte directory entry and, since
    // the chunks are shared copy-on-write with snapshots (issue 10), 40 bytes of `Arc` counters
    // and `Vec` header, then 4 bytes a range. (Before copy-on-write: 40 + 4 a range, 24 bytes a
    // range here; the snapshot that keeps the stream encoder off the lock costs ~8 more.)
    let pages = 16u64 << (30 - PAGE_SHIFT);
    let layout = Layout::new(&[RamRange {
        gpa: 0,
        size: pages << PAGE_SHIFT,
    }])
    .unwrap();
    let mut map = PageMap::new(layout);
    let mut x = 12345u64;
    for _ in 0..300 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let g = (x >> 20) % (pages - 16);
        map.set(
            PageRange {
                start: g,
                end: g + 1 + (x & 7),
            },
            PageState::Shared,
            &mut |_| {},
        );
    }
    let ranges = map.range_count();
    let per_range = map.heap_bytes() as u64 / ranges;
    assert!(
        per_range <= 32,
        "{per_range} bytes per range over {ranges} ranges"
    );
}

/// Per-page run ends of the model, computed backwards in one pass (the cursor tests below ask
/// for tens of thousands of run ends; `Model::run_end` walks each run).
fn model_run_ends(model: &Model) -> Vec<u64> {
    let n = model.shared.len();
    let mut ends = vec![0u64; n];
    for g in (0..n).rev() {
        ends[g] = if g + 1 == n {
            if model.shared[g] {
                n as u64
            } else {
                MAX_GFN
            }
        } else if model.shared[g + 1] == model.shared[g] {
            ends[g + 1]
        } else {
            g as u64 + 1
        };
    }
    ends
}

/// Updates for the bitmap-chunk cursor test: fragmentation (single pages with gaps, enough of
/// them to turn a chunk into a bitmap), big ranges, and shared runs across a chunk border.
#[derive(Debug, Clone)]
enum FragOp {
    Set(u64, u64, bool),
    /// Every `step + 1`-th page from `start`, `n` pages, shared or not.
    Fragment(u64, u64, u64, bool),
    /// Shared `[c * CHUNK - before, c * CHUNK + after)`: a run leaving a (possibly bitmap)
    /// chunk into the next one.
    Border(u64, u64, u64),
}

fn frag_op_strategy() -> impl Strategy<Value = FragOp> {
    prop_oneof![
        3 => (0..LIMIT, 1..2 * CHUNK, any::<bool>()).prop_map(|(s, n, sh)| FragOp::Set(s, n, sh)),
        3 => (0..LIMIT, 1..64u64, any::<bool>()).prop_map(|(s, n, sh)| FragOp::Set(s, n, sh)),
        4 => (0..LIMIT, 1..4u64, 1100..4000u64, any::<bool>())
            .prop_map(|(s, step, n, sh)| FragOp::Fragment(s, step, n, sh)),
        3 => (1..LIMIT / CHUNK, 1..200u64, 1..(CHUNK + 100))
            .prop_map(|(c, before, after)| FragOp::Border(c, before, after)),
    ]
}

/// How the cursor test orders its queries.
#[derive(Debug, Clone)]
enum Walk {
    Ascending(u64),
    Descending(u64),
    /// Ascending with a varying stride, as the RAM loop over a dirty bitmap.
    Strides(Vec<u64>),
    Random(Vec<u64>),
}

fn walk_strategy() -> impl Strategy<Value = Walk> {
    prop_oneof![
        (1..4000u64).prop_map(Walk::Ascending),
        (1..4000u64).prop_map(Walk::Descending),
        proptest::collection::vec(1..4000u64, 1..64).prop_map(Walk::Strides),
        proptest::collection::vec(0..LIMIT + 10, 1..2000).prop_map(Walk::Random),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// The cursor over maps with bitmap chunks (where it answers from a copy of the chunk's
    /// words): every answer's state and run end must match the per-page model, including runs
    /// that leave a bitmap chunk into a full or run-form chunk, in any query order.
    #[test]
    fn tracker_cursor_over_bitmap_chunks_matches_model(
        whole in any::<bool>(),
        ram in layout_strategy(),
        first_chunk in 0..LIMIT / CHUNK,
        ops in proptest::collection::vec(frag_op_strategy(), 0..12),
        walks in proptest::collection::vec(walk_strategy(), 1..4),
    ) {
        let ram = if whole {
            vec![RamRange { gpa: 0, size: LIMIT << PAGE_SHIFT }]
        } else {
            ram
        };
        let layout = Layout::new(&ram).unwrap();
        let tracker = Tracker::new(layout.clone());
        let mut model = Model::new(&layout, LIMIT);
        let mut apply = |s: u64, n: u64, sh: bool| -> Result<(), TestCaseError> {
            let attrs = if sh { 0 } else { 0x10 };
            let out = tracker.map_gpa_range(s << PAGE_SHIFT, n, attrs).unwrap();
            let st = if sh { PageState::Shared } else { PageState::Encrypted };
            let (flipped, _) = model.set(PageRange { start: s, end: s + n }, st);
            prop_assert_eq!(out.summary.flipped, flipped);
            Ok(())
        };
        // Start from a chunk fragmented into more than 1024 runs wherever it is RAM.
        for i in 0..CHUNK / 2 {
            apply(first_chunk * CHUNK + 2 * i, 1, true)?;
        }
        for op in ops {
            match op {
                FragOp::Set(s, n, sh) => apply(s, n, sh)?,
                FragOp::Fragment(s, step, n, sh) => {
                    for i in 0..n {
                        apply(s + i * (step + 1), 1, sh)?;
                    }
                }
                FragOp::Border(c, before, after) => apply(c * CHUNK - before, before + after, true)?,
            }
        }
        let ends = model_run_ends(&model);
        let want = |g: u64| -> (PageState, u64) {
            if g < LIMIT {
                (model.state(g), ends[g as usize])
            } else {
                (PageState::Encrypted, MAX_GFN)
            }
        };
        let queries = |w: &Walk| -> Vec<u64> {
            match w {
                Walk::Ascending(s) => (0..LIMIT).step_by(*s as usize).collect(),
                Walk::Descending(s) => (0..LIMIT).rev().step_by(*s as usize).collect(),
                Walk::Strides(v) => {
                    let mut out = vec![];
                    let mut g = 0;
                    for s in v.iter().cycle() {
                        if g >= LIMIT {
                            break;
                        }
                        out.push(g);
                        g += s;
                    }
                    out
                }
                Walk::Random(v) => v.clone(),
            }
        };
        // One cursor for all walks: later walks start from whatever the earlier ones cached.
        let mut cur = CursorState::new();
        for w in &walks {
            for g in queries(w) {
                let run = cur.query(&tracker, g).unwrap();
                prop_assert_eq!(run.range.start, g);
                prop_assert_eq!((run.state, run.range.end), want(g), "gfn {} in {:?}", g, w);
            }
        }
        // The run iterator reads through the same cursor code.
        let mut pos = 0;
        for run in tracker.runs(PageRange { start: 0, end: LIMIT }, false) {
            let run = run.unwrap();
            prop_assert_eq!(run.range.start, pos);
            prop_assert_eq!((run.state, run.range.end), (want(pos).0, want(pos).1.min(LIMIT)));
            pos = run.range.end;
        }
        prop_assert_eq!(pos, LIMIT);
    }
}

#[test]
fn the_bitmap_test_maps_really_hold_bitmap_chunks() {
    // The cursor test above relies on its first fragmentation making a bitmap chunk.
    let layout = Layout::new(&[RamRange {
        gpa: 0,
        size: LIMIT << PAGE_SHIFT,
    }])
    .unwrap();
    let tracker = Tracker::new(layout);
    for i in 0..CHUNK / 2 {
        tracker
            .map_gpa_range((CHUNK + 2 * i) << PAGE_SHIFT, 1, 0)
            .unwrap();
    }
    let words = tracker
        .with_map(|m, _| m.bitmap_words(CHUNK + 77).map(|(base, w)| (base, w[0])))
        .unwrap();
    assert_eq!(words, Some((CHUNK, 0x5555_5555_5555_5555)));
    assert!(tracker
        .with_map(|m, _| m.bitmap_words(0).is_none())
        .unwrap());
}

#[test]
fn empty_or_reversed_ranges_change_nothing() {
    let layout = Layout::new(&[RamRange {
        gpa: 0,
        size: 1 << 30,
    }])
    .unwrap();
    let mut map = PageMap::new(layout);
    map.set(
        PageRange { start: 10, end: 20 },
        PageState::Shared,
        &mut |_| {},
    );
    for r in [
        PageRange { start: 15, end: 15 },
        PageRange { start: 30, end: 5 },
        PageRange {
            start: MAX_GFN + 5,
            end: MAX_GFN + 9,
        },
    ] {
        for st in [PageState::Shared, PageState::Encrypted] {
            let sum = map.set(r, st, &mut |f| panic!("no flip expected, got {f:?}"));
            assert_eq!((sum.flipped, sum.clipped), (0, 0), "{r:?}");
        }
    }
    assert_eq!(
        map.shared_ranges().collect::<Vec<_>>(),
        vec![PageRange { start: 10, end: 20 }]
    );
}
