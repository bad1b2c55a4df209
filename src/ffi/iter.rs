//! The two read paths for a VMM's RAM migration loop: the run iterator and the cursor.

use super::error::{pagenc_result, ArgError};
use super::handle::{
    box_into_ptr, free_box, pagenc_cursor, pagenc_iter, pagenc_tracker, try_clone_arc,
    CursorHandle, IterHandle,
};
use crate::core::{PageRange, Run, MAX_GFN, PAGE_SHIFT, PAGE_SIZE};
use crate::tracker::{CursorState, RunsState};

/// `pagenc_iter_new` flag: return only shared runs.
pub const PAGENC_ITER_SHARED_ONLY: u32 = 1;
/// Every flag `pagenc_iter_new` knows.
const ITER_FLAGS: u32 = PAGENC_ITER_SHARED_ONLY;

/// One past the highest guest physical address (2^52): the end of "all of guest memory" for
/// `pagenc_iter_new`, and the limit of `pagenc_cursor_query`.
pub const PAGENC_GPA_LIMIT: u64 = 0x0010_0000_0000_0000;
const _: () = assert!(PAGENC_GPA_LIMIT == MAX_GFN << PAGE_SHIFT);

/// A run of pages in one state: `[gpa, gpa + npages * 4096)`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct pagenc_run {
    /// Guest physical address of the first page (4 KiB aligned).
    pub gpa: u64,
    /// Number of 4 KiB pages (at least 1).
    pub npages: u64,
    /// True if the pages are encrypted, false if shared.
    pub encrypted: bool,
}

impl From<Run> for pagenc_run {
    fn from(r: Run) -> Self {
        pagenc_run {
            gpa: r.range.start << PAGE_SHIFT,
            npages: r.range.len(),
            encrypted: r.state.is_encrypted(),
        }
    }
}

/// Creates an iterator over the runs of `[start_gpa, end_gpa)`: maximal ranges of pages in one
/// state, in ascending order, alternating encrypted and shared, the first starting at
/// `start_gpa` and the last ending at `end_gpa` (both 4 KiB aligned; `end_gpa` is clipped to
/// `PAGENC_GPA_LIMIT`; an empty range yields no run). Pages outside guest RAM belong to
/// encrypted runs. With `flags` = `PAGENC_ITER_SHARED_ONLY` only the shared runs are returned.
///
/// The iterator does not hold the tracker's lock between runs: vCPUs keep changing the map while
/// it runs. What holds:
///
/// - Always: the runs are ascending and contiguous, cover `[start_gpa, end_gpa)` exactly (no gap,
///   no overlap), and every run is exact at some instant during the `pagenc_iter_next` call that
///   returned it: all its pages were in its state then, and the state changed at its end then
///   (or its end is `end_gpa`).
/// - While the map does not change during the iteration: the runs are also maximal and
///   alternate encrypted and shared.
/// - When the map changes between two calls: a run that was maximal when returned may not be
///   any more, and two consecutive runs may have the same state (e.g. the page after a shared
///   run turned shared in between). Every such change is reported by the change callback, which
///   is what lets a VMM re-send those pages; a VMM that needs maximal runs merges adjacent runs
///   of the same state itself.
///
/// On success writes the iterator to `*out` (free it with `pagenc_iter_free`). Unaligned or
/// reversed bounds and unknown flags give `PAGENC_RESULT_INVALID_ARGUMENT` (message in
/// `pagenc_last_error(t, ...)`). Any thread; the iterator keeps `t` alive.
///
/// # Safety
/// `t` is NULL or a live tracker; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn pagenc_iter_new(
    t: *const pagenc_tracker,
    start_gpa: u64,
    end_gpa: u64,
    flags: u32,
    out: *mut *mut pagenc_iter,
) -> pagenc_result {
    ffi_boundary! {
        let h = try_ref!(t);
        let out = try_nonnull!(out, h);
        if flags & !ITER_FLAGS != 0 {
            return h.fail(ArgError::Flags { flags, known: ITER_FLAGS });
        }
        for (what, gpa) in [("iterator start", start_gpa), ("iterator end", end_gpa)] {
            if gpa % PAGE_SIZE != 0 {
                return h.fail(ArgError::Unaligned { what, gpa });
            }
        }
        if start_gpa > end_gpa {
            return h.fail(ArgError::Reversed { start: start_gpa, end: end_gpa });
        }
        // SAFETY: the contract: `t` is a live tracker (non-NULL, checked above).
        let Some(tracker) = (unsafe { try_clone_arc(t) }) else {
            return pagenc_result::NullArgument;
        };
        let range = PageRange {
            start: start_gpa >> PAGE_SHIFT,
            end: end_gpa >> PAGE_SHIFT,
        };
        let it = IterHandle {
            tracker,
            state: RunsState::new(range, flags & PAGENC_ITER_SHARED_ONLY != 0),
            status: pagenc_result::Ok,
        };
        // SAFETY: the contract: `out` is writable.
        unsafe { out.as_ptr().write(box_into_ptr::<pagenc_iter>(it)) };
        pagenc_result::Ok
    }
}

