//! One chunk of the map: the shared pages among 2^15 consecutive gfns (128 MiB of guest
//! address space), in whichever of three forms is smallest.
//!
//! - `Full`: every page shared (a swiotlb pool or a guest that shares everything): no heap.
//! - `One`: a single run, kept inline in the map's directory slot: no heap. Boot lists are
//!   mostly isolated ranges (per-CPU pages, GHCBs, coherent buffers), one per 128 MiB chunk on
//!   small guests; as a `Runs` each would cost an allocation (and once cost two, ~80 bytes as
//!   malloc spends them).
//! - `Runs`: sorted, disjoint, non-adjacent inclusive runs of 16-bit offsets, 4 bytes a run;
//!   up to three in place in the `Arc` (a [`RunList`]), so a chunk of two or three runs, common
//!   on boot lists, is one allocation rather than two.
//! - `Bitmap`: one bit per page, 4 KiB, when runs would take more than that (more than
//!   [`RUNS_MAX`] runs; a guest that fragments memory on purpose).
//!
//! So a chunk never needs more than 4 KiB (plus the transient growth of one insertion), which is
//! what bounds the whole map by a bitmap of guest RAM whatever the guest does.
//!
//! The heap forms are shared copy-on-write (`Arc`): cloning a chunk costs a reference count, so
//! a snapshot of the whole map (for the stream encoder) is O(chunks) whatever the guest did,
//! and the first update of a shared chunk after a snapshot copies that chunk alone (at most
//! 4 KiB). Without a snapshot the `Arc` is unique and updated in place.

use std::mem::size_of;
use std::sync::Arc;

/// log2 of the pages per chunk.
pub const CHUNK_SHIFT: u32 = 15;
/// Pages per chunk.
pub const CHUNK_PAGES: u32 = 1 << CHUNK_SHIFT;
const WORDS: usize = (CHUNK_PAGES / 64) as usize;
/// Words in a bitmap chunk (see [`Chunk::bitmap_words`]).
pub const BITMAP_WORDS: usize = WORDS;
/// The most runs a `Runs` chunk holds: 4 bytes each, so at most the size of a bitmap.
pub const RUNS_MAX: usize = WORDS * 8 / size_of::<Span>();
/// A bitmap chunk goes back to runs below this many runs (hysteresis, so that a guest toggling
/// one page at the threshold does not convert the chunk back and forth).
const RUNS_MIN: usize = RUNS_MAX / 2;

/// An inclusive run of page offsets within a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    first: u16,
    last: u16,
}

impl Span {
    fn new(start: u32, end: u32) -> Span {
        debug_assert!(start < end && end <= CHUNK_PAGES);
        Span {
            first: start as u16,
            last: (end - 1) as u16,
        }
    }
    /// A span no run has (first > last), which the directory slot uses to mark the forms
    /// that have no span of their own.
    pub(super) const fn marker(k: u16) -> Span {
        Span { first: k, last: 0 }
    }
    fn start(self) -> u32 {
        self.first as u32
    }
    fn end(self) -> u32 {
        self.last as u32 + 1
    }
}

/// A 4 KiB bitmap with its population and run counts kept up to date.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    words: [u64; WORDS],
    pages: u32,
    /// Shared runs (0 -> 1 transitions). Kept up to date by `set` from the words it touches,
    /// so that deciding whether to go back to runs does not scan the whole 4 KiB on every
    /// update (that scan made every call on a fragmented chunk cost ~400 ns).
    runs: u32,
}

/// Runs kept in place by a [`RunList`]: a boot list's chunks mostly hold two or three runs
/// (per-CPU pages, GHCBs, coherent buffers), and three fit beside the vector's niche, so the
/// list costs no more than a `Vec` header.
const INLINE: usize = 3;

/// The runs of a `Runs` chunk: up to [`INLINE`] in place (then the chunk is one allocation,
/// the `Arc`'s, instead of two: the vector's buffer cost as much again in malloc's real
/// footprint), more in a vector. A list that spilled stays a vector, so that a chunk going
/// back and forth across the limit does not allocate and free on every update.
#[derive(Debug, Clone)]
pub enum RunList {
    /// `spans[..len]` are the runs.
    Inline {
        /// How many of `spans` are runs.
        len: u8,
        /// The runs, then unused entries.
        spans: [Span; INLINE],
    },
    /// More runs than fit in place (or once did).
    Heap(Vec<Span>),
}

