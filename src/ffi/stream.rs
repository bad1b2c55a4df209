//! The migration stream: saving a tracker's list and MSR value, and loading them on the
//! destination.

use std::ffi::{c_int, c_void};

use super::error::{pagenc_result, Error};
use super::handle::pagenc_tracker;
use crate::stream;

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
/// `buf` = NULL, `len` = 0 to learn the size. Since vCPUs may keep changing the list, the size
/// can grow before the next call; `pagenc_save_to` has no such round trip. The stream is a
/// snapshot taken under the tracker's lock. Any thread.
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
        let bytes = match stream::save_to_vec(&t.tracker) {
            Ok(b) => b,
            Err(e) => return t.fail(e),
        };
        if bytes.len() > len {
            // SAFETY: the contract: `written` is writable.
            unsafe { written.as_ptr().write(bytes.len()) };
            return t.fail(Error::BufferTooSmall { needed: bytes.len(), len });
        }
        if !bytes.is_empty() {
            let buf = try_nonnull!(buf, t);
            // SAFETY: the contract: `buf` points to `len` >= `bytes.len()` writable bytes, which
            // cannot overlap the vector pagenc just allocated.
            unsafe {
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.as_ptr(), bytes.len());
            }
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

/// Replaces the tracker's list and MSR value with those of the stream in `buf` (`len` bytes),
/// all or nothing: a stream that is truncated, of an unknown version, for another RAM layout,
/// unsorted, overlapping, not canonical, with trailing bytes, ... gives
/// `PAGENC_RESULT_BAD_STREAM`, the message names the offending field, value and byte offset,
/// and the tracker is exactly as before. The stream is hostile input: it is checked completely
/// and never makes pagenc allocate more than the destination's RAM layout justifies.
///
/// On success no change callback is called (the loaded list is the truth, there is nothing to
/// re-send); the readiness callback hears a change of readiness. The layout must not change
/// while this runs. Any thread.
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
        let t = try_ref!(t);
        let bytes = if len == 0 {
            &[][..]
        } else {
            let buf = try_nonnull!(buf, t);
            // SAFETY: the contract: `buf` points to `len` readable bytes, unchanged during the
            // call.
            unsafe { std::slice::from_raw_parts(buf.as_ptr().cast_const(), len) }
        };
        match stream::load(&t.tracker, bytes) {
            Ok(()) => pagenc_result::Ok,
            Err(e) => t.fail(e),
        }
    }
}
