//! The page map: a sparse, sorted directory of chunks (see [`super::chunk`]) over guest RAM.

use std::mem::size_of;

use super::chunk::{Chunk, BITMAP_WORDS, CHUNK_PAGES, CHUNK_SHIFT};
use super::slot::Slot;
use super::{Layout, PageRange, PageState, Run, MAX_GFN};

/// What one update did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UpdateSummary {
    /// Pages whose state really changed.
    pub flipped: u64,
    /// Pages of the request outside guest RAM (accepted, not stored).
    pub clipped: u64,
}

/// Which guest RAM pages are shared. Every RAM page not stored here is encrypted; pages outside
/// RAM are never stored and read as encrypted.
///
/// Costs: an update is O(log chunks + chunks touched + runs touched within them) and never
/// O(pages); memory is at most about one bit per page of RAM (a bitmap chunk) whatever the
/// update pattern, and about 4 bytes per range on ordinary layouts. A clone
/// ([`PageMap::snapshot`]) and a layout change are O(chunks), never O(ranges).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageMap {
    layout: Layout,
    /// Non-empty chunks, sorted by chunk number (gfn >> CHUNK_SHIFT), 16 bytes each.
    chunks: Vec<Slot>,
    shared_pages: u64,
}

fn chunk_of(gfn: u64) -> u64 {
    gfn >> CHUNK_SHIFT
}

fn base_of(chunk: u64) -> u64 {
    chunk << CHUNK_SHIFT
}

fn offset_of(gfn: u64) -> u32 {
    (gfn & (CHUNK_PAGES as u64 - 1)) as u32
}

/// Coalesces flipped sub-ranges from successive chunks into maximal ranges before reporting.
struct FlipSink<'a> {
    pending: Option<PageRange>,
    total: u64,
    out: &'a mut dyn FnMut(PageRange),
}

impl FlipSink<'_> {
    fn push(&mut self, start: u64, end: u64) {
        self.total += end - start;
        match &mut self.pending {
            Some(p) if p.end == start => p.end = end,
            _ => {
                if let Some(p) = self.pending.take() {
                    (self.out)(p);
                }
                self.pending = Some(PageRange { start, end });
            }
        }
    }
    fn finish(mut self) -> u64 {
        if let Some(p) = self.pending.take() {
            (self.out)(p);
        }
        self.total
    }
}

impl PageMap {
    /// An empty map (every page encrypted) over `layout`.
    pub fn new(layout: Layout) -> PageMap {
        PageMap {
            layout,
            chunks: Vec::new(),
            shared_pages: 0,
        }
    }

    /// The RAM layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Sets every RAM page in `range` to `state`. `flipped` is called, in ascending order, for
    /// every maximal range of pages whose state really changed; pages outside RAM are skipped
    /// and counted as clipped.
    pub fn set(
        &mut self,
        range: PageRange,
        state: PageState,
        flipped: &mut dyn FnMut(PageRange),
    ) -> UpdateSummary {
        let range = PageRange {
            start: range.start.min(MAX_GFN),
            end: range.end.min(MAX_GFN),
        };
        if range.is_empty() {
            // Nothing to do, and `range.len()` below must not underflow for a reversed range
            // from a careless caller (the hypercall path never builds one).
            return UpdateSummary::default();
        }
        let mut sink = FlipSink {
            pending: None,
            total: 0,
            out: flipped,
        };
        let mut in_ram = 0;
        let layout = std::mem::take(&mut self.layout);
        for piece in layout.clip(range) {
            in_ram += piece.len();
            match state {
                PageState::Shared => self.share(piece, &mut sink),
                PageState::Encrypted => self.encrypt(piece, &mut sink),
            }
        }
        self.layout = layout;
        let flipped = sink.finish();
        match state {
            PageState::Shared => self.shared_pages += flipped,
            PageState::Encrypted => self.shared_pages -= flipped,
        }
        UpdateSummary {
            flipped,
            clipped: range.len() - in_ram,
        }
    }

