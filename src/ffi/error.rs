//! Result codes, the one place that maps Rust errors to them, and the detailed last-error message.

use std::ffi::{c_char, c_int};
use std::fmt::{self, Write as _};

use super::handle::pagenc_tracker;
use crate::core::{LayoutError, MAX_GFN, PAGE_SHIFT};
use crate::kvm::{ExitError, VmError};
use crate::stream::StreamError;
use crate::tracker::TrackerError;

/// What a pagenc call did. The values are stable: they are never renumbered or reused, and new
/// codes are only ever appended.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum pagenc_result {
    /// Success.
    Ok = 0,
    /// A required pointer argument was NULL.
    NullArgument = 1,
    /// The RAM layout was refused (unaligned, empty, overlapping, past 52 bits, too many
    /// ranges); nothing changed.
    InvalidLayout = 2,
    /// The guest's hypercall or MSR write was refused: the guest gets `-KVM_EINVAL` /
    /// `-KVM_ENOSYS` in RAX, or #GP for the MSR. Nothing changed; the VM goes on.
    GuestRejected = 3,
    /// The exit, or the MSR, is not pagenc's: the `struct kvm_run` is untouched and the caller
    /// handles it.
    UnhandledExit = 4,
    /// The migration stream was refused; the tracker is unchanged.
    BadStream = 5,
    /// The output buffer is too small; the size needed was written where the function says.
    BufferTooSmall = 6,
    /// Called from inside one of this tracker's own callbacks, which must not call back into it.
    Reentrant = 7,
    /// A KVM ioctl failed (the errno is in the message and in the function's `err` output).
    KvmError = 8,
    /// A bug in pagenc (a caught panic, or a tracker left unusable by one). The tracker must
    /// not be used for migration any more.
    Internal = 9,
    /// An argument other than a pointer is out of its allowed range (unaligned address,
    /// unknown flag, reversed range, negative fd, ...).
    InvalidArgument = 10,
    /// The caller's write callback failed.
    WriteFailed = 11,
    /// The kernel lacks what the call needs (a KVM capability or a hypercall exit).
    Unsupported = 12,
}

impl pagenc_result {
    /// Every code, in numeric order.
    pub(crate) const ALL: [pagenc_result; 13] = [
        pagenc_result::Ok,
        pagenc_result::NullArgument,
        pagenc_result::InvalidLayout,
        pagenc_result::GuestRejected,
        pagenc_result::UnhandledExit,
        pagenc_result::BadStream,
        pagenc_result::BufferTooSmall,
        pagenc_result::Reentrant,
        pagenc_result::KvmError,
        pagenc_result::Internal,
        pagenc_result::InvalidArgument,
        pagenc_result::WriteFailed,
        pagenc_result::Unsupported,
    ];

    /// The short description `pagenc_result_str` returns (NUL-terminated for C).
    fn text(self) -> &'static std::ffi::CStr {
        match self {
            pagenc_result::Ok => c"success",
            pagenc_result::NullArgument => c"a required pointer argument is NULL",
            pagenc_result::InvalidLayout => c"invalid RAM layout",
            pagenc_result::GuestRejected => c"guest request refused (the guest gets an error)",
            pagenc_result::UnhandledExit => c"exit or MSR not handled by pagenc",
            pagenc_result::BadStream => c"migration stream refused",
            pagenc_result::BufferTooSmall => c"buffer too small",
            pagenc_result::Reentrant => c"called from inside a callback of the same tracker",
            pagenc_result::KvmError => c"KVM ioctl failed",
            pagenc_result::Internal => c"internal error in pagenc (a bug)",
            pagenc_result::InvalidArgument => c"invalid argument",
            pagenc_result::WriteFailed => c"write callback failed",
            pagenc_result::Unsupported => c"not supported by this kernel",
        }
    }
}

