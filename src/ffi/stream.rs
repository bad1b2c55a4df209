//! The migration stream: saving a tracker's list and MSR value, and loading them on the
//! destination.

use std::ffi::{c_int, c_void};

use super::error::{pagenc_result, Error};
use super::handle::pagenc_tracker;
use crate::stream::{self, StreamError, StreamProblem};

/// What was wrong with a stream `pagenc_load_detailed` refused, in the classes a VMM acts on
/// differently. The values are stable: never renumbered or reused, new ones only appended.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum pagenc_stream_problem {
    /// The stream loaded, or the call failed for a reason that is not the stream's (NULL
    /// argument, `PAGENC_RESULT_REENTRANT`, `PAGENC_RESULT_INTERNAL`, ...).
    None = 0,
    /// Not a page-encryption stream at all (the magic is not "PGEL").
    NotAStream = 1,
    /// Written by a newer pagenc than this one: upgrade the destination.
    NewerVersion = 2,
    /// A format version this pagenc does not read: one an older pagenc wrote (version 1, which
    /// had no checksum and did not name its layout) or one never written.
    OldVersion = 3,
    /// Made for another RAM layout than the destination's (sizes, ends or ranges differ):
    /// start the destination with the source's memory configuration.
    WrongLayout = 4,
    /// Damaged in transit or storage: the CRC32C checksum does not match, or the stream is too
    /// short to hold one. Sending it again may work.
    Damaged = 5,
    /// The checksum matches but the content breaks the format's rules (a faulty or hostile
    /// writer; sending it again will not help).
    Invalid = 6,
}

impl From<StreamProblem> for pagenc_stream_problem {
    fn from(p: StreamProblem) -> Self {
        match p {
            StreamProblem::NotAStream => pagenc_stream_problem::NotAStream,
            StreamProblem::NewerVersion => pagenc_stream_problem::NewerVersion,
            StreamProblem::OldVersion => pagenc_stream_problem::OldVersion,
            StreamProblem::WrongLayout => pagenc_stream_problem::WrongLayout,
            StreamProblem::Damaged => pagenc_stream_problem::Damaged,
            StreamProblem::Invalid => pagenc_stream_problem::Invalid,
            StreamProblem::NotTheStream => pagenc_stream_problem::None,
        }
    }
}

/// Receives a piece of the stream: `len` bytes at `data`, to be written in order after the
/// pieces before it. Returns 0 on success; any other value stops `pagenc_save_to`, which then
/// returns `PAGENC_RESULT_WRITE_FAILED`.
pub type pagenc_write_fn =
    Option<unsafe extern "C" fn(opaque: *mut c_void, data: *const u8, len: usize) -> c_int>;

/// Saves the tracker's list and MSR value as a stream (versioned, big-endian; see
/// docs/stream-format.md) into `buf`, and the number of bytes written into `*written`.
///
/// If `len` is too small, returns `PAGENC_RESULT_BUFFER_TOO_SMALL` and writes the size needed
/// into `*written` (the one output written on a failure), leaving `buf` untouched: call with
/// `buf` = NULL, `len` = 0 to learn the size. That size query computes the length without
/// encoding, so a query and a save encode the list once. Since vCPUs may keep changing the
/// list, the size can grow before the next call; `pagenc_save_to` has no such round trip.
///
/// The stream is a snapshot taken under the tracker's lock in O(chunks of 128 MiB of guest
/// address space holding shared pages): the lock is not held while the list is encoded, so
/// vCPUs are not stalled by the size of the list. Any thread.
///
/// # Safety
/// `t` is NULL or a live tracker; `buf` is NULL or points to `len` writable bytes; `written`
/// is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn pagenc_save(
    t: *const pagenc_tracker,
    buf: *mut u8,
    len: usize,
    written: *mut usize,
) -> pagenc_result {
    ffi_boundary! {
        let t = try_ref!(t);
        let written = try_nonnull!(written, t);
        let (map, msr) = match t.tracker.snapshot() {
            Ok(s) => s,
            Err(e) => return t.fail(e),
        };
        let needed = stream::map_encoded_len(&map);
        if needed > len {
            // SAFETY: the contract: `written` is writable.
            unsafe { written.as_ptr().write(needed) };
            return t.fail(Error::BufferTooSmall { needed, len });
        }
        let buf = try_nonnull!(buf, t);
        let bytes = stream::encode_into(&map, msr, Vec::with_capacity(needed));
        debug_assert_eq!(bytes.len(), needed);
        // SAFETY: the contract: `buf` points to `len` >= `needed` == `bytes.len()` writable
        // bytes, which cannot overlap the vector pagenc just allocated.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.as_ptr(), bytes.len());
        }
        // SAFETY: the contract: `written` is writable.
        unsafe { written.as_ptr().write(bytes.len()) };
        pagenc_result::Ok
    }
}

/// Adapts a C write callback to `std::io::Write`.
struct CWriter {
    f: unsafe extern "C" fn(*mut c_void, *const u8, usize) -> c_int,
    opaque: *mut c_void,
}