    /// Makes room for `n` more directory slots, growing by a quarter rather than Vec's
    /// doubling: a slot is 16 bytes per 128 MiB chunk (slot.rs), and on small boot lists (a
    /// few dozen ranges, one per chunk) doubling left up to half the directory empty, more than
    /// the whole of a B-tree holding the same ranges. Still geometric, so inserts stay amortised
    /// O(1); `n` at least the current length (a huge share from an empty map) is exact.
    fn grow(&mut self, n: usize) {
        let (len, cap) = (self.chunks.len(), self.chunks.capacity());
        if len + n > cap {
            self.chunks.reserve_exact(n.max(len / 4).max(4));
        }
    }

    fn share(&mut self, r: PageRange, sink: &mut FlipSink<'_>) {
        let (first, last) = (chunk_of(r.start), chunk_of(r.end - 1));
        let lo = self.chunks.partition_point(|s| s.num() < first);
        if first == last {
            // The common case (swiotlb, per-CPU pages, DMA buffers): one chunk, in place.
            let base = base_of(first);
            let (a, b) = (offset_of(r.start), offset_of(r.end - 1) + 1);
            match self.chunks.get_mut(lo) {
                Some(s) if s.num() == first => s.update(|chunk| {
                    chunk.set(a, b, true, &mut |x, y| {
                        sink.push(base + x as u64, base + y as u64)
                    })
                }),
                _ => {
                    sink.push(r.start, r.end);
                    self.grow(1);
                    self.chunks
                        .insert(lo, Slot::new(first, Chunk::with_range(a, b)));
                }
            }
            return;
        }
        // Several chunks, in two passes so that the directory grows in place: a huge range
        // (a guest sharing everything on a 4 PiB layout) must not hold the old stretch, a
        // vector of new chunks and the spliced directory at once (that peaked at twice the
        // final heap).
        let hi = self.chunks.partition_point(|s| s.num() <= last);
        let bounds = |c: u64| {
            let a = if c == first { offset_of(r.start) } else { 0 };
            let b = if c == last {
                offset_of(r.end - 1) + 1
            } else {
                CHUNK_PAGES
            };
            (a, b)
        };
        // 1. Ascending: update the chunks there are and report every flip in order, the
        //    pieces of missing chunks included.
        let mut j = lo;
        for c in first..=last {
            let base = base_of(c);
            let (a, b) = bounds(c);
            match self.chunks.get_mut(j) {
                Some(s) if s.num() == c => {
                    s.update(|chunk| {
                        chunk.set(a, b, true, &mut |x, y| {
                            sink.push(base + x as u64, base + y as u64)
                        })
                    });
                    j += 1;
                }
                _ => sink.push(base + a as u64, base + b as u64),
            }
        }
        // 2. Insert the missing chunks: grow once by their number (exactly, when they are at
        //    least as many as the directory holds, so a huge share from an empty map allocates
        //    its final size once), move the tail up once, and fill the gap from the top down,
        //    moving the existing chunks of the stretch into place. Placeholders are `Full`
        //    chunks, which own no heap.
        let missing = (last - first + 1) as usize - (hi - lo);
        if missing == 0 {
            return;
        }
        let len = self.chunks.len();
        self.grow(missing);
        self.chunks
            .resize_with(len + missing, || Slot::new(0, Chunk::Full));
        self.chunks[hi..].rotate_right(missing);
        let (mut pos, mut j) = (hi + missing, hi);
        for c in (first..=last).rev() {
            pos -= 1;
            if j > lo && self.chunks[j - 1].num() == c {
                j -= 1;
                self.chunks.swap(j, pos);
            } else {
                let (a, b) = bounds(c);
                self.chunks[pos] = Slot::new(c, Chunk::with_range(a, b));
            }
        }
        debug_assert_eq!((pos, j), (lo, lo));
    }

