//! The handle a VMM holds: the page map behind a lock, the migration-control MSR, the change and
//! readiness callbacks, statistics, and the two read paths for the RAM migration loop (the
//! cursor and the run iterator).
//!
//! # Concurrency
//! Every method takes `&self`; a `Tracker` is `Send + Sync` and meant to be shared by all vCPU
//! threads (which handle hypercall exits without QEMU's big lock) and the migration thread.
//! Updates serialize on one mutex; the callbacks run on the updating thread with that mutex held,
//! so the VMM hears changes in the order they happened. A callback must not call back into the
//! same tracker: such a call fails with [`TrackerError::Reentrant`] instead of deadlocking.
//!
//! Readers do not block writers for long: the cursor answers from cached runs without locking
//! as long as the map's generation number has not moved, and the iterator reads through a
//! cursor, so it takes the lock once per refill (up to 64 runs), not per run. Each answer is
//! exact at some instant during the call; a change made after that instant is followed by a
//! change callback, which is what lets the VMM re-send the pages.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::core::{
    Layout, PageMap, PageRange, PageState, Run, UpdateSummary, BITMAP_WORDS, MAX_GFN, PAGE_SHIFT,
};
use crate::hypercall::{self, HypercallError, MapRequest, RejectReason};
use crate::kvm::consts::{KVM_MIGRATION_READY, MSR_KVM_MIGRATION_CONTROL};

/// Called after every effective change with the pages that flipped and their new state.
pub type ChangeCallback = Box<dyn FnMut(PageRange, PageState) + Send>;
/// Called after every change of the migration-control MSR: (ready, new MSR value).
pub type ReadinessCallback = Box<dyn FnMut(bool, u64) + Send>;

/// Why a tracker call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrackerError {
    /// The guest's input was refused; the guest gets [`HypercallError::kvm_ret`] in RAX (for a
    /// hypercall) or #GP (for an MSR write). Nothing changed.
    Guest(HypercallError),
    /// The MSR is not MSR_KVM_MIGRATION_CONTROL: not pagenc's to handle.
    NotOurMsr {
        /// The MSR index.
        index: u32,
    },
    /// Called from inside one of this tracker's own callbacks.
    Reentrant,
    /// [`Tracker::replace`] was given a map built for another RAM layout (the layout changed
    /// while an incoming list was being decoded).
    LayoutMismatch,
    /// An earlier call panicked while holding the lock; the map may be inconsistent, so the
    /// tracker refuses to go on.
    Poisoned,
}

impl fmt::Display for TrackerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrackerError::Guest(e) => e.fmt(f),
            TrackerError::NotOurMsr { index } => write!(
                f,
                "MSR {index:#x} is not handled by pagenc; only MSR_KVM_MIGRATION_CONTROL \
                 ({MSR_KVM_MIGRATION_CONTROL:#x}) is"
            ),
            TrackerError::Reentrant => write!(
                f,
                "pagenc was called from inside one of its own callbacks on the same tracker; \
                 callbacks must not call back into the tracker"
            ),
            TrackerError::LayoutMismatch => write!(
                f,
                "the page list was built for another RAM layout than the tracker's (the layout \
                 changed while it was loaded); load it again"
            ),
            TrackerError::Poisoned => write!(
                f,
                "pagenc tracker is unusable: an earlier call failed with an internal error while \
                 updating it"
            ),
        }
    }
}

impl std::error::Error for TrackerError {}

impl From<HypercallError> for TrackerError {
    fn from(e: HypercallError) -> Self {
        TrackerError::Guest(e)
    }
}

/// An accepted MAP_GPA_RANGE call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HypercallOutcome {
    /// The validated request.
    pub request: MapRequest,
    /// What it changed.
    pub summary: UpdateSummary,
}

impl HypercallOutcome {
    /// The value for `kvm_run.hypercall.ret`: success.
    pub const RET: u64 = 0;
}

