//! The structures pagenc is measured against, all behind one small trait so that every workload
//! drives them with the same calls on the same data.
//!
//! Every baseline stores only RAM pages: the harness clips each guest call to the RAM layout
//! first (pagenc clips internally), so all structures hold the same set and can be compared
//! range for range.

use std::collections::BTreeMap;

use pagenc::core::PageRange;
use pagenc::tracker::CursorState;
use pagenc::{Layout, PageState, Tracker};

/// KVM_MAP_GPA_RANGE_ENCRYPTED.
pub const ATTR_ENCRYPTED: u64 = 0x10;

/// A set of shared gfns, as each structure keeps it.
pub trait Store {
    /// Short name for tables and JSON.
    const NAME: &'static str;
    /// Sets RAM pages `[start, end)` (already clipped to one RAM range) to shared or encrypted.
    fn set(&mut self, start: u64, end: u64, shared: bool);
    /// Is `gfn` shared? (A point lookup with no state kept between calls.)
    fn get(&self, gfn: u64) -> bool;
    /// The maximal shared ranges, ascending (for the cross-checks).
    fn ranges(&self) -> Vec<(u64, u64)>;
    /// A guest call of `npages` from `gfn`: clipped to RAM, then applied.
    fn apply(&mut self, layout: &Layout, gfn: u64, npages: u64, shared: bool) {
        for p in layout.clip(PageRange {
            start: gfn,
            end: gfn + npages,
        }) {
            self.set(p.start, p.end, shared);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// pagenc

/// pagenc's Tracker, driven through the hypercall entry point exactly as a vCPU thread would.
pub struct Pagenc {
    pub t: Tracker,
}

impl Pagenc {
    pub fn new(layout: Layout) -> Pagenc {
        Pagenc {
            t: Tracker::new(layout),
        }
    }

    /// The whole hypercall handler: validation, lock, update.
    #[inline]
    pub fn call(&self, gfn: u64, npages: u64, shared: bool) {
        let attrs = if shared { 0 } else { ATTR_ENCRYPTED };
        self.t
            .handle_hypercall(12, [gfn << 12, npages, attrs])
            .expect("the bench only issues valid calls");
    }
}

impl Store for Pagenc {
    const NAME: &'static str = "pagenc";
    fn set(&mut self, start: u64, end: u64, shared: bool) {
        self.call(start, end - start, shared);
    }
    fn apply(&mut self, _layout: &Layout, gfn: u64, npages: u64, shared: bool) {
        self.call(gfn, npages, shared);
    }
    fn get(&self, gfn: u64) -> bool {
        self.t.state(gfn << 12).expect("tracker usable") == PageState::Shared
    }
    fn ranges(&self) -> Vec<(u64, u64)> {
        self.t
            .shared_ranges()
            .expect("tracker usable")
            .into_iter()
            .map(|r| (r.start, r.end))
            .collect()
    }
}

/// pagenc's per-page query as QEMU's RAM loop would use it.
#[inline]
pub fn pagenc_cursor_shared(c: &mut CursorState, t: &Tracker, gfn: u64) -> bool {
    c.query(t, gfn).expect("tracker usable").state == PageState::Shared
}

// ---------------------------------------------------------------------------------------------
// B0: plain bitmap

/// B0: one bit per 4 KiB page of each RAM range (QEMU keeps its dirty bitmaps per RAMBlock the
/// same way). The speed limit for point lookups; memory fixed at RAM/32768.
pub struct B0 {
    pub blocks: Vec<(u64, u64, Vec<u64>)>,
}

impl B0 {
    pub fn new(layout: &Layout) -> B0 {
        B0 {
            blocks: layout
                .ranges()
                .iter()
                .map(|r| (r.start, r.end, vec![0u64; r.len().div_ceil(64) as usize]))
                .collect(),
        }
    }

    #[inline]
    fn block(&self, gfn: u64) -> Option<&(u64, u64, Vec<u64>)> {
        self.blocks.iter().find(|b| b.0 <= gfn && gfn < b.1)
    }
}

fn mask(lo: u64, hi: u64) -> u64 {
    let upper = if hi == 64 { !0 } else { (1u64 << hi) - 1 };
    upper & !((1u64 << lo) - 1)
}

impl Store for B0 {
    const NAME: &'static str = "B0-bitmap";
    fn set(&mut self, start: u64, end: u64, shared: bool) {
        let b = self
            .blocks
            .iter_mut()
            .find(|b| b.0 <= start && end <= b.1)
            .expect("clipped to one RAM range");
        let (s, e) = (start - b.0, end - b.0);
        let mut pos = s;
        while pos < e {
            let w = (pos / 64) as usize;
            let hi = (e - w as u64 * 64).min(64);
            let m = mask(pos % 64, hi);
            if shared {
                b.2[w] |= m;
            } else {
                b.2[w] &= !m;
            }
            pos = (w as u64 + 1) * 64;
        }
    }
    #[inline]
    fn get(&self, gfn: u64) -> bool {
        match self.block(gfn) {
            Some(b) => {
                let i = gfn - b.0;
                b.2[(i / 64) as usize] >> (i % 64) & 1 != 0
            }
            None => false,
        }
    }
    fn ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (start, end, words) in &self.blocks {
            for (w, &word) in words.iter().enumerate() {
                let mut x = word;
                while x != 0 {
                    let s = x.trailing_zeros() as u64;
                    let len = (!(x >> s)).trailing_zeros().min(64 - s as u32) as u64;
                    let a = start + w as u64 * 64 + s;
                    let b = (a + len).min(*end);
                    match out.last_mut() {
                        Some(l) if l.1 == a => l.1 = b,
                        _ => out.push((a, b)),
                    }
                    x = if s + len >= 64 {
                        0
                    } else {
                        x & !mask(s, s + len)
                    };
                }
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// B1: BTreeMap<u64, u64> range set

/// B1: start -> end of each maximal shared range, coalescing on insert, splitting on remove.
/// What a careful engineer writes first.
#[derive(Default)]
pub struct B1 {
    pub m: BTreeMap<u64, u64>,
}

impl B1 {
    fn insert(&mut self, start: u64, end: u64) {
        let (mut s, mut e) = (start, end);
        if let Some((&ps, &pe)) = self.m.range(..=s).next_back() {
            if pe >= end {
                return; // already inside one range
            }
            if pe >= s {
                // Overlaps or touches the predecessor: grow it.
                s = ps;
                e = e.max(pe);
            }
        }
        // Absorb every range that starts inside or right at the end of [s, e].
        while let Some((&a, &b)) = self.m.range(s + 1..=e).next() {
            e = e.max(b);
            self.m.remove(&a);
        }
        self.m.insert(s, e);
    }

    fn remove(&mut self, start: u64, end: u64) {
        if let Some((&ps, &pe)) = self.m.range(..start).next_back() {
            if pe > start {
                self.m.insert(ps, start);
                if pe > end {
                    self.m.insert(end, pe);
                    return;
                }
            }
        }
        while let Some((&a, &b)) = self.m.range(start..end).next() {
            self.m.remove(&a);
            if b > end {
                self.m.insert(end, b);
                break;
            }
        }
    }
}

impl Store for B1 {
    const NAME: &'static str = "B1-btreemap";
    fn set(&mut self, start: u64, end: u64, shared: bool) {
        if shared {
            self.insert(start, end)
        } else {
            self.remove(start, end)
        }
    }
    #[inline]
    fn get(&self, gfn: u64) -> bool {
        self.m
            .range(..=gfn)
            .next_back()
            .is_some_and(|(_, &e)| e > gfn)
    }
    fn ranges(&self) -> Vec<(u64, u64)> {
        self.m.iter().map(|(&a, &b)| (a, b)).collect()
    }
}

impl B1 {
    /// The run of equal state holding `gfn`, as `(start, end, shared)`; an encrypted run is
    /// reported from `gfn` (a forward cursor needs no more). Two O(log n) lookups.
    pub fn run_at(&self, gfn: u64) -> (u64, u64, bool) {
        let prev = self.m.range(..=gfn).next_back();
        if let Some((&s, &e)) = prev {
            if e > gfn {
                return (s, e, true);
            }
        }
        let next = self.m.range(gfn + 1..).next().map_or(u64::MAX, |(&s, _)| s);
        (gfn, next, false)
    }
}

// ---------------------------------------------------------------------------------------------
// A cursor for the B-trees (issue 12: baselines at their best)

/// What a careful engineer gives a B-tree range set for QEMU's ascending scan: the run the last
/// answer came from, and a lookup only when a query leaves it. pagenc's cursor does the same
/// (plus a lock and a generation check, since its map changes under it); B1 and rangemap are
/// scanned here without either, which flatters them.
#[derive(Default)]
pub struct RunCache {
    start: u64,
    end: u64,
    shared: bool,
}

impl RunCache {
    #[inline(always)]
    pub fn get(&mut self, gfn: u64, run_at: impl FnOnce(u64) -> (u64, u64, bool)) -> bool {
        if gfn < self.start || gfn >= self.end {
            (self.start, self.end, self.shared) = run_at(gfn);
        }
        self.shared
    }
}

// ---------------------------------------------------------------------------------------------
// The rangemap crate

/// `rangemap::RangeSet<u64>`: a coalescing BTreeMap of ranges, the crate B1 would be replaced by.
#[derive(Default)]
pub struct RangeMapSet {
    pub s: rangemap::RangeSet<u64>,
}

impl RangeMapSet {
    /// As [`B1::run_at`], with one lookup: the first range ending after `gfn`.
    pub fn run_at(&self, gfn: u64) -> (u64, u64, bool) {
        match self.s.overlapping(gfn..u64::MAX).next() {
            Some(r) if r.start <= gfn => (r.start, r.end, true),
            Some(r) => (gfn, r.start, false),
            None => (gfn, u64::MAX, false),
        }
    }
}

impl Store for RangeMapSet {
    const NAME: &'static str = "rangemap";
    fn set(&mut self, start: u64, end: u64, shared: bool) {
        if shared {
            self.s.insert(start..end)
        } else {
            self.s.remove(start..end)
        }
    }
    #[inline]
    fn get(&self, gfn: u64) -> bool {
        self.s.contains(&gfn)
    }
    fn ranges(&self) -> Vec<(u64, u64)> {
        self.s.iter().map(|r| (r.start, r.end)).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// B2: AMD's 2021 QEMU shared-regions list

/// One node of AMD's `struct shared_region { gfn_start, gfn_end; QTAILQ_ENTRY list; }`: 32
/// bytes plus one malloc each. `_prev` stands for QTAILQ's back link, kept for the size only.
struct Node {
    start: u64,
    end: u64,
    next: Option<Box<Node>>,
    _prev: usize,
}

/// B2: the linked-list design of AMD's 2021 QEMU series (`sev_add_shared_regions_list`,
/// `sev_remove_shared_regions_list`, `sev_is_gfn_in_unshared_region`): a sorted list of
/// half-open `[gfn_start, gfn_end)`, walked linearly for every update and every page lookup.
///
/// This implements the *intended* semantics correctly. The original had these bugs, which are
/// fixed here so that B2 stores the same set as everyone else (see the facts file, section 4.2):
/// - the forward merge (`pos.start <= start <= pos.end` -> `pos.end = end`) never merged the
///   following nodes the grown range now overlapped or touched (here they are absorbed);
/// - a new range starting before `pos` but overlapping it, or ending exactly at `pos.start`,
///   was inserted as a separate node (here it merges);
/// - `QTAILQ_REMOVE` inside a plain `QTAILQ_FOREACH`, and removed nodes were leaked (here the
///   walk continues correctly and nodes are freed);
/// - `if (enc)` tested the whole attribute word (the harness decodes the state for everyone).
///
/// The lookup stops at the first node past `gfn`, which the original did not (it walked the whole
/// list for every encrypted page): B2 is measured at its best.
#[derive(Default)]
pub struct B2 {
    head: Option<Box<Node>>,
    pub len: usize,
}

impl Drop for B2 {
    fn drop(&mut self) {
        // Iteratively: the default recursive drop overflows the stack on long lists.
        let mut cur = self.head.take();
        while let Some(mut n) = cur {
            cur = n.next.take();
        }
    }
}

impl B2 {
    fn add(&mut self, start: u64, end: u64) {
        let mut link = &mut self.head;
        while link.as_ref().is_some_and(|n| n.end < start) {
            link = &mut link.as_mut().expect("checked").next;
        }
        match link {
            Some(n) if n.start <= end => {
                n.start = n.start.min(start);
                n.end = n.end.max(end);
                while n.next.as_ref().is_some_and(|m| m.start <= n.end) {
                    let mut m = n.next.take().expect("checked");
                    n.end = n.end.max(m.end);
                    n.next = m.next.take();
                    self.len -= 1;
                }
            }
            _ => {
                let next = link.take();
                *link = Some(Box::new(Node {
                    start,
                    end,
                    next,
                    _prev: 0,
                }));
                self.len += 1;
            }
        }
    }

    fn remove(&mut self, start: u64, end: u64) {
        let mut link = &mut self.head;
        while link.as_ref().is_some_and(|n| n.end <= start) {
            link = &mut link.as_mut().expect("checked").next;
        }
        while let Some((ns, ne)) = link.as_ref().map(|n| (n.start, n.end)) {
            if ns >= end {
                break;
            }
            if ns < start && ne > end {
                // De-merge: split the node in two.
                let n = link.as_mut().expect("checked");
                let tail = Box::new(Node {
                    start: end,
                    end: ne,
                    next: n.next.take(),
                    _prev: 0,
                });
                n.next = Some(tail);
                n.end = start;
                self.len += 1;
                break;
            }
            if ns < start {
                link.as_mut().expect("checked").end = start;
                link = &mut link.as_mut().expect("checked").next;
                continue;
            }
            if ne > end {
                link.as_mut().expect("checked").start = end;
                break;
            }
            let mut dead = link.take().expect("checked");
            *link = dead.next.take();
            self.len -= 1;
        }
    }
}

impl Store for B2 {
    const NAME: &'static str = "B2-amd-list";
    fn set(&mut self, start: u64, end: u64, shared: bool) {
        if shared {
            self.add(start, end)
        } else {
            self.remove(start, end)
        }
    }
    #[inline]
    fn get(&self, gfn: u64) -> bool {
        let mut cur = self.head.as_deref();
        while let Some(n) = cur {
            if gfn < n.start {
                return false;
            }
            if gfn < n.end {
                return true;
            }
            cur = n.next.as_deref();
        }
        false
    }
    fn ranges(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::with_capacity(self.len);
        let mut cur = self.head.as_deref();
        while let Some(n) = cur {
            out.push((n.start, n.end));
            cur = n.next.as_deref();
        }
        out
    }
}