    fn encrypt(&mut self, r: PageRange, sink: &mut FlipSink<'_>) {
        let (first, last) = (chunk_of(r.start), chunk_of(r.end - 1));
        let lo = self.chunks.partition_point(|s| s.num() < first);
        let hi = if first == last {
            // One chunk (nearly every call): no second search.
            lo + self.chunks.get(lo).is_some_and(|s| s.num() == first) as usize
        } else {
            self.chunks.partition_point(|s| s.num() <= last)
        };
        let mut keep = lo;
        for i in lo..hi {
            let c = self.chunks[i].num();
            let base = base_of(c);
            let a = if c == first { offset_of(r.start) } else { 0 };
            let b = if c == last {
                offset_of(r.end - 1) + 1
            } else {
                CHUNK_PAGES
            };
            let empty = self.chunks[i].update(|chunk| {
                chunk.set(a, b, false, &mut |x, y| {
                    sink.push(base + x as u64, base + y as u64)
                });
                chunk.is_empty()
            });
            if !empty {
                self.chunks.swap(keep, i);
                keep += 1;
            }
        }
        self.chunks.drain(keep..hi);
        if self.chunks.capacity() > 2 * self.chunks.len() + 16 {
            // Hand the directory back after a large re-encryption (kexec, E820 reset).
            self.chunks
                .shrink_to(self.chunks.len() + self.chunks.len() / 2);
        }
    }

    /// Every page back to encrypted (guest reset); `flipped` hears every shared range. Returns
    /// the old contents, so that the caller can free them after releasing its lock: O(1) when
    /// nobody listens, O(ranges) for the reports otherwise.
    pub fn clear(&mut self, flipped: Option<&mut dyn FnMut(PageRange)>) -> PageMap {
        let old = PageMap {
            layout: self.layout.clone(),
            chunks: std::mem::take(&mut self.chunks),
            shared_pages: std::mem::take(&mut self.shared_pages),
        };
        if let Some(f) = flipped {
            for r in old.shared_ranges() {
                f(r);
            }
        }
        old
    }

    /// A copy of the map that shares its chunks copy-on-write: O(chunks) (a reference count
    /// each), however fragmented the chunks are. Later updates of either copy copy only the
    /// chunks they touch.
    pub fn snapshot(&self) -> PageMap {
        self.clone()
    }

    /// Replaces the layout (memory hotplug). Shared pages that are still RAM stay shared; those
    /// that are no longer RAM are forgotten (they are not migrated, so no flip is reported).
    ///
    /// O(chunks) plus, for each chunk that RAM covers only in part, the clearing of its
    /// non-RAM part (bounded by a chunk): chunks wholly inside RAM are kept as they are, chunks
    /// wholly outside are dropped, whatever the number of shared ranges. Returns the chunks
    /// dropped, so that the caller can free them after releasing its lock.
    pub fn set_layout(&mut self, layout: Layout) -> Vec<Chunk> {
        let mut dropped = Vec::new();
        let mut lost = 0u64;
        let mut keep = 0;
        for i in 0..self.chunks.len() {
            let c = self.chunks[i].num();
            let span = PageRange {
                start: base_of(c),
                end: base_of(c + 1),
            };
            let mut pieces = layout.clip(span).peekable();
            let mut chunk = self.chunks[i].take();
            match pieces.peek() {
                None => lost += chunk.view().pages() as u64,
                Some(p) if *p == span => {}
                Some(_) => {
                    // Clear the gaps between the RAM pieces of the chunk.
                    let mut pos = span.start;
                    let mut clear = |from: u64, to: u64| {
                        let (a, b) = ((from - span.start) as u32, (to - span.start) as u32);
                        chunk.set(a, b, false, &mut |x, y| lost += (y - x) as u64);
                    };
                    for p in pieces {
                        if p.start > pos {
                            clear(pos, p.start);
                        }
                        pos = p.end;
                    }
                    if pos < span.end {
                        clear(pos, span.end);
                    }
                }
            }
            let keep_it = layout.clip(span).next().is_some() && !chunk.is_empty();
            self.chunks[i].put(chunk);
            if keep_it {
                self.chunks.swap(keep, i);
                keep += 1;
            }
        }
        dropped.extend(self.chunks.drain(keep..).map(Slot::into_chunk));
        if self.chunks.capacity() > 2 * self.chunks.len() + 16 {
            self.chunks
                .shrink_to(self.chunks.len() + self.chunks.len() / 2);
        }
        self.shared_pages -= lost;
        self.layout = layout;
        dropped
    }