/// A snapshot of the tracker's statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// MAP_GPA_RANGE (and other) hypercalls handed to the tracker, whatever came of them:
    /// accepted, refused, re-entrant, or failed on a poisoned tracker.
    pub hypercalls: u64,
    /// Rejections by [`RejectReason`] (MSR writes included, under `ReservedMsrBits`).
    pub rejected: [u64; RejectReason::COUNT],
    /// Pages named by accepted calls that lie outside guest RAM (accepted, not stored).
    pub clipped_pages: u64,
    /// Pages whose state really changed.
    pub pages_flipped: u64,
    /// Maximal shared ranges now.
    pub shared_ranges: u64,
    /// Shared pages now.
    pub shared_pages: u64,
    /// Heap bytes the map uses.
    pub heap_bytes: u64,
    /// MSR_KVM_MIGRATION_CONTROL now.
    pub msr_value: u64,
    /// Accepted MSR writes.
    pub msr_writes: u64,
    /// Pages of guest RAM in the layout.
    pub ram_pages: u64,
}

struct Inner {
    map: PageMap,
    on_change: Option<ChangeCallback>,
    on_readiness: Option<ReadinessCallback>,
    accepted: u64,
    clipped_pages: u64,
    pages_flipped: u64,
    msr_writes: u64,
}

/// The page-encryption list of one guest. See the module documentation for concurrency.
pub struct Tracker {
    inner: Mutex<Inner>,
    /// Bumped (under the lock) after every effective change of the map.
    generation: AtomicU64,
    msr: AtomicU64,
    /// Token of the thread running callbacks now, 0 if none.
    callback_thread: AtomicU64,
    /// Rejections are counted without the lock: a guest spamming bad calls must not contend.
    rejected: [AtomicU64; RejectReason::COUNT],
    /// Valid hypercalls that could not take the lock (re-entrant from a callback, or the
    /// tracker poisoned): counted apart so that `Stats::hypercalls` counts every call without
    /// an atomic on the accepted path (accepted calls are counted under the lock).
    unlocked_calls: AtomicU64,
}