/// An argument pagenc refused, with its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ArgError {
    /// An address that must be 4 KiB aligned is not.
    Unaligned { what: &'static str, gpa: u64 },
    /// An address at or past the 52-bit limit.
    PastLimit { what: &'static str, gpa: u64 },
    /// `start > end`.
    Reversed { start: u64, end: u64 },
    /// Unknown flag bits.
    Flags { flags: u32, known: u32 },
    /// A negative file descriptor.
    Fd { fd: c_int },
}

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ArgError::Unaligned { what, gpa } => write!(
                f,
                "{what} {gpa:#x} is not 4 KiB aligned (the low 12 bits must be 0)"
            ),
            ArgError::PastLimit { what, gpa } => write!(
                f,
                "{what} {gpa:#x} is past the 52-bit guest physical address limit; it must be \
                 below {:#x}",
                MAX_GFN << PAGE_SHIFT
            ),
            ArgError::Reversed { start, end } => write!(
                f,
                "range start {start:#x} is above its end {end:#x}; start must be <= end"
            ),
            ArgError::Flags { flags, known } => write!(
                f,
                "flags {flags:#x} have unknown bits {:#x}; allowed bits are {known:#x}",
                flags & !known
            ),
            ArgError::Fd { fd } => {
                write!(f, "file descriptor {fd} is negative; a VM fd is needed")
            }
        }
    }
}

/// Every failure an export can record as a tracker's last error. The value is stored and only
/// formatted when asked for (see `pagenc_last_error`).
#[derive(Debug)]
pub(crate) enum Error {
    /// A required pointer argument (named) was NULL.
    Null(&'static str),
    /// See [`ArgError`].
    Arg(ArgError),
    /// A tracker call failed.
    Tracker(TrackerError),
    /// A RAM layout was refused.
    Layout(LayoutError),
    /// An exit pagenc owns could not be handled.
    Exit(ExitError),
    /// An exit or MSR that is not pagenc's.
    NotHandled(NotHandled),
    /// A VM-fd helper failed.
    Vm(VmError),
    /// Saving or loading the stream failed.
    Stream(StreamError),
    /// A caller's buffer is too small.
    BufferTooSmall { needed: usize, len: usize },
}

/// Why `pagenc_handle_exit` left an exit to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotHandled {
    /// An exit reason pagenc does not handle.
    Exit { exit_reason: u32 },
    /// An MSR exit for another MSR, or for a reason other than pagenc's filter.
    Msr {
        exit_reason: u32,
        index: u32,
        reason: u32,
    },
}

impl fmt::Display for NotHandled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use crate::kvm::consts::{KVM_MSR_EXIT_REASON_FILTER, MSR_KVM_MIGRATION_CONTROL};
        match *self {
            NotHandled::Exit { exit_reason } => write!(
                f,
                "kvm_run exit_reason {exit_reason} is not handled by pagenc; it handles \
                 KVM_EXIT_HYPERCALL ({}), KVM_EXIT_X86_RDMSR ({}) and KVM_EXIT_X86_WRMSR ({})",
                crate::kvm::consts::KVM_EXIT_HYPERCALL,
                crate::kvm::consts::KVM_EXIT_X86_RDMSR,
                crate::kvm::consts::KVM_EXIT_X86_WRMSR
            ),
            NotHandled::Msr {
                exit_reason,
                index,
                reason,
            } => write!(
                f,
                "MSR exit (exit_reason {exit_reason}) for MSR {index:#x} with reason {reason:#x} \
                 is not pagenc's; it handles MSR {MSR_KVM_MIGRATION_CONTROL:#x} with reason \
                 KVM_MSR_EXIT_REASON_FILTER ({KVM_MSR_EXIT_REASON_FILTER:#x})"
            ),
        }
    }
}

impl From<TrackerError> for Error {
    fn from(e: TrackerError) -> Self {
        Error::Tracker(e)
    }
}

impl From<LayoutError> for Error {
    fn from(e: LayoutError) -> Self {
        Error::Layout(e)
    }
}

impl From<ArgError> for Error {
    fn from(e: ArgError) -> Self {
        Error::Arg(e)
    }
}

impl From<ExitError> for Error {
    fn from(e: ExitError) -> Self {
        Error::Exit(e)
    }
}