const _: () = assert!(size_of::<RunList>() == size_of::<Vec<Span>>());

impl RunList {
    fn new() -> RunList {
        RunList::Inline {
            len: 0,
            spans: [Span { first: 0, last: 0 }; INLINE],
        }
    }

    fn push(&mut self, s: Span) {
        let len = self.len();
        self.insert(len, s);
    }

    fn insert(&mut self, i: usize, s: Span) {
        match self {
            RunList::Inline { len, spans } if (*len as usize) < INLINE => {
                let n = *len as usize;
                spans.copy_within(i..n, i + 1);
                spans[i] = s;
                *len += 1;
            }
            RunList::Inline { spans, .. } => {
                // A power of two, so that the vector then grows as a plain one would (4, 8,
                // ..., 512): 6, 12, ... would end at 768 for a chunk of 481 per-CPU runs.
                let mut v = Vec::with_capacity((INLINE + 1).next_power_of_two());
                v.extend_from_slice(spans);
                v.insert(i, s);
                *self = RunList::Heap(v);
            }
            RunList::Heap(v) => v.insert(i, s),
        }
    }

    /// Removes the runs `range` (what `Vec::drain` does, its result dropped).
    fn drain(&mut self, range: std::ops::Range<usize>) {
        match self {
            RunList::Inline { len, spans } => {
                let n = *len as usize;
                spans.copy_within(range.end..n, range.start);
                *len -= range.len() as u8;
            }
            RunList::Heap(v) => {
                v.drain(range);
            }
        }
    }

    /// Runs it holds without growing.
    pub(super) fn capacity(&self) -> usize {
        match self {
            RunList::Inline { .. } => INLINE,
            RunList::Heap(v) => v.capacity(),
        }
    }

    fn shrink_to(&mut self, n: usize) {
        if let RunList::Heap(v) = self {
            v.shrink_to(n);
        }
    }

    /// Bytes outside the list itself.
    fn heap_bytes(&self) -> usize {
        match self {
            RunList::Inline { .. } => 0,
            RunList::Heap(v) => v.capacity() * size_of::<Span>(),
        }
    }
}

impl std::ops::Deref for RunList {
    type Target = [Span];
    fn deref(&self) -> &[Span] {
        match self {
            RunList::Inline { len, spans } => &spans[..*len as usize],
            RunList::Heap(v) => v,
        }
    }
}

impl std::ops::DerefMut for RunList {
    fn deref_mut(&mut self) -> &mut [Span] {
        match self {
            RunList::Inline { len, spans } => &mut spans[..*len as usize],
            RunList::Heap(v) => v,
        }
    }
}

impl FromIterator<Span> for RunList {
    fn from_iter<I: IntoIterator<Item = Span>>(iter: I) -> RunList {
        let mut r = RunList::new();
        for s in iter {
            r.push(s);
        }
        r
    }
}

/// Equal runs, whichever way they are kept.
impl PartialEq for RunList {
    fn eq(&self, other: &RunList) -> bool {
        **self == **other
    }
}

impl Eq for RunList {}

/// The shared pages of one chunk. An empty chunk is never stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    /// Every page shared.
    Full,
    /// Exactly one run, not the whole chunk.
    One(Span),
    /// No page shared: only transiently, after an update (the map drops empty chunks).
    Empty,
    /// Shared runs, sorted, disjoint and never adjacent (a chunk that had two keeps its vector
    /// when down to one).
    Runs(Arc<RunList>),
    /// One bit per page, 1 = shared.
    Bitmap(Arc<Bitmap>),
}

/// A mask of bits `[lo, hi)` within one word (`0 <= lo < hi <= 64`).
fn mask(lo: u32, hi: u32) -> u64 {
    let upper = if hi == 64 { !0 } else { (1u64 << hi) - 1 };
    upper & !((1u64 << lo) - 1)
}

impl Bitmap {
    fn empty() -> Bitmap {
        Bitmap {
            words: [0; WORDS],
            pages: 0,
            runs: 0,
        }
    }

    #[inline]
    fn get(&self, off: u32) -> bool {
        self.words[(off / 64) as usize] >> (off % 64) & 1 != 0
    }

