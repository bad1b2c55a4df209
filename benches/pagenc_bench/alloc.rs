//! The counting global allocator: live heap bytes and allocation calls of the bench process.
//!
//! It counts two things: the bytes the program asked for (`Layout::size`), and what glibc's
//! malloc really spends on them: `malloc_usable_size` of the block (the request rounded up to
//! malloc's 16-byte granule, at least 24 bytes) plus the 8-byte chunk header every block carries.
//! A structure made of many small allocations (a B-tree's nodes, pagenc's run vectors) costs
//! visibly more than it asks for; the second figure is the one a VMM's RSS sees.

#![allow(unused_imports)]
use crate::prelude::*;
use std::alloc::{GlobalAlloc, Layout as AllocLayout, System};

pub(crate) struct Counting;
pub(crate) static LIVE: AtomicI64 = AtomicI64::new(0);
pub(crate) static ALLOCS: AtomicU64 = AtomicU64::new(0);
pub(crate) static LIVE_REAL: AtomicI64 = AtomicI64::new(0);

/// glibc's per-chunk header (`SIZE_SZ`): an in-use chunk spans its usable size plus this.
const CHUNK_HEADER: i64 = size_of::<usize>() as i64;

/// What malloc spends on the block at `p` (not null, live, from System).
fn real(p: *mut u8) -> i64 {
    // SAFETY: p is a live block of the system allocator, i.e. of glibc's malloc (System uses
    // malloc, or posix_memalign for large alignments, whose blocks malloc_usable_size accepts).
    unsafe { libc::malloc_usable_size(p.cast()) as i64 + CHUNK_HEADER }
}

// SAFETY: every method forwards to the system allocator with the caller's arguments unchanged
// and only adds bookkeeping on success, so System's guarantees carry over.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: AllocLayout) -> *mut u8 {
        // SAFETY: the caller upholds GlobalAlloc::alloc's contract, which System needs.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            LIVE.fetch_add(l.size() as i64, Ordering::Relaxed);
            LIVE_REAL.fetch_add(real(p), Ordering::Relaxed);
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: AllocLayout) -> *mut u8 {
        // SAFETY: as for alloc.
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            LIVE.fetch_add(l.size() as i64, Ordering::Relaxed);
            LIVE_REAL.fetch_add(real(p), Ordering::Relaxed);
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: AllocLayout) {
        LIVE_REAL.fetch_sub(real(p), Ordering::Relaxed);
        // SAFETY: p was allocated by System with layout l (every allocation goes through here).
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size() as i64, Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: AllocLayout, new: usize) -> *mut u8 {
        let old = real(p);
        // SAFETY: p came from System with layout l; the caller upholds realloc's contract.
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            LIVE.fetch_add(new as i64 - l.size() as i64, Ordering::Relaxed);
            LIVE_REAL.fetch_add(real(q) - old, Ordering::Relaxed);
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        q
    }
}

#[global_allocator]
pub(crate) static GLOBAL: Counting = Counting;

pub(crate) fn live() -> i64 {
    LIVE.load(Ordering::Relaxed)
}

/// Heap bytes `f` leaves allocated (the structure it builds), and its result.
pub(crate) fn measure_bytes<R>(f: impl FnOnce() -> R) -> (R, u64) {
    let before = live();
    let r = f();
    (r, (live() - before).max(0) as u64)
}

/// Heap bytes `f` leaves allocated: (its result, bytes requested, bytes malloc really spends).
pub(crate) fn measure_real<R>(f: impl FnOnce() -> R) -> (R, u64, u64) {
    let (b, b_real) = (live(), LIVE_REAL.load(Ordering::Relaxed));
    let r = f();
    (
        r,
        (live() - b).max(0) as u64,
        (LIVE_REAL.load(Ordering::Relaxed) - b_real).max(0) as u64,
    )
}