/// Writes the next run to `*out` and returns true; returns false at the end (and on every call
/// after it), leaving `*out` untouched.
///
/// Lock granularity: the iterator reads through a cursor (see `pagenc_cursor_new`), so a call
/// takes the tracker's lock only when the cursor must refill: when the map changed since the
/// last refill (a generation number, checked without the lock), or when the iteration passed
/// the runs cached at the last refill (up to 64 runs, or one 32768-page chunk copied whole when
/// it is a bitmap). A refill holds the lock for one directory search and that bounded read;
/// other calls take no lock at all. So on an unchanging map a pass takes the lock about once per
/// 64 runs, and on a map that changes between every two calls, once per call.
///
/// False is also returned when the iteration stopped early on an error (called from a callback of
/// the tracker, or an internal error): check `pagenc_iter_result` after the loop before trusting
/// that every run was seen. False when `it` or `out` is NULL.
///
/// # Safety
/// `it` is NULL or a live iterator no other thread is using; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn pagenc_iter_next(it: *mut pagenc_iter, out: *mut pagenc_run) -> bool {
    ffi_boundary! {
        let it = try_mut!(it);
        let out = try_nonnull!(out);
        if it.status != pagenc_result::Ok {
            return false;
        }
        match it.state.next(&it.tracker.tracker) {
            Ok(Some(run)) => {
                // SAFETY: the contract: `out` is writable.
                unsafe { out.as_ptr().write(run.into()) };
                true
            }
            Ok(None) => false,
            Err(e) => {
                it.status = it.tracker.fail(e);
                false
            }
        }
    }
}

/// Why `pagenc_iter_next` returned false: `PAGENC_RESULT_OK` when the iteration is at its end (or
/// still going), otherwise the error that stopped it early (`PAGENC_RESULT_REENTRANT`,
/// `PAGENC_RESULT_INTERNAL`; the tracker's `pagenc_last_error` has the message).
/// `PAGENC_RESULT_NULL_ARGUMENT` for a NULL `it`.
///
/// # Safety
/// `it` is NULL or a live iterator no other thread is using.
#[no_mangle]
pub unsafe extern "C" fn pagenc_iter_result(it: *const pagenc_iter) -> pagenc_result {
    ffi_boundary! {
        try_ref!(it).status
    }
}

/// Frees an iterator. NULL is fine; freeing twice is not. It may outlive its tracker's
/// `pagenc_tracker_free`.
///
/// # Safety
/// `it` is NULL or a live iterator the caller owns and does not use again.
#[no_mangle]
pub unsafe extern "C" fn pagenc_iter_free(it: *mut pagenc_iter) {
    ffi_boundary! {
        // SAFETY: the contract: `it` is NULL or an iterator the caller gives up.
        unsafe { free_box(it) }
    }
}