impl From<NotHandled> for Error {
    fn from(e: NotHandled) -> Self {
        Error::NotHandled(e)
    }
}

impl From<StreamError> for Error {
    fn from(e: StreamError) -> Self {
        Error::Stream(e)
    }
}

impl From<VmError> for Error {
    fn from(e: VmError) -> Self {
        Error::Vm(e)
    }
}

/// The code of a tracker error.
fn tracker_code(e: &TrackerError) -> pagenc_result {
    match e {
        TrackerError::Guest(_) => pagenc_result::GuestRejected,
        TrackerError::NotOurMsr { .. } => pagenc_result::UnhandledExit,
        TrackerError::Reentrant => pagenc_result::Reentrant,
        TrackerError::LayoutMismatch => pagenc_result::InvalidLayout,
        TrackerError::Poisoned => pagenc_result::Internal,
    }
}

impl Error {
    /// The single translation from Rust errors to C codes.
    pub(crate) fn code(&self) -> pagenc_result {
        match self {
            Error::Null(_) => pagenc_result::NullArgument,
            Error::Arg(_) => pagenc_result::InvalidArgument,
            Error::Tracker(e) => tracker_code(e),
            Error::Layout(_) => pagenc_result::InvalidLayout,
            Error::Exit(e) => tracker_code(&e.error),
            Error::NotHandled(_) => pagenc_result::UnhandledExit,
            Error::Vm(e) => match e {
                VmError::Ioctl { .. } => pagenc_result::KvmError,
                VmError::MapGpaRangeUnsupported { .. } | VmError::MissingCapability { .. } => {
                    pagenc_result::Unsupported
                }
                VmError::UnsupportedHypercallBits { .. }
                | VmError::UnsupportedMsrExitReasons { .. } => pagenc_result::InvalidArgument,
            },
            Error::Stream(e) => match e {
                StreamError::Io(_) => pagenc_result::WriteFailed,
                StreamError::Tracker(e) => tracker_code(e),
                _ => pagenc_result::BadStream,
            },
            Error::BufferTooSmall { .. } => pagenc_result::BufferTooSmall,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Null(name) => write!(f, "argument `{name}` is NULL; it is required"),
            Error::Arg(e) => e.fmt(f),
            Error::Tracker(e) => e.fmt(f),
            Error::Layout(e) => e.fmt(f),
            Error::Exit(e) => e.fmt(f),
            Error::NotHandled(e) => e.fmt(f),
            Error::Vm(e) => e.fmt(f),
            Error::Stream(e) => e.fmt(f),
            Error::BufferTooSmall { needed, len } => write!(
                f,
                "buffer of {len} bytes is too small; {needed} bytes are needed"
            ),
        }
    }
}

/// Formats into a caller's buffer without allocating: copies what fits (leaving room for the
/// NUL) and counts the whole length.
struct CBuf<'a> {
    buf: &'a mut [u8],
    used: usize,
    total: usize,
}

impl fmt::Write for CBuf<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.total += s.len();
        let room = self.buf.len().saturating_sub(1) - self.used;
        let n = room.min(s.len());
        self.buf[self.used..self.used + n].copy_from_slice(&s.as_bytes()[..n]);
        self.used += n;
        Ok(())
    }
}

/// Writes `msg` NUL-terminated into `buf` (truncated to `buf.len() - 1` bytes; nothing when
/// `buf` is empty) and returns its full length without the NUL.
pub(crate) fn write_message(buf: &mut [u8], msg: &dyn fmt::Display) -> usize {
    let mut w = CBuf {
        buf,
        used: 0,
        total: 0,
    };
    // CBuf never fails; a Display impl that does would only shorten the message.
    let _ = write!(w, "{msg}");
    let (used, total) = (w.used, w.total);
    if let Some(nul) = w.buf.get_mut(used) {
        *nul = 0;
    }
    total
}

