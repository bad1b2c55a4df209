//! The counting global allocator: live heap bytes and allocation calls of the bench process.

#![allow(unused_imports)]
use crate::prelude::*;
use std::alloc::{GlobalAlloc, Layout as AllocLayout, System};

pub(crate) struct Counting;
pub(crate) static LIVE: AtomicI64 = AtomicI64::new(0);
pub(crate) static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every method forwards to the system allocator with the caller's arguments unchanged
// and only adds bookkeeping on success, so System's guarantees carry over.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: AllocLayout) -> *mut u8 {
        // SAFETY: the caller upholds GlobalAlloc::alloc's contract, which System needs.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            LIVE.fetch_add(l.size() as i64, Ordering::Relaxed);
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: AllocLayout) -> *mut u8 {
        // SAFETY: as for alloc.
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            LIVE.fetch_add(l.size() as i64, Ordering::Relaxed);
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: AllocLayout) {
        // SAFETY: p was allocated by System with layout l (every allocation goes through here).
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size() as i64, Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: AllocLayout, new: usize) -> *mut u8 {
        // SAFETY: p came from System with layout l; the caller upholds realloc's contract.
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            LIVE.fetch_add(new as i64 - l.size() as i64, Ordering::Relaxed);
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