/// Creates a cursor for per-page queries in ascending address order, the shape of a RAM
/// migration loop: each query answers "encrypted or shared, and until where", and as long as
/// the queries stay inside the answered run and the map does not change, the next query costs
/// O(1) without taking the lock. Queries may also go backwards or jump; they then cost one
/// lookup.
///
/// On success writes the cursor to `*out` (free it with `pagenc_cursor_free`). Any thread; the
/// cursor keeps `t` alive and is then used from one thread at a time.
///
/// # Safety
/// `t` is NULL or a live tracker; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn pagenc_cursor_new(
    t: *const pagenc_tracker,
    out: *mut *mut pagenc_cursor,
) -> pagenc_result {
    ffi_boundary! {
        let h = try_ref!(t);
        let out = try_nonnull!(out, h);
        // SAFETY: the contract: `t` is a live tracker (non-NULL, checked above).
        let Some(tracker) = (unsafe { try_clone_arc(t) }) else {
            return pagenc_result::NullArgument;
        };
        let c = CursorHandle {
            tracker,
            state: CursorState::new(),
        };
        // SAFETY: the contract: `out` is writable.
        unsafe { out.as_ptr().write(box_into_ptr::<pagenc_cursor>(c)) };
        pagenc_result::Ok
    }
}

/// Answers for the page holding `gpa` (any byte address below `PAGENC_GPA_LIMIT`): writes to
/// `*out` the run from that page (`out->gpa` = `gpa` rounded down to 4 KiB) to where the state
/// changes (`out->npages`), and its state (`out->encrypted`). The answer is exact at the time of
/// the call; a later change is reported by the change callback.
///
/// `*out` is written only on success. `gpa` at or past the limit gives
/// `PAGENC_RESULT_INVALID_ARGUMENT`; called from one of the tracker's callbacks it may give
/// `PAGENC_RESULT_REENTRANT`.
///
/// # Safety
/// `c` is NULL or a live cursor no other thread is using; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn pagenc_cursor_query(
    c: *mut pagenc_cursor,
    gpa: u64,
    out: *mut pagenc_run,
) -> pagenc_result {
    ffi_boundary! {
        let c = try_mut!(c);
        let out = try_nonnull!(out, c.tracker);
        match cursor_run(c, gpa) {
            Ok(run) => {
                // SAFETY: the contract: `out` is writable.
                unsafe { out.as_ptr().write(run.into()) };
                pagenc_result::Ok
            }
            Err(code) => code,
        }
    }
}

fn cursor_run(c: &mut CursorHandle, gpa: u64) -> Result<Run, pagenc_result> {
    if gpa >= PAGENC_GPA_LIMIT {
        return Err(c.tracker.fail(ArgError::PastLimit {
            what: "cursor query gpa",
            gpa,
        }));
    }
    c.state
        .query(&c.tracker.tracker, gpa >> PAGE_SHIFT)
        .map_err(|e| c.tracker.fail(e))
}

/// The convenience form of `pagenc_cursor_query`: whether the page holding `gpa` is encrypted,
/// and (when `run_end_gpa` is not NULL) the address where that state ends, so that a loop can
/// skip to it. Returns false and leaves `*run_end_gpa` untouched on any error (NULL `c`, `gpa`
/// past the limit, re-entrance): use `pagenc_cursor_query` where errors must be told apart.
///
/// # Safety
/// `c` is NULL or a live cursor no other thread is using; `run_end_gpa` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn pagenc_cursor_is_encrypted(
    c: *mut pagenc_cursor,
    gpa: u64,
    run_end_gpa: *mut u64,
) -> bool {
    ffi_boundary! {
        let c = try_mut!(c);
        match cursor_run(c, gpa) {
            Ok(run) => {
                if let Some(end) = std::ptr::NonNull::new(run_end_gpa) {
                    // SAFETY: the contract: a non-NULL `run_end_gpa` is writable.
                    unsafe { end.as_ptr().write(run.range.end << PAGE_SHIFT) };
                }
                run.state.is_encrypted()
            }
            Err(_) => false,
        }
    }
}

/// Frees a cursor. NULL is fine; freeing twice is not. It may outlive its tracker's
/// `pagenc_tracker_free`.
///
/// # Safety
/// `c` is NULL or a live cursor the caller owns and does not use again.
#[no_mangle]
pub unsafe extern "C" fn pagenc_cursor_free(c: *mut pagenc_cursor) {
    ffi_boundary! {
        // SAFETY: the contract: `c` is NULL or a cursor the caller gives up.
        unsafe { free_box(c) }
    }
}