impl fmt::Debug for Tracker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracker")
            .field("generation", &self.generation.load(Ordering::Relaxed))
            .field("msr", &self.msr.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// A number that identifies the calling thread while it lives (the address of a thread-local),
/// so that a callback calling back into its tracker is caught instead of deadlocking.
fn thread_token() -> u64 {
    thread_local!(static MARK: u8 = const { 0 });
    MARK.with(|m| m as *const u8 as u64)
}

impl Tracker {
    /// A tracker over `layout`: every page encrypted, migration not ready.
    pub fn new(layout: Layout) -> Tracker {
        Tracker {
            inner: Mutex::new(Inner {
                map: PageMap::new(layout),
                on_change: None,
                on_readiness: None,
                accepted: 0,
                clipped_pages: 0,
                pages_flipped: 0,
                msr_writes: 0,
            }),
            generation: AtomicU64::new(0),
            msr: AtomicU64::new(0),
            callback_thread: AtomicU64::new(0),
            rejected: Default::default(),
            unlocked_calls: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> Result<MutexGuard<'_, Inner>, TrackerError> {
        if self.callback_thread.load(Ordering::Relaxed) == thread_token() {
            return Err(TrackerError::Reentrant);
        }
        self.inner.lock().map_err(|_| TrackerError::Poisoned)
    }

    /// Runs `f` (which calls callbacks) with the re-entrance guard set.
    fn in_callbacks<R>(&self, f: impl FnOnce() -> R) -> R {
        /// Clears the mark also when `f` unwinds (a panic caught at the C boundary), so that
        /// the thread's later calls report the poisoned lock, not re-entrance.
        struct Clear<'a>(&'a AtomicU64);
        impl Drop for Clear<'_> {
            fn drop(&mut self) {
                self.0.store(0, Ordering::Relaxed);
            }
        }
        self.callback_thread
            .store(thread_token(), Ordering::Relaxed);
        let _clear = Clear(&self.callback_thread);
        f()
    }

    /// Installs (or with `None` removes) the change callback.
    pub fn set_change_callback(&self, cb: Option<ChangeCallback>) -> Result<(), TrackerError> {
        self.lock()?.on_change = cb;
        Ok(())
    }

    /// Installs (or with `None` removes) the readiness callback.
    pub fn set_readiness_callback(
        &self,
        cb: Option<ReadinessCallback>,
    ) -> Result<(), TrackerError> {
        self.lock()?.on_readiness = cb;
        Ok(())
    }

    /// Handles a hypercall exit: `KVM_HC_MAP_GPA_RANGE` with `args = [gpa, npages, attrs]`.
    /// On success the guest gets [`HypercallOutcome::RET`]; on `Err(TrackerError::Guest(e))`
    /// it gets `e.kvm_ret()` and nothing changed.
    pub fn handle_hypercall(
        &self,
        nr: u64,
        args: [u64; 3],
    ) -> Result<HypercallOutcome, TrackerError> {
        let request = match hypercall::validate_map_gpa_range(nr, args[0], args[1], args[2]) {
            Ok(r) => r,
            Err(e) => {
                self.rejected[e.reason as usize].fetch_add(1, Ordering::Relaxed);
                return Err(e.into());
            }
        };
        let mut guard = match self.lock() {
            Ok(g) => g,
            Err(e) => {
                self.unlocked_calls.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        let inner = &mut *guard;
        inner.accepted += 1;
        let summary = self.apply(inner, request.range, request.state);
        inner.clipped_pages += summary.clipped;
        Ok(HypercallOutcome { request, summary })
    }

    /// `KVM_HC_MAP_GPA_RANGE` with its three arguments (see [`Tracker::handle_hypercall`]).
    pub fn map_gpa_range(
        &self,
        gpa: u64,
        npages: u64,
        attrs: u64,
    ) -> Result<HypercallOutcome, TrackerError> {
        self.handle_hypercall(
            crate::kvm::consts::KVM_HC_MAP_GPA_RANGE as u64,
            [gpa, npages, attrs],
        )
    }

    /// Sets `range` to `state` under the lock and tells the change callback about every flip.
    ///
    /// The generation is bumped before the first flip is reported: a cursor that checks it
    /// afterwards refills under the lock and so sees the finished update, and a cursor that
    /// answered from its cache before the bump did so before the callback ran, so the VMM's
    /// dirty marking comes after that answer.
    fn apply(&self, inner: &mut Inner, range: PageRange, state: PageState) -> UpdateSummary {
        let Inner { map, on_change, .. } = inner;
        let mut bumped = false;
        let summary = self.in_callbacks(|| {
            map.set(range, state, &mut |r| {
                if !bumped {
                    self.bump_generation();
                    bumped = true;
                }
                if let Some(cb) = on_change.as_mut() {
                    cb(r, state);
                }
            })
        });
        inner.pages_flipped += summary.flipped;
        summary
    }

    /// Marks the map as changed for the cursors. Only called with the lock held, so a plain
    /// load and store does it: the atomic read-modify-write it replaces cost ~10 ns on every
    /// effective hypercall, a fifth of the handler's budget.
    ///
    /// The fence orders the bump before every later store of this thread, the change
    /// callback's dirty marking included: a migration thread that sees the dirty bit (with an
    /// acquiring read) then sees the new generation too, so its next cursor query refills.
    /// On x86 it compiles to nothing.
    fn bump_generation(&self) {
        let g = self.generation.load(Ordering::Relaxed);
        self.generation.store(g.wrapping_add(1), Ordering::Release);
        std::sync::atomic::fence(Ordering::Release);
    }

    /// Reads MSR `index`: the migration-control value if it is MSR_KVM_MIGRATION_CONTROL.
    pub fn rdmsr(&self, index: u32) -> Result<u64, TrackerError> {
        if index != MSR_KVM_MIGRATION_CONTROL {
            return Err(TrackerError::NotOurMsr { index });
        }
        Ok(self.msr.load(Ordering::Acquire))
    }

    /// Writes MSR `index`: 0 or KVM_MIGRATION_READY to MSR_KVM_MIGRATION_CONTROL. Any other bit
    /// is refused (inject #GP); the readiness callback hears every change of the value.
    pub fn wrmsr(&self, index: u32, value: u64) -> Result<(), TrackerError> {
        if index != MSR_KVM_MIGRATION_CONTROL {
            return Err(TrackerError::NotOurMsr { index });
        }
        let value = match hypercall::validate_migration_control(index, value) {
            Ok(v) => v,
            Err(e) => {
                self.rejected[e.reason as usize].fetch_add(1, Ordering::Relaxed);
                return Err(e.into());
            }
        };
        let mut guard = self.lock()?;
        guard.msr_writes += 1;
        self.set_msr(&mut guard, value);
        Ok(())
    }

    fn set_msr(&self, inner: &mut Inner, value: u64) {
        let old = self.msr.swap(value, Ordering::AcqRel);
        if old != value {
            if let Some(cb) = &mut inner.on_readiness {
                let ready = value & KVM_MIGRATION_READY as u64 != 0;
                self.in_callbacks(|| cb(ready, value));
            }
        }
    }

    /// True once the guest has written KVM_MIGRATION_READY (and not 0 since).
    pub fn is_ready(&self) -> bool {
        self.msr.load(Ordering::Acquire) & KVM_MIGRATION_READY as u64 != 0
    }

    /// The state of the page at `gpa` (any byte address in it). Pages outside RAM read as
    /// encrypted: they are not tracked.
    pub fn state(&self, gpa: u64) -> Result<PageState, TrackerError> {
        Ok(self.lock()?.map.state(gpa >> PAGE_SHIFT))
    }

    /// Guest reset: every page encrypted again (the change callback hears each shared range)
    /// and migration not ready (the readiness callback hears it if it was).
    ///
    /// The map is emptied in O(1) under the lock and the old one freed after it is released.
    /// With a change callback installed, the callback hears every shared range under the lock
    /// (that is its ordering promise), so the lock is then held O(shared ranges).
    pub fn reset(&self) -> Result<(), TrackerError> {
        let mut guard = self.lock()?;
        let inner = &mut *guard;
        let Inner { map, on_change, .. } = inner;
        // Bumped before any report, as `apply` does; a reset that changes nothing may bump
        // too (a cursor then merely refills once).
        if map.shared_pages() > 0 {
            self.bump_generation();
        }
        let old = match on_change.as_mut() {
            Some(cb) => self.in_callbacks(|| map.clear(Some(&mut |r| cb(r, PageState::Encrypted)))),
            None => map.clear(None),
        };
        self.set_msr(inner, 0);
        drop(guard);
        drop(old);
        Ok(())
    }

    /// Replaces the RAM layout (memory hotplug); shared pages that stay RAM stay shared.
    /// O(chunks) under the lock (see [`PageMap::set_layout`]); dropped chunks are freed after
    /// the lock is released.
    pub fn set_layout(&self, layout: Layout) -> Result<(), TrackerError> {
        let mut guard = self.lock()?;
        let dropped = guard.map.set_layout(layout);
        self.bump_generation();
        drop(guard);
        drop(dropped);
        Ok(())
    }

    /// The map and the MSR value at one instant, taken under the lock in O(chunks) (the chunks
    /// are shared copy-on-write, not copied), for work that must not hold the lock: encoding
    /// the stream, listing the ranges.
    pub fn snapshot(&self) -> Result<(PageMap, u64), TrackerError> {
        let inner = self.lock()?;
        let map = inner.map.snapshot();
        let msr = self.msr.load(Ordering::Acquire);
        drop(inner);
        Ok((map, msr))
    }

    /// A copy of the RAM layout.
    pub fn layout(&self) -> Result<Layout, TrackerError> {
        Ok(self.lock()?.map.layout().clone())
    }

    /// Statistics (O(ranges): counts ranges and bytes on the spot).
    pub fn stats(&self) -> Result<Stats, TrackerError> {
        let inner = self.lock()?;
        let mut rejected = [0; RejectReason::COUNT];
        for (r, c) in rejected.iter_mut().zip(&self.rejected) {
            *r = c.load(Ordering::Relaxed);
        }
        Ok(Stats {
            hypercalls: inner.accepted
                + self.unlocked_calls.load(Ordering::Relaxed)
                + rejected[..RejectReason::ReservedMsrBits as usize]
                    .iter()
                    .sum::<u64>(),
            rejected,
            clipped_pages: inner.clipped_pages,
            pages_flipped: inner.pages_flipped,
            shared_ranges: inner.map.range_count(),
            shared_pages: inner.map.shared_pages(),
            heap_bytes: (inner.map.heap_bytes() + std::mem::size_of::<Tracker>()) as u64,
            msr_value: self.msr.load(Ordering::Acquire),
            msr_writes: inner.msr_writes,
            ram_pages: inner.map.layout().pages(),
        })
    }

    /// The shared ranges now, ascending (a copy, for display and tests), listed from a
    /// snapshot after the lock is released.
    pub fn shared_ranges(&self) -> Result<Vec<PageRange>, TrackerError> {
        Ok(self.snapshot()?.0.shared_ranges().collect())
    }

    /// Runs `f` on the map and MSR value under the lock, for checks in tests and fuzzing. `f`
    /// holds up every vCPU while it runs: work that depends on the size of the map belongs on
    /// a [`Tracker::snapshot`] instead (as the stream encoder does).
    pub fn with_map<R>(&self, f: impl FnOnce(&PageMap, u64) -> R) -> Result<R, TrackerError> {
        let inner = self.lock()?;
        Ok(f(&inner.map, self.msr.load(Ordering::Acquire)))
    }

    /// Replaces the map and MSR value at once (an incoming migration). The map must have been
    /// built against this tracker's layout (see [`Tracker::layout`]); if the layout changed in
    /// the meantime nothing is replaced and [`TrackerError::LayoutMismatch`] says so. The
    /// change callback is not
    /// called: the loaded list is authoritative, there is nothing to re-send. The readiness
    /// callback hears a change of readiness.
    pub fn replace(&self, map: PageMap, msr: u64) -> Result<(), TrackerError> {
        let mut guard = self.lock()?;
        if map.layout() != guard.map.layout() {
            return Err(TrackerError::LayoutMismatch);
        }
        let old = std::mem::replace(&mut guard.map, map);
        self.bump_generation();
        self.set_msr(&mut guard, msr);
        // Freed after the lock is released: a hostile old map is thousands of chunks.
        drop(guard);
        drop(old);
        Ok(())
    }

    /// A cursor for ascending per-page queries.
    pub fn cursor(&self) -> Cursor<'_> {
        Cursor {
            tracker: self,
            state: CursorState::new(),
        }
    }

    /// Iterates the maximal runs over `[start, end)` gfns; with `shared_only`, only shared runs.
    pub fn runs(&self, range: PageRange, shared_only: bool) -> Runs<'_> {
        Runs {
            tracker: self,
            state: RunsState::new(range, shared_only),
        }
    }
}

