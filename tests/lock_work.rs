//! Issue 10, point 3: no guest-shaped work under the lock, seen through the public APIs by
//! counting the heap (per thread, so that tests running in parallel do not disturb each
//! other): the size query of `pagenc_save` does not encode, a layout change does not rebuild
//! the map range by range, and a huge share grows the directory in place. The stall figures
//! themselves are in the bench (benches/pagenc_bench/stall.rs), not here: no timing in tests.

use std::alloc::{GlobalAlloc, Layout as AllocLayout, System};
use std::cell::Cell;

use pagenc::core::{Layout, PageMapBuilder, PageRange, RamRange, PAGE_SHIFT};
use pagenc::ffi::{
    pagenc_load, pagenc_ram_range, pagenc_result, pagenc_save, pagenc_tracker, pagenc_tracker_free,
    pagenc_tracker_new,
};
use pagenc::Tracker;

/// Counts this thread's live heap bytes, its peak, and its allocations.
struct Counting;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
}

fn add(n: usize) {
    let _ = LIVE.try_with(|l| {
        l.set(l.get() + n);
        let _ = PEAK.try_with(|p| p.set(p.get().max(l.get())));
    });
    let _ = ALLOCS.try_with(|a| a.set(a.get() + 1));
}

fn sub(n: usize) {
    let _ = LIVE.try_with(|l| l.set(l.get().saturating_sub(n)));
}