    /// Sets `[start, end)` to `shared`, calling `flip` for each maximal run of bits that changed.
    fn set(&mut self, start: u32, end: u32, shared: bool, flip: &mut dyn FnMut(u32, u32)) {
        // Only run starts in the touched words, and at bit 0 of the word after them, can change.
        let (wa, wb) = (
            (start / 64) as usize,
            (((end - 1) / 64 + 1) as usize).min(WORDS - 1),
        );
        let before = self.runs_in(wa, wb);
        self.set_words(start, end, shared, flip);
        let after = self.runs_in(wa, wb);
        self.runs = self.runs + after - before;
    }

    /// Run starts in words `wa..=wb` (a run starting at bit 0 of `wa` counts if bit 63 of the
    /// word before it is clear).
    fn runs_in(&self, wa: usize, wb: usize) -> u32 {
        let mut carry = if wa == 0 { 0 } else { self.words[wa - 1] >> 63 };
        let mut n = 0;
        for &w in &self.words[wa..=wb] {
            n += (w & !((w << 1) | carry)).count_ones();
            carry = w >> 63;
        }
        n
    }

    fn set_words(&mut self, start: u32, end: u32, shared: bool, flip: &mut dyn FnMut(u32, u32)) {
        let mut pending: Option<(u32, u32)> = None;
        let mut pos = start;
        while pos < end {
            let w = (pos / 64) as usize;
            let lo = pos % 64;
            let hi = (end - (w as u32) * 64).min(64);
            let m = mask(lo, hi);
            let old = self.words[w];
            let mut changed = if shared { !old & m } else { old & m };
            self.words[w] = if shared { old | m } else { old & !m };
            let n = changed.count_ones();
            if shared {
                self.pages += n;
            } else {
                self.pages -= n;
            }
            while changed != 0 {
                let s = changed.trailing_zeros();
                let len = (!(changed >> s)).trailing_zeros().min(64 - s);
                let (a, b) = (w as u32 * 64 + s, w as u32 * 64 + s + len);
                pending = match pending {
                    Some((pa, pb)) if pb == a => Some((pa, b)),
                    Some((pa, pb)) => {
                        flip(pa, pb);
                        Some((a, b))
                    }
                    None => Some((a, b)),
                };
                changed = if s + len >= 64 {
                    0
                } else {
                    changed & !mask(s, s + len)
                };
            }
            pos = (w as u32 + 1) * 64;
        }
        if let Some((a, b)) = pending {
            flip(a, b);
        }
    }

    /// The first offset at or after `from` whose bit equals `shared`, or `CHUNK_PAGES`.
    fn find(&self, from: u32, shared: bool) -> u32 {
        let mut w = (from / 64) as usize;
        if w >= WORDS {
            return CHUNK_PAGES;
        }
        let flip = if shared { 0 } else { !0 };
        let mut bits = (self.words[w] ^ flip) & !((1u64 << (from % 64)) - 1);
        loop {
            if bits != 0 {
                return w as u32 * 64 + bits.trailing_zeros();
            }
            w += 1;
            if w == WORDS {
                return CHUNK_PAGES;
            }
            bits = self.words[w] ^ flip;
        }
    }

    /// Number of runs (0 -> 1 transitions), O(1).
    fn run_count(&self) -> usize {
        self.runs as usize
    }

    /// Number of runs counted over the whole bitmap (to check `runs`).
    fn count_runs(&self) -> usize {
        let mut carry = 0u64;
        let mut n = 0;
        for &w in &self.words {
            n += (w & !((w << 1) | carry)).count_ones() as usize;
            carry = w >> 63;
        }
        n
    }

    fn spans(&self) -> RunList {
        let mut out = RunList::new();
        let mut pos = self.find(0, true);
        while pos < CHUNK_PAGES {
            let end = self.find(pos, false);
            out.push(Span::new(pos, end));
            pos = self.find(end, true);
        }
        out
    }
}

impl Chunk {
    /// A chunk with `[start, end)` shared.
    pub fn with_range(start: u32, end: u32) -> Chunk {
        if start == 0 && end == CHUNK_PAGES {
            Chunk::Full
        } else {
            Chunk::One(Span::new(start, end))
        }
    }

