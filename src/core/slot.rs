//! One entry of the map's chunk directory: a chunk number and its chunk packed into 16 bytes.
//!
//! Boot lists of small guests hold one or two ranges per 128 MiB chunk, so the directory entry
//! is most of what the map costs there. `(u64, Chunk)` took 24 bytes (an 8-byte chunk number,
//! a tag, and a span or an `Arc` pointer); a B-tree holding the same ranges took less. Here the
//! chunk number is 32 bits (chunk numbers are below 2^25), the inline forms keep their span in
//! the next 4 bytes, and the heap forms keep their `Arc` as one raw pointer word, the span field
//! saying which of the two `Arc` types it is (a marker span, first > last, that no run has).
//!
//! This is the core's only `unsafe`: turning that pointer word back into the `Arc` it came
//! from. The slot owns one strong count of the `Arc` exactly as a `Chunk` would: `Clone` adds
//! one, `Drop` gives it back, and `take`/`put` move it between the slot and a `Chunk`, the
//! working form that chunk.rs updates.

#![allow(unsafe_code)]

use std::fmt;
use std::mem::size_of;
use std::ptr;
use std::sync::Arc;

use super::chunk::{Bitmap, Chunk, ChunkRef, RunList, Span, CHUNK_SHIFT};
use super::MAX_GFN;

/// Span field of a `Full` chunk.
const FULL: Span = Span::marker(1);
/// Span field of an `Empty` chunk (and of a slot whose chunk was taken out).
const EMPTY: Span = Span::marker(2);
/// Span field of a `Runs` chunk: `heap` is `Arc::into_raw` of an `Arc<RunList>`.
const RUNS: Span = Span::marker(3);
/// Span field of a `Bitmap` chunk: `heap` is `Arc::into_raw` of an `Arc<Bitmap>`.
const BITMAP: Span = Span::marker(4);

// Every chunk number fits 32 bits (gfns are below MAX_GFN), and the slot is the 16 bytes it is
// for.
const _: () = assert!(MAX_GFN >> CHUNK_SHIFT <= u32::MAX as u64 + 1);
const _: () = assert!(size_of::<Slot>() == 16);

/// A directory entry: chunk number and chunk.
pub(super) struct Slot {
    num: u32,
    /// `One`'s run; a marker for the other forms.
    span: Span,
    /// Null for the inline forms (`Full`, `One`, `Empty`); for `Runs` and `Bitmap`, the pointer
    /// `Arc::into_raw` returned, holding one strong count that this slot owns.
    heap: *const (),
}

// SAFETY: a slot is, to other threads, the `Chunk` it packs: `heap` is an `Arc<RunList>` or an
// `Arc<Bitmap>` it owns a count of and never mutates through a shared reference, and both are
// `Send + Sync`.
unsafe impl Send for Slot {}
// SAFETY: as for `Send`: `&Slot` gives only `&RunList` / `&Bitmap`, both `Sync`.
unsafe impl Sync for Slot {}

impl Slot {
    /// Packs `chunk` as chunk number `num`.
    pub(super) fn new(num: u64, chunk: Chunk) -> Slot {
        debug_assert!(num < MAX_GFN >> CHUNK_SHIFT);
        let num = num as u32;
        let (span, heap) = match chunk {
            Chunk::Full => (FULL, ptr::null()),
            Chunk::One(s) => (s, ptr::null()),
            Chunk::Empty => (EMPTY, ptr::null()),
            Chunk::Runs(r) => (RUNS, Arc::into_raw(r).cast::<()>()),
            Chunk::Bitmap(b) => (BITMAP, Arc::into_raw(b).cast::<()>()),
        };
        Slot { num, span, heap }
    }

    /// The chunk number (gfn >> CHUNK_SHIFT).
    #[inline]
    pub(super) fn num(&self) -> u64 {
        self.num as u64
    }