// SAFETY: forwards every call to the system allocator unchanged; the counting only touches
// const-initialised thread-locals, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: AllocLayout) -> *mut u8 {
        add(layout.size());
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: AllocLayout) {
        sub(layout.size());
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: AllocLayout, new_size: usize) -> *mut u8 {
        // Counted as a new block next to the old one (what a moving realloc costs at its peak).
        add(new_size);
        sub(layout.size());
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns its result, the peak of this thread's heap above where it started,
/// and the number of allocations it made.
fn measure<R>(f: impl FnOnce() -> R) -> (R, usize, usize) {
    let base = LIVE.with(|l| l.get());
    PEAK.with(|p| p.set(base));
    let allocs = ALLOCS.with(|a| a.get());
    let r = f();
    let peak = PEAK.with(|p| p.get()) - base;
    (r, peak, ALLOCS.with(|a| a.get()) - allocs)
}

const CHUNK: u64 = 1 << 15;

fn layout(ranges: &[(u64, u64)]) -> Layout {
    let ram: Vec<RamRange> = ranges
        .iter()
        .map(|&(s, n)| RamRange {
            gpa: s << PAGE_SHIFT,
            size: n << PAGE_SHIFT,
        })
        .collect();
    Layout::new(&ram).unwrap()
}

/// Every other page of `chunks` chunks from gfn 0 shared: the hostile guest.
fn hostile(l: &Layout, chunks: u64) -> Tracker {
    let mut b = PageMapBuilder::new(l.clone());
    for g in (0..chunks * CHUNK).step_by(2) {
        b.push(PageRange {
            start: g,
            end: g + 1,
        })
        .unwrap();
    }
    let t = Tracker::new(l.clone());
    t.replace(b.finish(), 0).unwrap();
    t
}

/// The size query (`buf` NULL, `len` 0) computes the length without encoding: before, it
/// encoded the whole stream (and the save after it encoded it again).
#[test]
fn the_size_query_of_pagenc_save_does_not_encode() {
    let l = layout(&[(0, 16 * CHUNK)]);
    let t = hostile(&l, 16);
    let len = pagenc::stream::encoded_len(&t).unwrap();
    assert!(len > 16 * 4096, "a stream of 16 bitmap chunks, {len} bytes");
    let bytes = pagenc::stream::save_to_vec(&t).unwrap();
    let ram = pagenc_ram_range {
        gpa: 0,
        size: (16 * CHUNK) << PAGE_SHIFT,
    };
    let mut p: *mut pagenc_tracker = std::ptr::null_mut();
    // SAFETY: one range at `ram`; `p` is writable.
    let rc = unsafe { pagenc_tracker_new(&ram, 1, &mut p) };
    assert_eq!(rc, pagenc_result::Ok);
    // SAFETY: `p` is live; `bytes` holds `bytes.len()` bytes.
    let rc = unsafe { pagenc_load(p, bytes.as_ptr(), bytes.len()) };
    assert_eq!(rc, pagenc_result::Ok);
    let mut written = 0usize;
    let (rc, peak, _) = measure(|| {
        // SAFETY: `p` is a live tracker; `written` is writable; NULL buf with len 0.
        unsafe { pagenc_save(p, std::ptr::null_mut(), 0, &mut written) }
    });
    assert_eq!(rc, pagenc_result::BufferTooSmall);
    assert_eq!(written, len);
    // The snapshot's directory (16 entries) and no stream-sized buffer.
    assert!(
        peak < len / 4,
        "the size query allocated {peak} bytes for a {len}-byte stream"
    );
    // And the save itself encodes once: one stream-sized buffer.
    let mut buf = vec![0u8; len];
    let (rc, peak, _) = measure(|| {
        // SAFETY: as above; `buf` holds `len` bytes.
        unsafe { pagenc_save(p, buf.as_mut_ptr(), len, &mut written) }
    });
    assert_eq!(rc, pagenc_result::Ok);
    assert!(
        peak < 2 * len,
        "the save allocated {peak} bytes for a {len}-byte stream"
    );
    // SAFETY: `p` is live and not used again.
    unsafe { pagenc_tracker_free(p) };
}

/// A layout change on a hostile map works chunk by chunk: before, it rebuilt the map with an
/// allocation per shared range (131 072 here) while holding the lock.
#[test]
fn a_layout_change_does_not_rebuild_the_map_range_by_range() {
    let l = layout(&[(0, 8 * CHUNK)]);
    let t = hostile(&l, 8);
    let before = t.shared_ranges().unwrap();
    // Hotplug a DIMM, and cut RAM in the middle of chunk 3 and at the end of chunk 6.
    let new = layout(&[
        (0, 3 * CHUNK + 1000),
        (4 * CHUNK, 3 * CHUNK - 10),
        (64 * CHUNK, CHUNK),
    ]);
    let ((), _, allocs) = measure(|| t.set_layout(new.clone()).unwrap());
    assert!(
        allocs < 64,
        "set_layout made {allocs} allocations for 8 chunks"
    );
    // The same result as clipping range by range.
    let want: Vec<PageRange> = before
        .iter()
        .flat_map(|&r| new.clip(r).collect::<Vec<_>>())
        .collect();
    assert_eq!(t.shared_ranges().unwrap(), want);
    assert_eq!(
        t.stats().unwrap().shared_pages,
        want.iter().map(|r| r.len()).sum::<u64>()
    );
    t.with_map(|m, _| m.check_invariants()).unwrap().unwrap();
}

/// A guest sharing everything in one call on a huge layout: the directory grows in place to
/// its final size; before, the splice held the new chunks and the grown directory at once, a
/// peak of twice the final heap.
#[test]
fn a_huge_share_grows_the_directory_in_place() {
    // 64 TiB of RAM: 2^19 chunks (the 4 PiB case is 2^25; the ratio is what matters).
    let chunks = 1u64 << 19;
    let l = layout(&[(0, chunks * CHUNK)]);
    let t = Tracker::new(l);
    let (out, peak, _) = measure(|| t.map_gpa_range(0, chunks * CHUNK, 0).unwrap());
    assert_eq!(out.summary.flipped, chunks * CHUNK);
    let heap = t.stats().unwrap().heap_bytes as usize;
    assert!(
        peak <= heap + heap / 8,
        "a share-everything call peaked at {peak} heap bytes for a final heap of {heap}"
    );
}

/// The snapshot a save encodes is one instant of the map, even across chunks and while vCPUs
/// keep updating chunks it shares copy-on-write: a writer flips a range that straddles a chunk
/// border (one hypercall, so one instant) back and forth, and every saved stream holds both
/// halves or neither.
#[test]
fn a_save_is_one_instant_of_the_map_across_chunks() {
    let l = layout(&[(0, 4 * CHUNK)]);
    let t = Tracker::new(l.clone());
    // Fragment both chunks so they are bitmaps (the copy-on-write copies 4 KiB on a write).
    for g in (0..2 * CHUNK).step_by(2) {
        if g + 2 < CHUNK - 8 || g > CHUNK + 8 {
            t.map_gpa_range(g << PAGE_SHIFT, 1, 0).unwrap();
        }
    }
    let stop = std::sync::atomic::AtomicBool::new(false);
    let straddle = PageRange {
        start: CHUNK - 3,
        end: CHUNK + 3,
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut shared = true;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let attrs = if shared { 0 } else { 0x10 };
                t.map_gpa_range(straddle.start << PAGE_SHIFT, straddle.len(), attrs)
                    .unwrap();
                shared = !shared;
            }
        });
        for _ in 0..100 {
            let bytes = pagenc::stream::save_to_vec(&t).unwrap();
            let (map, _) = pagenc::stream::decode(&l, &bytes).unwrap();
            let states: Vec<_> = (straddle.start..straddle.end)
                .map(|g| map.state(g))
                .collect();
            assert!(
                states.iter().all(|s| *s == states[0]),
                "a save saw half of one hypercall: {states:?}"
            );
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    t.with_map(|m, _| m.check_invariants()).unwrap().unwrap();
}