    /// The chunk as a borrowed view, which every query goes through.
    pub fn view(&self) -> ChunkRef<'_> {
        match self {
            Chunk::Full => ChunkRef::Full,
            Chunk::One(s) => ChunkRef::One(s),
            Chunk::Empty => ChunkRef::Empty,
            Chunk::Runs(r) => ChunkRef::Runs(r),
            Chunk::Bitmap(b) => ChunkRef::Bitmap(b),
        }
    }

    /// True if no page is shared (the map then drops the chunk).
    pub fn is_empty(&self) -> bool {
        self.view().is_empty()
    }

    /// Sets `[start, end)` (offsets, `start < end <= CHUNK_PAGES`) to shared or encrypted and
    /// calls `flip` for every maximal run of pages whose state changed, ascending. Afterwards the
    /// chunk is in its smallest form (it may be empty).
    pub fn set(&mut self, start: u32, end: u32, shared: bool, flip: &mut dyn FnMut(u32, u32)) {
        debug_assert!(start < end && end <= CHUNK_PAGES);
        match self {
            Chunk::Full => {
                if !shared {
                    flip(start, end);
                    let mut spans = RunList::new();
                    if start > 0 {
                        spans.push(Span::new(0, start));
                    }
                    if end < CHUNK_PAGES {
                        spans.push(Span::new(end, CHUNK_PAGES));
                    }
                    *self = match *spans {
                        [] => Chunk::Empty,
                        [one] => Chunk::One(one),
                        _ => Chunk::Runs(Arc::new(spans)),
                    };
                }
                return;
            }
            Chunk::One(s) => {
                if let Some(one) = set_one(*s, start, end, shared, flip) {
                    *self = one;
                    return;
                }
                // Two runs or more now: the general form.
                let mut r = RunList::new();
                r.push(*s);
                if shared {
                    set_runs_shared(&mut r, start, end, flip)
                } else {
                    set_runs_encrypted(&mut r, start, end, flip)
                }
                *self = Chunk::Runs(Arc::new(r));
            }
            Chunk::Empty => {
                if shared {
                    flip(start, end);
                    *self = Chunk::with_range(start, end);
                }
                return;
            }
            Chunk::Runs(r) => {
                // Copies the runs only if a snapshot still holds them.
                let r = Arc::make_mut(r);
                if shared {
                    set_runs_shared(r, start, end, flip)
                } else {
                    set_runs_encrypted(r, start, end, flip)
                }
            }
            Chunk::Bitmap(b) => Arc::make_mut(b).set(start, end, shared, flip),
        }
        self.normalize();
    }

    /// Moves the chunk to its smallest form after a change.
    fn normalize(&mut self) {
        match self {
            Chunk::Full | Chunk::One(_) | Chunk::Empty => {}
            Chunk::Runs(r) => {
                // A run vector down to one run stays one (unless full): going back to `One`
                // would free it and a coherent buffer coming back would allocate it again,
                // allocator traffic on every alloc/free pair (W2). Only new chunks are `One`.
                if r.len() == 1 && r[0].start() == 0 && r[0].end() == CHUNK_PAGES {
                    *self = Chunk::Full;
                } else if r.is_empty() {
                    *self = Chunk::Empty;
                } else if r.len() > RUNS_MAX {
                    let mut b = Bitmap::empty();
                    for s in r.iter() {
                        b.set(s.start(), s.end(), true, &mut |_, _| {});
                    }
                    *self = Chunk::Bitmap(Arc::new(b));
                } else if r.capacity() > 2 * r.len() + 8 {
                    // Give memory back after a large removal, but not after every one.
                    let r = Arc::make_mut(r);
                    r.shrink_to(r.len() + r.len() / 2);
                }
            }
            Chunk::Bitmap(b) => {
                if b.pages == CHUNK_PAGES {
                    *self = Chunk::Full;
                } else if b.run_count() < RUNS_MIN {
                    *self = Chunk::Runs(Arc::new(b.spans()));
                    self.normalize();
                }
            }
        }
    }

    /// Builds a chunk from ascending, disjoint, non-adjacent runs (the map's bulk loader); a
    /// single run is stored inline.
    pub fn from_runs(runs: &[(u32, u32)]) -> Chunk {
        if let [(a, b)] = runs {
            return Chunk::with_range(*a, *b);
        }
        let mut chunk = Chunk::Runs(Arc::new(
            runs.iter().map(|&(a, b)| Span::new(a, b)).collect(),
        ));
        chunk.normalize();
        chunk
    }
}