impl std::io::Write for CWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        // SAFETY: the contract of `pagenc_save_to`: `f` may be called with `opaque` and a
        // readable buffer; `data` is one for the duration of the call.
        let rc = unsafe { (self.f)(self.opaque, data.as_ptr(), data.len()) };
        if rc == 0 {
            Ok(data.len())
        } else {
            Err(std::io::Error::other(format!(
                "the write callback returned {rc} for {} bytes",
                data.len()
            )))
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Saves the tracker's list and MSR value as a stream through `cb(opaque, data, len)`, called
/// on this thread one or more times with consecutive pieces (never with `len` 0), after the
/// tracker's lock has been released: `cb` may block (a socket) and may even call into `t`.
/// Returns `PAGENC_RESULT_WRITE_FAILED` as soon as `cb` returns non-zero (part of the stream may
/// have been written). Any thread.
///
/// # Safety
/// `t` is NULL or a live tracker; `cb`, when not NULL, is safe to call with `opaque`.
#[no_mangle]
pub unsafe extern "C" fn pagenc_save_to(
    t: *const pagenc_tracker,
    cb: pagenc_write_fn,
    opaque: *mut c_void,
) -> pagenc_result {
    ffi_boundary! {
        let t = try_ref!(t);
        let Some(f) = cb else {
            return t.fail(Error::Null("cb"));
        };
        match stream::save(&t.tracker, &mut CWriter { f, opaque }) {
            Ok(_) => pagenc_result::Ok,
            Err(e) => t.fail(e),
        }
    }
}

/// Shared body of `pagenc_load` and `pagenc_load_detailed`: the result and the problem class.
///
/// # Safety
/// As for those two.
unsafe fn load_c(
    t: *mut pagenc_tracker,
    buf: *const u8,
    len: usize,
) -> (pagenc_result, pagenc_stream_problem) {
    // SAFETY: the contract: `t` is NULL or a live tracker.
    let t = match unsafe { super::handle::try_ref(t) } {
        Some(t) => t,
        None => return (pagenc_result::NullArgument, pagenc_stream_problem::None),
    };
    let bytes = if len == 0 {
        &[][..]
    } else if buf.is_null() {
        return (t.fail(Error::Null("buf")), pagenc_stream_problem::None);
    } else {
        // SAFETY: the contract: `buf` points to `len` readable bytes, unchanged during the call.
        unsafe { std::slice::from_raw_parts(buf, len) }
    };
    match stream::load(&t.tracker, bytes) {
        Ok(()) => (pagenc_result::Ok, pagenc_stream_problem::None),
        Err(e) => {
            let problem = StreamError::problem(&e).into();
            (t.fail(e), problem)
        }
    }
}

/// Replaces the tracker's list and MSR value with those of the stream in `buf` (`len` bytes),
/// all or nothing: a stream that is damaged (checksum), truncated, of a version this build does
/// not read, for another RAM layout, unsorted, overlapping, not canonical, ... gives
/// `PAGENC_RESULT_BAD_STREAM`, the message names the offending field, value and byte offset,
/// and the tracker is exactly as before. `pagenc_load_detailed` also says which class of
/// problem it was. The stream is hostile input: its checksum is checked before any other field
/// is believed, it is checked completely, and it never makes pagenc allocate more than the
/// destination's RAM layout justifies.
///
/// On success no change callback is called (the loaded list is the truth, there is nothing to
/// re-send); the readiness callback hears a change of readiness. If the layout changes while
/// this runs, the load is refused with `PAGENC_RESULT_INVALID_LAYOUT` and nothing changes. Any
/// thread.
///
/// # Safety
/// `t` is NULL or a live tracker; `buf` is NULL (only with `len` 0) or points to `len` readable
/// bytes.
#[no_mangle]
pub unsafe extern "C" fn pagenc_load(
    t: *mut pagenc_tracker,
    buf: *const u8,
    len: usize,
) -> pagenc_result {
    ffi_boundary! {
        // SAFETY: same contract.
        unsafe { load_c(t, buf, len) }.0
    }
}

/// `pagenc_load`, and the class of the problem of a refused stream in `*problem` (when
/// `problem` is not NULL; written on every return, `PAGENC_STREAM_PROBLEM_NONE` on success and
/// on failures that are not the stream's), so that a VMM can tell a stream for another RAM
/// layout from a damaged one or one from a newer pagenc without parsing the message. The
/// result codes are those of `pagenc_load`. Any thread.
///
/// # Safety
/// As for `pagenc_load`; `problem` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn pagenc_load_detailed(
    t: *mut pagenc_tracker,
    buf: *const u8,
    len: usize,
    problem: *mut pagenc_stream_problem,
) -> pagenc_result {
    let problem = std::ptr::NonNull::new(problem);
    let answer = |p: pagenc_stream_problem| {
        if let Some(out) = problem {
            // SAFETY: the contract: a non-NULL `problem` is writable.
            unsafe { out.as_ptr().write(p) };
        }
    };
    // Written first, so that a caller never reads an uninitialised value, even after a panic.
    answer(pagenc_stream_problem::None);
    ffi_boundary! {
        // SAFETY: same contract.
        let (rc, p) = unsafe { load_c(t, buf, len) };
        answer(p);
        rc
    }
}
