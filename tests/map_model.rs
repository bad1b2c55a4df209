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
                    map.clear(&mut |f| flips.push(f));
                    prop_assert_eq!(flips, model.ranges());
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
fn ordinary_layout_costs_about_16_bytes_a_range_or_less() {
    // 300 scattered shared ranges in a 16 GiB guest (per-CPU pages, DMA buffers).
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
        per_range <= 24,
        "{per_range} bytes per range over {ranges} ranges"
    );
}