/// A borrowed view of a chunk: what queries read. The map's directory slot
/// ([`super::slot::Slot`]) hands one out without moving the chunk out of its packed form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkRef<'a> {
    /// See [`Chunk::Full`].
    Full,
    /// See [`Chunk::One`].
    One(&'a Span),
    /// See [`Chunk::Empty`].
    Empty,
    /// See [`Chunk::Runs`].
    Runs(&'a RunList),
    /// See [`Chunk::Bitmap`].
    Bitmap(&'a Bitmap),
}

impl<'a> ChunkRef<'a> {
    /// The runs of the run forms as one slice (`One` as a slice of one, `Empty` as none);
    /// `None` for `Full` and `Bitmap`.
    fn span_slice(self) -> Option<&'a [Span]> {
        match self {
            ChunkRef::One(s) => Some(std::slice::from_ref(s)),
            ChunkRef::Empty => Some(&[]),
            ChunkRef::Runs(r) => Some(&r[..]),
            ChunkRef::Full | ChunkRef::Bitmap(_) => None,
        }
    }

    /// True if no page is shared (the chunk is then dropped from the map).
    pub fn is_empty(self) -> bool {
        match self {
            ChunkRef::Full | ChunkRef::One(_) => false,
            ChunkRef::Empty => true,
            ChunkRef::Runs(r) => r.is_empty(),
            ChunkRef::Bitmap(b) => b.pages == 0,
        }
    }

    /// Number of shared pages: O(1), except O(runs) (at most [`RUNS_MAX`]) for the runs form.
    pub fn pages(self) -> u32 {
        match self {
            ChunkRef::Full => CHUNK_PAGES,
            ChunkRef::Bitmap(b) => b.pages,
            c => c
                .span_slice()
                .unwrap_or_default()
                .iter()
                .map(|s| s.end() - s.start())
                .sum(),
        }
    }

    /// Heap bytes the chunk owns (not counting its slot in the map's directory), with the
    /// `Arc`'s two counters. A chunk shared with a snapshot is counted in full by each.
    pub fn heap_bytes(self) -> usize {
        const ARC: usize = 2 * size_of::<usize>();
        match self {
            ChunkRef::Full | ChunkRef::One(_) | ChunkRef::Empty => 0,
            ChunkRef::Runs(r) => ARC + size_of::<RunList>() + r.heap_bytes(),
            ChunkRef::Bitmap(_) => ARC + size_of::<Bitmap>(),
        }
    }

    /// The words of a bitmap chunk (bit `i` of word `w` is offset `64 w + i`, 1 = shared);
    /// `None` for the other forms. Lets a reader copy a fragmented chunk once and answer from
    /// the copy with bit tests.
    #[inline]
    pub fn bitmap_words(self) -> Option<&'a [u64; WORDS]> {
        match self {
            ChunkRef::Bitmap(b) => Some(&b.words),
            _ => None,
        }
    }

    /// Is the page at `off` shared?
    #[inline]
    pub fn get(self, off: u32) -> bool {
        match self {
            ChunkRef::Full => true,
            ChunkRef::One(s) => s.start() <= off && off < s.end(),
            ChunkRef::Bitmap(b) => b.get(off),
            c => {
                let r = c.span_slice().unwrap_or_default();
                let i = r.partition_point(|s| s.end() <= off);
                r.get(i).is_some_and(|s| s.start() <= off)
            }
        }
    }

    /// The first offset at or after `from` whose state is `shared`, or `CHUNK_PAGES`.
    pub fn find(self, from: u32, shared: bool) -> u32 {
        if from >= CHUNK_PAGES {
            return CHUNK_PAGES;
        }
        match self {
            ChunkRef::Full => {
                if shared {
                    from
                } else {
                    CHUNK_PAGES
                }
            }
            ChunkRef::Bitmap(b) => b.find(from, shared),
            c => {
                let r = c.span_slice().unwrap_or_default();
                let i = r.partition_point(|s| s.end() <= from);
                match (r.get(i), shared) {
                    (Some(s), true) => s.start().max(from),
                    (None, true) => CHUNK_PAGES,
                    (Some(s), false) if s.start() <= from => s.end(),
                    (_, false) => from,
                }
            }
        }
    }

    /// The shared runs as half-open offset pairs, ascending.
    pub fn runs(self) -> ChunkRuns<'a> {
        ChunkRuns {
            chunk: self,
            pos: 0,
            idx: 0,
        }
    }

    /// The shared runs that end after `off`, ascending (the first may start before `off`, or,
    /// in a bitmap, be cut to start at it). O(log runs) to start.
    pub fn runs_after(self, off: u32) -> ChunkRuns<'a> {
        match self {
            ChunkRef::Full => self.runs(),
            ChunkRef::Bitmap(_) => ChunkRuns {
                chunk: self,
                pos: off,
                idx: 0,
            },
            c => ChunkRuns {
                chunk: self,
                pos: 0,
                idx: c
                    .span_slice()
                    .unwrap_or_default()
                    .partition_point(|s| s.end() <= off),
            },
        }
    }

    /// Number of shared runs inside the chunk (word-parallel for a bitmap).
    pub fn run_count(self) -> usize {
        match self {
            ChunkRef::Full | ChunkRef::One(_) => 1,
            ChunkRef::Empty => 0,
            ChunkRef::Runs(r) => r.len(),
            ChunkRef::Bitmap(b) => b.run_count(),
        }
    }

    /// Checks the representation invariants: runs sorted, disjoint, non-adjacent and below
    /// [`RUNS_MAX`]; a bitmap's count right; no empty chunk; `Full` used for a full chunk.
    pub fn check_invariants(self) -> Result<(), String> {
        match self {
            ChunkRef::Full => Ok(()),
            ChunkRef::Empty => Err("empty chunk stored".into()),
            ChunkRef::One(s) => {
                if s.start() == 0 && s.end() == CHUNK_PAGES {
                    return Err("full chunk stored as one run".into());
                }
                Ok(())
            }
            ChunkRef::Runs(r) => {
                if r.is_empty() || r.len() > RUNS_MAX {
                    return Err(format!("runs chunk with {} runs", r.len()));
                }
                if r.len() == 1 && r[0].start() == 0 && r[0].end() == CHUNK_PAGES {
                    return Err("full chunk stored as runs".into());
                }
                for w in r.windows(2) {
                    if w[0].end() >= w[1].start() {
                        return Err(format!("runs {:?} and {:?} overlap or touch", w[0], w[1]));
                    }
                }
                Ok(())
            }
            ChunkRef::Bitmap(b) => {
                let pages: u32 = b.words.iter().map(|w| w.count_ones()).sum();
                if pages != b.pages || pages == 0 || pages == CHUNK_PAGES {
                    return Err(format!(
                        "bitmap chunk counts {} pages, has {pages}",
                        b.pages
                    ));
                }
                if b.count_runs() != b.runs as usize {
                    return Err(format!(
                        "bitmap chunk counts {} runs, has {}",
                        b.runs,
                        b.count_runs()
                    ));
                }
                Ok(())
            }
        }
    }
}