    /// The chunk, borrowed in place.
    #[inline]
    pub(super) fn view(&self) -> ChunkRef<'_> {
        if self.heap.is_null() {
            if self.span == FULL {
                ChunkRef::Full
            } else if self.span == EMPTY {
                ChunkRef::Empty
            } else {
                ChunkRef::One(&self.span)
            }
        } else if self.span == BITMAP {
            // SAFETY: `heap` came from `Arc::<Bitmap>::into_raw` (the marker says so) and this
            // slot holds a strong count, so the bitmap lives at least as long as `&self`; it is
            // only mutated through `take` (`&mut self`), never while this borrow lasts.
            ChunkRef::Bitmap(unsafe { &*self.heap.cast::<Bitmap>() })
        } else {
            debug_assert!(self.span == RUNS);
            // SAFETY: as above, for `Arc::<RunList>::into_raw`.
            ChunkRef::Runs(unsafe { &*self.heap.cast::<RunList>() })
        }
    }

    /// Moves the chunk out, leaving an empty one (which owns nothing).
    pub(super) fn take(&mut self) -> Chunk {
        let span = std::mem::replace(&mut self.span, EMPTY);
        let heap = std::mem::replace(&mut self.heap, ptr::null());
        if heap.is_null() {
            if span == FULL {
                Chunk::Full
            } else if span == EMPTY {
                Chunk::Empty
            } else {
                Chunk::One(span)
            }
        } else if span == BITMAP {
            // SAFETY: `heap` came from `Arc::<Bitmap>::into_raw` and its strong count moves to
            // the returned `Arc` (the slot was reset above, so it is given back only once).
            Chunk::Bitmap(unsafe { Arc::from_raw(heap.cast::<Bitmap>()) })
        } else {
            debug_assert!(span == RUNS);
            // SAFETY: as above, for `Arc::<RunList>::into_raw`.
            Chunk::Runs(unsafe { Arc::from_raw(heap.cast::<RunList>()) })
        }
    }

    /// Replaces the chunk (dropping the old one).
    pub(super) fn put(&mut self, chunk: Chunk) {
        *self = Slot::new(self.num(), chunk);
    }

    /// Updates the chunk in its working form: moved out, changed, packed back.
    #[inline]
    pub(super) fn update<R>(&mut self, f: impl FnOnce(&mut Chunk) -> R) -> R {
        let mut chunk = self.take();
        let r = f(&mut chunk);
        self.put(chunk);
        r
    }

    /// The chunk, unpacked.
    pub(super) fn into_chunk(mut self) -> Chunk {
        self.take()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        drop(self.take());
    }
}

impl Clone for Slot {
    fn clone(&self) -> Slot {
        if !self.heap.is_null() {
            if self.span == BITMAP {
                // SAFETY: `heap` came from `Arc::<Bitmap>::into_raw` and is alive (this slot
                // holds a count); the new count is owned by the clone.
                unsafe { Arc::increment_strong_count(self.heap.cast::<Bitmap>()) }
            } else {
                // SAFETY: as above, for `Arc::<RunList>::into_raw`.
                unsafe { Arc::increment_strong_count(self.heap.cast::<RunList>()) }
            }
        }
        Slot {
            num: self.num,
            span: self.span,
            heap: self.heap,
        }
    }
}

impl PartialEq for Slot {
    fn eq(&self, other: &Slot) -> bool {
        self.num == other.num && self.view() == other.view()
    }
}

impl Eq for Slot {}

impl fmt::Debug for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slot")
            .field("num", &self.num)
            .field("chunk", &self.view())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forms() -> Vec<Chunk> {
        let mut runs = Chunk::from_runs(&[(1, 3), (5, 9)]);
        let mut bitmap = Chunk::with_range(0, 1);
        for i in 1..3000u32 {
            bitmap.set(2 * i, 2 * i + 1, true, &mut |_, _| {});
        }
        assert!(matches!(runs, Chunk::Runs(_)) && matches!(bitmap, Chunk::Bitmap(_)));
        runs.set(20, 21, true, &mut |_, _| {});
        vec![
            Chunk::Full,
            Chunk::with_range(7, 300),
            Chunk::with_range(0, 1),
            Chunk::Empty,
            runs,
            bitmap,
        ]
    }

    #[test]
    fn every_form_round_trips_through_a_slot() {
        for chunk in forms() {
            let want = chunk.clone();
            let mut slot = Slot::new(12345, chunk);
            assert_eq!(slot.num(), 12345);
            assert_eq!(slot.view(), want.view());
            let back = slot.take();
            assert_eq!(back, want);
            assert_eq!(slot.view(), ChunkRef::Empty);
            slot.put(back);
            assert_eq!(slot.into_chunk(), want);
        }
    }

    #[test]
    fn clones_share_the_heap_forms_and_count_them() {
        for chunk in forms() {
            let arc_count = |c: &Chunk| match c {
                Chunk::Runs(r) => Arc::strong_count(r),
                Chunk::Bitmap(b) => Arc::strong_count(b),
                _ => 0,
            };
            let heap = matches!(chunk, Chunk::Runs(_) | Chunk::Bitmap(_));
            let probe = chunk.clone();
            assert_eq!(arc_count(&probe), 2 * heap as usize);
            let slot = Slot::new(1, chunk);
            let copy = slot.clone();
            assert_eq!(arc_count(&probe), 3 * heap as usize);
            assert_eq!(slot, copy);
            // Copy-on-write: updating the copy leaves the original alone.
            let mut copy = copy;
            let shared = !copy.view().get(100);
            copy.update(|c| c.set(100, 101, shared, &mut |_, _| {}));
            assert_eq!(slot.view(), probe.view());
            assert_ne!(copy.view(), probe.view());
            assert_eq!(arc_count(&probe), 2 * heap as usize);
            drop(copy);
            drop(slot);
            assert_eq!(arc_count(&probe), heap as usize);
        }
    }
}