/// Turns a C `(buf, len)` pair into a byte slice; empty when `buf` is NULL or `len` is 0.
///
/// # Safety
/// A non-NULL `buf` points to `len` writable bytes that nothing else uses during the call.
pub(crate) unsafe fn out_buf<'a>(buf: *mut c_char, len: usize) -> &'a mut [u8] {
    if buf.is_null() || len == 0 {
        return &mut [];
    }
    // SAFETY: per the contract, `buf` points to `len` writable bytes, exclusively ours.
    unsafe { std::slice::from_raw_parts_mut(buf.cast::<u8>(), len) }
}

/// A short, static description of a result code: "success", "invalid RAM layout", ... Any
/// value is accepted: one that is not a `pagenc_result` gives "unknown pagenc_result". The
/// string is never freed. Safe from any thread.
#[no_mangle]
pub extern "C" fn pagenc_result_str(result: c_int) -> *const c_char {
    ffi_boundary! {
        pagenc_result::ALL
            .iter()
            .find(|r| **r as c_int == result)
            .map_or(c"unknown pagenc_result", |r| r.text())
            .as_ptr()
    }
}

/// The detailed message of the last failed call on tracker `t`: what was wrong, with which
/// value, and what is allowed (e.g. "MAP_GPA_RANGE gpa 0x1234 is not 4 KiB aligned ...").
///
/// Copies at most `len - 1` bytes and a NUL into `buf` and returns the full length of the
/// message (without the NUL), so a return value >= `len` means it was truncated. `buf` may be
/// NULL when `len` is 0 (to ask for the length). Returns 0 and writes "" if no call on `t` has
/// failed yet, or when `t` is NULL.
///
/// Successful calls do not clear the message. The tracker keeps one message, not one per
/// thread: when several threads use `t`, the message may be that of another thread's failure,
/// so read it right after the failed call and treat it as diagnostic text. Safe from any thread.
/// The message of a failure that has no tracker (`pagenc_tracker_new`) is available through
/// `pagenc_layout_check`.
///
/// # Safety
/// `t` is NULL or a live tracker; `buf` is NULL or points to `len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn pagenc_last_error(
    t: *const pagenc_tracker,
    buf: *mut c_char,
    len: usize,
) -> usize {
    ffi_boundary! {
        // SAFETY: the contract: `buf` is NULL or points to `len` writable bytes.
        let buf = unsafe { out_buf(buf, len) };
        let Some(t) = (
            // SAFETY: the contract: `t` is NULL or a live tracker.
            unsafe { super::handle::try_ref(t) }
        ) else {
            return write_message(buf, &"");
        };
        match &*t.last_error() {
            Some(e) => write_message(buf, e),
            None => write_message(buf, &""),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_dense_and_in_order() {
        for (i, r) in pagenc_result::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
    }

    #[test]
    fn result_str_knows_every_code_and_survives_junk() {
        for r in pagenc_result::ALL {
            // SAFETY: pagenc_result_str returns a static NUL-terminated string.
            let s = unsafe { std::ffi::CStr::from_ptr(pagenc_result_str(r as c_int)) };
            assert!(!s.to_bytes().is_empty());
            assert_ne!(s.to_bytes(), b"unknown pagenc_result", "{r:?}");
        }
        for junk in [-1, 13, 7000, c_int::MIN, c_int::MAX] {
            // SAFETY: as above.
            let s = unsafe { std::ffi::CStr::from_ptr(pagenc_result_str(junk)) };
            assert_eq!(s.to_bytes(), b"unknown pagenc_result");
        }
    }

    #[test]
    fn message_truncates_and_counts() {
        let msg = "gpa 0x1234 is not aligned";
        let mut big = [0xffu8; 64];
        assert_eq!(write_message(&mut big, &msg), msg.len());
        assert_eq!(&big[..msg.len()], msg.as_bytes());
        assert_eq!(big[msg.len()], 0);

        let mut small = [0xffu8; 5];
        assert_eq!(write_message(&mut small, &msg), msg.len());
        assert_eq!(&small, b"gpa \0");

        let mut one = [0xffu8; 1];
        assert_eq!(write_message(&mut one, &msg), msg.len());
        assert_eq!(one, [0]);

        assert_eq!(write_message(&mut [], &msg), msg.len());
    }
}