/// An update of a `One` chunk that leaves at most one run (nearly all of them: a range grows,
/// shrinks, or is re-encrypted whole), done inline; `None` when two runs would remain.
fn set_one(
    s: Span,
    start: u32,
    end: u32,
    shared: bool,
    flip: &mut dyn FnMut(u32, u32),
) -> Option<Chunk> {
    let (a, b) = (s.start(), s.end());
    if shared {
        if end < a || start > b {
            return None; // apart from the run, not touching it
        }
        if start < a {
            flip(start, a);
        }
        if end > b {
            flip(b, end);
        }
        return Some(Chunk::with_range(start.min(a), end.max(b)));
    }
    if end <= a || start >= b {
        return Some(Chunk::One(s)); // nothing shared in [start, end)
    }
    if start > a && end < b {
        return None; // splits the run
    }
    flip(start.max(a), end.min(b));
    Some(if start > a {
        Chunk::One(Span::new(a, start))
    } else if end < b {
        Chunk::One(Span::new(end, b))
    } else {
        Chunk::Empty
    })
}

fn set_runs_shared(r: &mut RunList, start: u32, end: u32, flip: &mut dyn FnMut(u32, u32)) {
    // Runs that overlap or touch [start, end) merge with it.
    let i = r.partition_point(|s| s.end() < start);
    let j = r.partition_point(|s| s.start() <= end);
    let mut pos = start;
    for s in &r[i..j] {
        if s.start() > pos {
            flip(pos, s.start().min(end));
        }
        pos = pos.max(s.end());
    }
    if pos < end {
        flip(pos, end);
    }
    // Replace r[i..j] by one span. Mostly j == i + 1 (a call extending or inside one range,
    // swiotlb's pattern), which is a store: `splice` costs a few ns more even then.
    if i < j {
        r[i] = Span::new(r[i].start().min(start), r[j - 1].end().max(end));
        r.drain(i + 1..j);
    } else {
        r.insert(i, Span::new(start, end));
    }
}