    /// The state of `gfn` and the extent of that state from `gfn` on: the returned run starts
    /// at `gfn` and ends where the state changes (or at the 52-bit limit).
    pub fn run_at(&self, gfn: u64) -> Run {
        let gfn = gfn.min(MAX_GFN - 1);
        let i = self.chunks.partition_point(|s| s.num() < chunk_of(gfn));
        let shared = match self.chunks.get(i) {
            Some(s) if s.num() == chunk_of(gfn) => s.view().get(offset_of(gfn)),
            _ => false,
        };
        let end = if shared {
            self.end_of_shared(i, gfn)
        } else {
            self.next_shared(i, gfn)
        };
        Run {
            range: PageRange { start: gfn, end },
            state: if shared {
                PageState::Shared
            } else {
                PageState::Encrypted
            },
        }
    }

    /// The state of `gfn` and the ends of the maximal runs from `gfn` on: `ends[0]` is where the
    /// run containing `gfn` ends, `ends[1]` where the next one (of the other state) ends, and so
    /// on, for up to `ends.len()` runs or until the 52-bit limit. Returns the state at `gfn` and
    /// how many ends were written. One directory search for the whole batch, then a linear walk,
    /// so a cursor can cache several runs per lock for about the price of one.
    pub fn runs_from(&self, gfn: u64, ends: &mut [u64]) -> (PageState, usize) {
        let gfn = gfn.min(MAX_GFN - 1);
        if ends.is_empty() {
            return (self.state(gfn), 0);
        }
        let i = self.chunks.partition_point(|s| s.num() < chunk_of(gfn));
        let inner = self.chunks.get(i).map(|s| {
            let off = if s.num() == chunk_of(gfn) {
                offset_of(gfn)
            } else {
                0
            };
            (base_of(s.num()), s.view().runs_after(off))
        });
        // Shared ranges from here on that end after gfn; the first may hold gfn.
        let mut shared = SharedRanges {
            chunks: &self.chunks,
            idx: i + 1,
            inner,
            pending: None,
        };
        fn push(ends: &mut [u64], n: &mut usize, v: u64) {
            if *n < ends.len() {
                ends[*n] = v;
                *n += 1;
            }
        }
        let mut n = 0;
        let state = match shared.next() {
            Some(r) if r.start <= gfn => {
                push(ends, &mut n, r.end);
                PageState::Shared
            }
            Some(r) => {
                push(ends, &mut n, r.start);
                push(ends, &mut n, r.end);
                PageState::Encrypted
            }
            None => {
                push(ends, &mut n, MAX_GFN);
                return (PageState::Encrypted, n);
            }
        };
        while n < ends.len() {
            match shared.next() {
                Some(r) => {
                    push(ends, &mut n, r.start);
                    push(ends, &mut n, r.end);
                }
                None => {
                    if ends[n - 1] < MAX_GFN {
                        push(ends, &mut n, MAX_GFN);
                    }
                    break;
                }
            }
        }
        (state, n)
    }

    /// If the chunk holding `gfn` is stored as a bitmap: its first gfn and its words (bit `i`
    /// of word `w` is page `first + 64 w + i`, 1 = shared). The cursor copies it to answer
    /// queries over a fragmented chunk with bit tests instead of walking runs of one page.
    pub fn bitmap_words(&self, gfn: u64) -> Option<(u64, &[u64; BITMAP_WORDS])> {
        let i = self.chunks.partition_point(|s| s.num() < chunk_of(gfn));
        match self.chunks.get(i) {
            Some(s) if s.num() == chunk_of(gfn) => {
                s.view().bitmap_words().map(|w| (base_of(s.num()), w))
            }
            _ => None,
        }
    }