/// How many runs a cursor caches per refill. Each refill takes the lock once; caching the next
/// runs as well (the RAM loop's queries ascend) makes a refill per 32 runs instead of per run.
const CURSOR_RUNS: usize = 64;

/// Pages of a bitmap chunk.
const BITMAP_PAGES: u64 = BITMAP_WORDS as u64 * 64;

/// A copy of one bitmap chunk's words, owned by a cursor: empty (no allocation) until the
/// cursor first needs it, then `BITMAP_WORDS` long and reused.
#[derive(Clone, Default)]
struct BitmapCopy(Box<[u64]>);

impl fmt::Debug for BitmapCopy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BitmapCopy({} words)", self.0.len())
    }
}

/// The state of a cursor, kept apart from the tracker borrow so that the C layer can hold the
/// tracker by reference count. See [`Cursor`].
#[derive(Debug, Clone)]
pub struct CursorState {
    generation: u64,
    /// The run the last answer came from.
    cached: Run,
    /// Ends of the runs cached at the last refill, ascending; states alternate.
    ends: [u64; CURSOR_RUNS],
    /// How many of `ends` are valid.
    len: usize,
    /// `ends[idx]` is `cached.range.end`.
    idx: usize,
    /// How many runs the next refill asks for: halved when the queries jumped past a whole
    /// window without using it (sparse queries over fine fragmentation, where filling the
    /// window is wasted work), doubled when they walked through it.
    want: usize,
    /// Steps taken through the window since the last refill.
    steps: usize,
    /// On a fragmented (bitmap) chunk runs are a page or two long, so walking cached run ends
    /// costs a refill every few dozen pages. Instead the cursor copies the chunk's words under
    /// the lock and answers any query inside it with a bit test and a scan for the run end,
    /// while `generation` holds (the same rule as `ends`).
    bits: BitmapCopy,
    /// `BITMAP_PAGES` while the copy is in use (then `ends` is empty), 0 otherwise: one compare
    /// tells whether a query falls inside it.
    bits_span: u64,
    /// First gfn of the copied chunk.
    bits_base: u64,
    /// Where the maximal run holding the copied chunk's last page ends (it may run on into the
    /// next chunks), read under the same lock: the end of any run reaching the chunk's end.
    bits_tail_end: u64,
    /// The chunk (gfn >> 15) of the last refill that found a bitmap chunk. The copy is made on
    /// the second refill in the same chunk, so that queries jumping from chunk to chunk do not
    /// pay a 4 KiB copy each.
    bitmap_chunk: u64,
}