fn set_runs_encrypted(r: &mut RunList, start: u32, end: u32, flip: &mut dyn FnMut(u32, u32)) {
    // Runs that overlap [start, end) lose their overlap; at most two remainders stay.
    let i = r.partition_point(|s| s.end() <= start);
    let j = r.partition_point(|s| s.start() < end);
    if i == j {
        return;
    }
    for s in &r[i..j] {
        flip(s.start().max(start), s.end().min(end));
    }
    let (first, last) = (r[i], r[j - 1]);
    let mut keep = [None, None];
    if first.start() < start {
        keep[0] = Some(Span::new(first.start(), start));
    }
    if last.end() > end {
        keep[1] = Some(Span::new(end, last.end()));
    }
    // Replace r[i..j] by the remainders in place where the count allows (the common cases:
    // a range shrinks or is split); `splice` costs a few ns more even then.
    match keep {
        [Some(a), Some(b)] if j - i >= 2 => {
            r[i] = a;
            r[i + 1] = b;
            r.drain(i + 2..j);
        }
        [Some(a), Some(b)] => {
            r[i] = a;
            r.insert(i + 1, b);
        }
        [Some(a), None] | [None, Some(a)] => {
            r[i] = a;
            r.drain(i + 1..j);
        }
        [None, None] => {
            r.drain(i..j);
        }
    }
}

/// Iterator over a chunk's shared runs as half-open offset pairs.
#[derive(Debug)]
pub struct ChunkRuns<'a> {
    chunk: ChunkRef<'a>,
    pos: u32,
    idx: usize,
}