    /// Is `gfn` encrypted? (Pages outside RAM are.)
    pub fn state(&self, gfn: u64) -> PageState {
        let i = self.chunks.partition_point(|s| s.num() < chunk_of(gfn));
        match self.chunks.get(i) {
            Some(s) if s.num() == chunk_of(gfn) && s.view().get(offset_of(gfn)) => {
                PageState::Shared
            }
            _ => PageState::Encrypted,
        }
    }

    /// `gfn` is shared and lies in chunk entry `i`: where does its shared run end?
    fn end_of_shared(&self, mut i: usize, gfn: u64) -> u64 {
        let mut off = offset_of(gfn);
        loop {
            let c = self.chunks[i].num();
            let end = self.chunks[i].view().find(off, false);
            if end < CHUNK_PAGES {
                return base_of(c) + end as u64;
            }
            // Shared up to the chunk's end: the run goes on if the next chunk is adjacent and
            // starts shared.
            match self.chunks.get(i + 1) {
                Some(next) if next.num() == c + 1 && next.view().get(0) => {
                    i += 1;
                    off = 0;
                }
                _ => return base_of(c + 1),
            }
        }
    }

    /// `gfn` is encrypted and chunk entry `i` is the first at or after its chunk: where is the
    /// next shared page?
    fn next_shared(&self, i: usize, gfn: u64) -> u64 {
        for slot in &self.chunks[i..] {
            let c = slot.num();
            let from = if c == chunk_of(gfn) {
                offset_of(gfn)
            } else {
                0
            };
            let s = slot.view().find(from, true);
            if s < CHUNK_PAGES {
                return base_of(c) + s as u64;
            }
        }
        MAX_GFN
    }

    /// The maximal shared ranges, ascending.
    pub fn shared_ranges(&self) -> SharedRanges<'_> {
        SharedRanges {
            chunks: &self.chunks,
            idx: 0,
            inner: None,
            pending: None,
        }
    }

    /// Shared pages of RAM.
    pub fn shared_pages(&self) -> u64 {
        self.shared_pages
    }

    /// Number of maximal shared ranges, for statistics: the chunks' run counts less the runs
    /// that continue across a chunk border. O(chunks + bitmap words), not O(ranges), so that a
    /// statistics query on a fragmented map does not hold the lock for long.
    pub fn range_count(&self) -> u64 {
        let runs: u64 = self
            .chunks
            .iter()
            .map(|s| s.view().run_count() as u64)
            .sum();
        let joins = self
            .chunks
            .windows(2)
            .filter(|w| {
                w[1].num() == w[0].num() + 1
                    && w[0].view().get(CHUNK_PAGES - 1)
                    && w[1].view().get(0)
            })
            .count() as u64;
        runs - joins
    }

    /// Checks the representation invariants (directory sorted, no empty chunk, every chunk in
    /// canonical form, the shared-page count right). For tests and fuzzing; O(size of the map).
    pub fn check_invariants(&self) -> Result<(), String> {
        for w in self.chunks.windows(2) {
            if w[0].num() >= w[1].num() {
                return Err(format!(
                    "chunk directory unsorted at {} / {}",
                    w[0].num(),
                    w[1].num()
                ));
            }
        }
        let mut pages = 0;
        for slot in &self.chunks {
            let (c, chunk) = (slot.num(), slot.view());
            chunk
                .check_invariants()
                .map_err(|e| format!("chunk {c}: {e}"))?;
            for (a, b) in chunk.runs() {
                pages += (b - a) as u64;
                let r = PageRange {
                    start: base_of(c) + a as u64,
                    end: base_of(c) + b as u64,
                };
                if self.layout.clip(r).next() != Some(r) {
                    return Err(format!("shared range {r:?} is not RAM"));
                }
            }
        }
        if pages != self.shared_pages {
            return Err(format!(
                "shared_pages {} but {pages} stored",
                self.shared_pages
            ));
        }
        Ok(())
    }

    /// Heap bytes the map owns (directory, chunks and layout).
    pub fn heap_bytes(&self) -> usize {
        self.chunks.capacity() * size_of::<Slot>()
            + self
                .chunks
                .iter()
                .map(|s| s.view().heap_bytes())
                .sum::<usize>()
            + std::mem::size_of_val(self.layout.ranges())
    }
}