impl Default for CursorState {
    fn default() -> Self {
        Self::new()
    }
}

impl CursorState {
    /// A cursor with nothing cached.
    pub fn new() -> CursorState {
        CursorState {
            generation: u64::MAX,
            cached: Run {
                range: PageRange { start: 0, end: 0 },
                state: PageState::Encrypted,
            },
            ends: [0; CURSOR_RUNS],
            len: 0,
            idx: 0,
            want: CURSOR_RUNS,
            steps: 0,
            bits: BitmapCopy::default(),
            bits_span: 0,
            bits_base: 0,
            bits_tail_end: 0,
            bitmap_chunk: u64::MAX,
        }
    }

    /// The state of `gfn` and where it ends: the returned run starts at `gfn`. O(1) while
    /// queries ascend inside the cached runs and the map does not change; otherwise one lookup.
    /// A `gfn` at or past [`MAX_GFN`] (beyond any guest physical address; the C layer refuses
    /// it) is answered for the last page below the limit: encrypted, ending at `MAX_GFN`.
    #[inline(always)]
    pub fn query(&mut self, tracker: &Tracker, gfn: u64) -> Result<Run, TrackerError> {
        if tracker.generation.load(Ordering::Acquire) == self.generation {
            if self.cached.range.contains(gfn) {
                return Ok(Run {
                    range: PageRange {
                        start: gfn,
                        end: self.cached.range.end,
                    },
                    state: self.cached.state,
                });
            }
            if gfn.wrapping_sub(self.bits_base) < self.bits_span {
                self.cached = bits_run(&self.bits.0, self.bits_base, self.bits_tail_end, gfn);
                return Ok(self.cached);
            }
            // With the copy in use `ends` is empty and `advance` finds nothing.
            if gfn >= self.cached.range.end && self.advance(gfn) {
                return Ok(Run {
                    range: PageRange {
                        start: gfn,
                        end: self.cached.range.end,
                    },
                    state: self.cached.state,
                });
            }
        }
        self.refill(tracker, gfn)
    }