impl Iterator for ChunkRuns<'_> {
    type Item = (u32, u32);

    fn next(&mut self) -> Option<(u32, u32)> {
        match self.chunk {
            ChunkRef::Full => {
                if self.pos == 0 {
                    self.pos = CHUNK_PAGES;
                    Some((0, CHUNK_PAGES))
                } else {
                    None
                }
            }
            ChunkRef::One(_) | ChunkRef::Empty | ChunkRef::Runs(_) => {
                let s = self.chunk.span_slice().unwrap_or_default().get(self.idx)?;
                self.idx += 1;
                Some((s.start(), s.end()))
            }
            ChunkRef::Bitmap(b) => {
                let start = b.find(self.pos, true);
                if start >= CHUNK_PAGES {
                    self.pos = CHUNK_PAGES;
                    return None;
                }
                let end = b.find(start, false);
                self.pos = end;
                Some((start, end))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(c: &Chunk) -> Vec<bool> {
        (0..CHUNK_PAGES).map(|o| c.view().get(o)).collect()
    }

    #[test]
    fn runs_form_updates_match_a_page_model_for_every_small_range() {
        // Every [start, end) over a few runs with gaps, both states: the pages, the flips and
        // the invariants after the in-place replacement of the runs the range touches.
        // The same over a chunk of one run (the inline `One` form), and over two runs that one
        // update can merge into one.
        let lists: [&[(u32, u32)]; 4] = [
            &[(2, 5), (7, 9), (12, 20), (22, 23), (30, 40), (44, 45)],
            &[(12, 20)],
            &[(0, 9)],
            &[(10, 12), (14, 30)],
        ];
        for (spans, shared) in lists.iter().flat_map(|l| [(*l, true), (*l, false)]) {
            for start in 0..48u32 {
                for end in start + 1..=48 {
                    let mut c = Chunk::from_runs(spans);
                    let mut want: Vec<bool> = (0..48).map(|o| c.view().get(o)).collect();
                    let mut want_flips = vec![];
                    for o in start..end {
                        if want[o as usize] != shared {
                            want[o as usize] = shared;
                            match want_flips.last_mut() {
                                Some((_, e)) if *e == o => *e += 1,
                                _ => want_flips.push((o, o + 1)),
                            }
                        }
                    }
                    let mut flips = vec![];
                    c.set(start, end, shared, &mut |a, b| flips.push((a, b)));
                    let got: Vec<bool> = (0..48).map(|o| c.view().get(o)).collect();
                    let case = format!("[{start}, {end}) shared={shared}");
                    assert_eq!(got, want, "{case}");
                    assert_eq!(flips, want_flips, "{case}");
                    if !c.is_empty() {
                        // (The map drops an empty chunk; the invariants hold for kept ones.)
                        assert_eq!(c.view().check_invariants(), Ok(()), "{case}");
                    }
                }
            }
        }
    }

    #[test]
    fn runs_convert_to_bitmap_and_back() {
        let mut c = Chunk::with_range(0, 1);
        for i in 1..=RUNS_MAX as u32 {
            c.set(2 * i, 2 * i + 1, true, &mut |_, _| {});
        }
        assert!(
            matches!(c, Chunk::Bitmap(_)),
            "{} runs must be a bitmap",
            RUNS_MAX + 1
        );
        assert_eq!(c.view().run_count(), RUNS_MAX + 1);
        // Runs start at 0, 2, 4, ..., 2048: clearing [0, 1100) drops 550 of them.
        c.set(0, 1100, false, &mut |_, _| {});
        assert!(
            matches!(c, Chunk::Runs(_)),
            "475 runs fit in the runs form again"
        );
        assert_eq!(c.view().run_count(), RUNS_MAX + 1 - 550);
    }

    #[test]
    fn bitmap_run_count_follows_every_update() {
        let mut c = Chunk::with_range(0, 1);
        for i in 1..3000u32 {
            c.set(2 * i, 2 * i + 1, true, &mut |_, _| {});
        }
        assert!(matches!(c, Chunk::Bitmap(_)));
        let mut x = 12345u32;
        for _ in 0..5000 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let start = (x >> 8) % CHUNK_PAGES;
            let len = 1 + (x >> 3) % 200;
            let end = (start + len).min(CHUNK_PAGES);
            c.set(start, end, x & 1 == 0, &mut |_, _| {});
            assert_eq!(c.view().check_invariants(), Ok(()));
        }
    }

    #[test]
    fn run_list_matches_a_vec_in_place_and_spilled() {
        // Inserts and removals at every position, across the in-place limit and back: the
        // same runs as a plain vector, equal whichever way they are kept, and a list that
        // spilled stays spilled.
        let mut x = 7u32;
        let mut rnd = |n: usize| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (x >> 8) as usize % n
        };
        for _ in 0..2000 {
            let (mut r, mut v) = (RunList::new(), Vec::new());
            let mut spilled = false;
            for step in 0..12u16 {
                if v.is_empty() || rnd(3) != 0 {
                    let i = rnd(v.len() + 1);
                    let s = Span {
                        first: step,
                        last: step,
                    };
                    r.insert(i, s);
                    v.insert(i, s);
                } else {
                    let a = rnd(v.len());
                    let b = a + rnd(v.len() - a + 1);
                    r.drain(a..b);
                    v.drain(a..b);
                }
                assert_eq!(&r[..], &v[..]);
                spilled |= v.len() > INLINE;
                assert_eq!(matches!(r, RunList::Heap(_)), spilled);
                assert_eq!(r, v.iter().copied().collect::<RunList>());
            }
        }
    }

    #[test]
    fn flips_report_only_changed_pages() {
        let mut c = Chunk::with_range(10, 20);
        let mut flips = vec![];
        c.set(5, 25, true, &mut |a, b| flips.push((a, b)));
        assert_eq!(flips, vec![(5, 10), (20, 25)]);
        flips.clear();
        c.set(0, 3, false, &mut |a, b| flips.push((a, b)));
        assert!(flips.is_empty());
        c.set(12, 14, false, &mut |a, b| flips.push((a, b)));
        assert_eq!(flips, vec![(12, 14)]);
        let m = model(&c);
        assert!(m[5] && m[11] && !m[12] && !m[13] && m[14] && m[24] && !m[25]);
    }
}