/// Iterator over a map's maximal shared ranges (merged across chunk borders).
#[derive(Debug)]
pub struct SharedRanges<'a> {
    chunks: &'a [Slot],
    idx: usize,
    inner: Option<(u64, super::chunk::ChunkRuns<'a>)>,
    pending: Option<PageRange>,
}

impl Iterator for SharedRanges<'_> {
    type Item = PageRange;

    fn next(&mut self) -> Option<PageRange> {
        loop {
            let next = loop {
                if let Some((base, runs)) = &mut self.inner {
                    if let Some((a, b)) = runs.next() {
                        break Some(PageRange {
                            start: *base + a as u64,
                            end: *base + b as u64,
                        });
                    }
                }
                match self.chunks.get(self.idx) {
                    Some(s) => {
                        self.idx += 1;
                        self.inner = Some((base_of(s.num()), s.view().runs()));
                    }
                    None => break None,
                }
            };
            match (next, &mut self.pending) {
                (Some(r), Some(p)) if p.end == r.start => p.end = r.end,
                (Some(r), _) => {
                    let out = self.pending.replace(r);
                    if out.is_some() {
                        return out;
                    }
                }
                (None, _) => return self.pending.take(),
            }
        }
    }
}

/// Why [`PageMapBuilder::push`] refused a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildError {
    /// The range starts before the end of the previous one.
    Unsorted {
        /// The refused range.
        range: PageRange,
        /// End of the previous range.
        prev_end: u64,
    },
    /// Some page of the range is not RAM.
    NotRam {
        /// The refused range.
        range: PageRange,
    },
}

/// Builds a map from ascending shared ranges in O(ranges), for the stream loader and layout
/// changes. Adjacent ranges are merged.
#[derive(Debug)]
pub struct PageMapBuilder {
    map: PageMap,
    prev_end: u64,
    /// Runs of the chunk being filled: (chunk number, runs as offsets).
    cur: Option<(u64, Vec<(u32, u32)>)>,
}

impl PageMapBuilder {
    /// A builder for a map over `layout`.
    pub fn new(layout: Layout) -> PageMapBuilder {
        PageMapBuilder {
            map: PageMap::new(layout),
            prev_end: 0,
            cur: None,
        }
    }

    /// The layout being built against.
    pub fn layout(&self) -> &Layout {
        &self.map.layout
    }

    /// Adds a shared range; it must start at or after the end of the previous one and be RAM.
    pub fn push(&mut self, range: PageRange) -> Result<(), BuildError> {
        if range.is_empty() || range.start < self.prev_end {
            return Err(BuildError::Unsorted {
                range,
                prev_end: self.prev_end,
            });
        }
        if self.map.layout.clip(range).next() != Some(range) {
            return Err(BuildError::NotRam { range });
        }
        self.prev_end = range.end;
        self.map.shared_pages += range.len();
        let mut start = range.start;
        while start < range.end {
            let c = chunk_of(start);
            let end = range.end.min(base_of(c + 1));
            let (a, b) = (offset_of(start), offset_of(end - 1) + 1);
            match &mut self.cur {
                Some((cc, runs)) if *cc == c => match runs.last_mut() {
                    Some(last) if last.1 == a => last.1 = b,
                    _ => runs.push((a, b)),
                },
                _ => {
                    self.flush();
                    self.cur = Some((c, vec![(a, b)]));
                }
            }
            start = end;
        }
        Ok(())
    }

    fn flush(&mut self) {
        if let Some((c, runs)) = self.cur.take() {
            self.map.chunks.push(Slot::new(c, Chunk::from_runs(&runs)));
        }
    }

    /// The finished map.
    pub fn finish(mut self) -> PageMap {
        self.flush();
        self.map.chunks.shrink_to_fit();
        self.map
    }
}