    /// Moves forward through the cached runs to the one holding `gfn` (past the current one);
    /// false if `gfn` is past them all.
    #[inline]
    fn advance(&mut self, gfn: u64) -> bool {
        let mut k = self.idx;
        let mut state = self.cached.state;
        while k + 1 < self.len && self.ends[k] <= gfn {
            k += 1;
            state = match state {
                PageState::Shared => PageState::Encrypted,
                PageState::Encrypted => PageState::Shared,
            };
        }
        if k == self.idx || self.ends[k] <= gfn {
            return false;
        }
        self.idx = k;
        self.steps += 1;
        self.cached = Run {
            range: PageRange {
                start: self.ends[k - 1],
                end: self.ends[k],
            },
            state,
        };
        true
    }

    #[cold]
    fn refill(&mut self, tracker: &Tracker, gfn: u64) -> Result<Run, TrackerError> {
        let gfn = gfn.min(MAX_GFN - 1);
        let inner = tracker.lock()?;
        let generation = tracker.generation.load(Ordering::Acquire);
        if generation == self.generation
            && self.bits_span == 0
            && self.len > 0
            && gfn >= self.ends[self.len - 1]
        {
            // Ran off the end of the window (not a change of the map): adapt its size.
            if self.steps == 0 {
                self.want = (self.want / 2).max(1);
            } else if self.steps + 1 >= self.len {
                self.want = (self.want * 2).min(CURSOR_RUNS);
            }
        }
        // Writers bump the generation under the lock, so this pairs exactly with the map read.
        self.generation = generation;
        self.bits_span = 0;
        if let Some((base, words)) = inner.map.bitmap_words(gfn) {
            let chunk = gfn / BITMAP_PAGES;
            if self.bitmap_chunk == chunk {
                let tail_end = inner.map.run_at(base + BITMAP_PAGES - 1).range.end;
                self.cached = bits_run(words, base, tail_end, gfn);
                if self.bits.0.len() == BITMAP_WORDS {
                    self.bits.0.copy_from_slice(words);
                } else {
                    self.bits = BitmapCopy(words.to_vec().into_boxed_slice());
                }
                drop(inner);
                self.bits_span = BITMAP_PAGES;
                self.bits_base = base;
                self.bits_tail_end = tail_end;
                self.len = 0;
                self.idx = 0;
                self.steps = 0;
                return Ok(self.cached);
            }
            self.bitmap_chunk = chunk;
        }
        let (state, len) = inner.map.runs_from(gfn, &mut self.ends[..self.want]);
        self.len = len;
        self.idx = 0;
        self.steps = 0;
        self.cached = Run {
            range: PageRange {
                start: gfn,
                end: self.ends[0],
            },
            state,
        };
        Ok(self.cached)
    }
}

/// The maximal run from `gfn` on, answered from a copy of the bitmap chunk starting at `base`
/// (`base <= gfn < base + BITMAP_PAGES`); `tail_end` is where the run holding the chunk's last
/// page ends.
#[inline]
fn bits_run(words: &[u64], base: u64, tail_end: u64, gfn: u64) -> Run {
    let off = (gfn - base) as usize;
    let mut w = off / 64;
    let first = words.get(w).copied().unwrap_or(0);
    let shared = first >> (off % 64) & 1 != 0;
    // The run ends at the first bit after `off` that differs from `shared`.
    let flip = if shared { !0u64 } else { 0 };
    let mut x = (first ^ flip) & (!0u64 << (off % 64));
    let end = loop {
        if x != 0 {
            break base + (w * 64) as u64 + x.trailing_zeros() as u64;
        }
        w += 1;
        match words.get(w) {
            Some(&next) => x = next ^ flip,
            // The run reaches the chunk's end, so it is the run of the chunk's last page.
            None => break tail_end,
        }
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

/// Answers "is this page encrypted, and until which page" for ascending queries in O(1)
/// amortised: the RAM migration loop's per-page classification.
#[derive(Debug)]
pub struct Cursor<'a> {
    tracker: &'a Tracker,
    state: CursorState,
}

impl Cursor<'_> {
    /// See [`CursorState::query`].
    #[inline]
    pub fn query(&mut self, gfn: u64) -> Result<Run, TrackerError> {
        self.state.query(self.tracker, gfn)
    }
}

/// The position of a run iterator, kept apart from the tracker borrow (see [`CursorState`]).
/// It reads through a cursor, so a pass takes the lock once per refill of the cursor's window
/// (up to 64 runs) instead of once per run.
#[derive(Debug, Clone)]
pub struct RunsState {
    next: u64,
    end: u64,
    shared_only: bool,
    cursor: CursorState,
}

impl RunsState {
    /// Iteration over `range` (clipped to the 52-bit limit).
    pub fn new(range: PageRange, shared_only: bool) -> RunsState {
        RunsState {
            next: range.start.min(MAX_GFN),
            end: range.end.min(MAX_GFN),
            shared_only,
            cursor: CursorState::new(),
        }
    }

    /// The next run, exact when returned (see [`CursorState::query`]); `Ok(None)` at the end.
    pub fn next(&mut self, tracker: &Tracker) -> Result<Option<Run>, TrackerError> {
        while self.next < self.end {
            let mut run = self.cursor.query(tracker, self.next)?;
            run.range.end = run.range.end.min(self.end);
            self.next = run.range.end;
            if !self.shared_only || run.state == PageState::Shared {
                return Ok(Some(run));
            }
        }
        Ok(None)
    }
}

/// Iterator over maximal runs (see [`Tracker::runs`]). Each run is exact when returned.
#[derive(Debug)]
pub struct Runs<'a> {
    tracker: &'a Tracker,
    state: RunsState,
}

impl Iterator for Runs<'_> {
    type Item = Result<Run, TrackerError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.state.next(self.tracker).transpose()
    }
}
