//! The opaque C handle types, what each really is in Rust, and the NULL-checking helpers every
//! export starts with.
//!
//! Like rustls-ffi's `Castable`: a zero-sized, non-`repr(C)` struct per C type (cbindgen emits it
//! as an incomplete `typedef struct pagenc_x pagenc_x;`), and a trait that names the Rust type
//! behind the pointer and how it is owned. The helpers below are the only places that cast.
//!
//! - `pagenc_tracker` is an `Arc<TrackerHandle>`: iterators and cursors hold a clone, so the
//!   tracker lives until the C caller has freed the tracker *and* every iterator and cursor made
//!   from it, in any order.
//! - `pagenc_iter` and `pagenc_cursor` are `Box`es: one owner, used from one thread at a time.

use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard};

use super::error::{pagenc_result, Error};
use crate::tracker::{CursorState, RunsState, Tracker};

/// A page-encryption tracker: the list of one guest. Thread-safe (see each function).
pub struct pagenc_tracker {
    _private: [u8; 0],
    _not_send_sync: PhantomData<*mut u8>,
}

/// An iterator over runs of pages in one state. Use from one thread at a time.
pub struct pagenc_iter {
    _private: [u8; 0],
    _not_send_sync: PhantomData<*mut u8>,
}

/// A cursor for ascending per-page queries. Use from one thread at a time.
pub struct pagenc_cursor {
    _private: [u8; 0],
    _not_send_sync: PhantomData<*mut u8>,
}

macro_rules! opaque_debug {
    ($($t:ident),*) => {$(
        impl std::fmt::Debug for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(stringify!($t))
            }
        }
    )*};
}
opaque_debug!(pagenc_tracker, pagenc_iter, pagenc_cursor);

/// Marks a handle owned by an `Arc`.
#[derive(Debug)]
pub(crate) struct OwnershipArc;
/// Marks a handle owned by a `Box`.
#[derive(Debug)]
pub(crate) struct OwnershipBox;

/// The Rust type behind a C handle type, and how it is owned. One handle type has exactly one
/// ownership (an associated type), so it cannot be freed as the wrong kind.
pub(crate) trait Castable {
    /// `OwnershipArc` or `OwnershipBox`.
    type Ownership;
    /// What the pointer really points to.
    type RustType;
}

impl Castable for pagenc_tracker {
    type Ownership = OwnershipArc;
    type RustType = TrackerHandle;
}

impl Castable for pagenc_iter {
    type Ownership = OwnershipBox;
    type RustType = IterHandle;
}

impl Castable for pagenc_cursor {
    type Ownership = OwnershipBox;
    type RustType = CursorHandle;
}

/// What a `pagenc_tracker *` points to: the tracker and its last error.
#[derive(Debug)]
pub(crate) struct TrackerHandle {
    pub(crate) tracker: Tracker,
    /// The error of the last failed call. The error *value* is stored (a few words, no heap) and
    /// only formatted when `pagenc_last_error` asks, so a guest spamming refused hypercalls costs
    /// one uncontended lock and a copy per call, never an allocation.
    last_error: Mutex<Option<Error>>,
}

impl TrackerHandle {
    pub(crate) fn new(tracker: Tracker) -> TrackerHandle {
        TrackerHandle {
            tracker,
            last_error: Mutex::new(None),
        }
    }

    /// Records `e` as the last error and returns its code.
    pub(crate) fn fail(&self, e: impl Into<Error>) -> pagenc_result {
        let e = e.into();
        let code = e.code();
        *self.last_error() = Some(e);
        code
    }

    /// The last error slot. A panic while holding it cannot leave it half-written (it only ever
    /// holds a whole `Option<Error>`), so poisoning is ignored.
    pub(crate) fn last_error(&self) -> MutexGuard<'_, Option<Error>> {
        self.last_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// What a `pagenc_iter *` points to.
#[derive(Debug)]
pub(crate) struct IterHandle {
    pub(crate) tracker: Arc<TrackerHandle>,
    pub(crate) state: RunsState,
    /// `Ok` while running or after a normal end; the code of the error that ended the iteration
    /// early otherwise (sticky: later `next` calls return false at once).
    pub(crate) status: pagenc_result,
}

/// What a `pagenc_cursor *` points to.
#[derive(Debug)]
pub(crate) struct CursorHandle {
    pub(crate) tracker: Arc<TrackerHandle>,
    pub(crate) state: CursorState,
}

/// Hands `value` to C as an owned `Arc` handle.
pub(crate) fn arc_into_ptr<C: Castable<Ownership = OwnershipArc>>(value: C::RustType) -> *mut C {
    Arc::into_raw(Arc::new(value)).cast_mut().cast()
}

/// Hands `value` to C as an owned `Box` handle.
pub(crate) fn box_into_ptr<C: Castable<Ownership = OwnershipBox>>(value: C::RustType) -> *mut C {
    Box::into_raw(Box::new(value)).cast()
}

/// Borrows the Rust value behind a handle; `None` for NULL.
///
/// # Safety
/// `p` is NULL or a handle of type `C` made by pagenc and not yet freed, and (for a `Box`
/// handle) not in use by another thread for the lifetime `'a`.
pub(crate) unsafe fn try_ref<'a, C: Castable>(p: *const C) -> Option<&'a C::RustType> {
    // SAFETY: per the contract, a non-NULL `p` points to a live `C::RustType` (the cast undoes
    // the one in `arc_into_ptr`/`box_into_ptr`).
    unsafe { p.cast::<C::RustType>().as_ref() }
}

/// Mutably borrows the Rust value behind a `Box` handle; `None` for NULL.
///
/// # Safety
/// `p` is NULL or a handle of type `C` made by pagenc, not yet freed and not used by any other
/// thread for the lifetime `'a` (the header's "one thread at a time").
pub(crate) unsafe fn try_mut<'a, C: Castable<Ownership = OwnershipBox>>(
    p: *mut C,
) -> Option<&'a mut C::RustType> {
    // SAFETY: per the contract, a non-NULL `p` points to a live `C::RustType` nobody else uses.
    unsafe { p.cast::<C::RustType>().as_mut() }
}

/// A new strong reference to the value behind an `Arc` handle; `None` for NULL.
///
/// # Safety
/// `p` is NULL or a handle of type `C` made by pagenc and not yet freed.
pub(crate) unsafe fn try_clone_arc<C: Castable<Ownership = OwnershipArc>>(
    p: *const C,
) -> Option<Arc<C::RustType>> {
    if p.is_null() {
        return None;
    }
    let p = p.cast::<C::RustType>();
    // SAFETY: `p` came from `Arc::into_raw` in `arc_into_ptr` and the C caller still owns that
    // reference, so the count is at least 1 while we add ours.
    unsafe {
        Arc::increment_strong_count(p);
        Some(Arc::from_raw(p))
    }
}

/// Drops the C caller's reference of an `Arc` handle; NULL is ignored.
///
/// # Safety
/// `p` is NULL or a handle of type `C` made by pagenc that the caller owns and never uses again.
pub(crate) unsafe fn free_arc<C: Castable<Ownership = OwnershipArc>>(p: *mut C) {
    if let Some(p) = NonNull::new(p) {
        // SAFETY: `p` came from `Arc::into_raw` and the caller gives its reference up.
        drop(unsafe { Arc::from_raw(p.as_ptr().cast_const().cast::<C::RustType>()) });
    }
}

/// Frees a `Box` handle; NULL is ignored.
///
/// # Safety
/// `p` is NULL or a handle of type `C` made by pagenc that the caller owns and never uses again.
pub(crate) unsafe fn free_box<C: Castable<Ownership = OwnershipBox>>(p: *mut C) {
    if let Some(p) = NonNull::new(p) {
        // SAFETY: `p` came from `Box::into_raw` and the caller gives it up.
        drop(unsafe { Box::from_raw(p.as_ptr().cast::<C::RustType>()) });
    }
}

/// A pointer argument (`*const T` or `*mut T`, which coerces) as `NonNull`, `None` for NULL.
pub(crate) fn nonnull<T>(p: *const T) -> Option<NonNull<T>> {
    NonNull::new(p.cast_mut())
}

/// What an export returns for a NULL required argument, chosen by its return type:
/// `PAGENC_RESULT_NULL_ARGUMENT`, `false`, 0 or NULL.
pub(crate) trait NullValue {
    fn null_value() -> Self;
}

impl NullValue for pagenc_result {
    fn null_value() -> Self {
        pagenc_result::NullArgument
    }
}

impl NullValue for bool {
    fn null_value() -> Self {
        false
    }
}

impl NullValue for usize {
    fn null_value() -> Self {
        0
    }
}

impl NullValue for () {
    fn null_value() -> Self {}
}

/// `let t = try_ref!(t);`: the Rust value behind a handle, or an early return of the
/// [`NullValue`] for NULL. Only inside an export whose `# Safety` contract covers `$p`.
macro_rules! try_ref {
    ($p:ident) => {
        // SAFETY: the export's contract: `$p` is NULL or a live pagenc handle of its type.
        match unsafe { $crate::ffi::handle::try_ref($p) } {
            Some(r) => r,
            None => return $crate::ffi::handle::NullValue::null_value(),
        }
    };
}

/// `let it = try_mut!(it);`: like [`try_ref!`] for a one-thread-at-a-time `Box` handle.
macro_rules! try_mut {
    ($p:ident) => {
        // SAFETY: the export's contract: `$p` is NULL or a live pagenc handle of its type that
        // no other thread is using now.
        match unsafe { $crate::ffi::handle::try_mut($p) } {
            Some(r) => r,
            None => return $crate::ffi::handle::NullValue::null_value(),
        }
    };
}

/// `let out = try_nonnull!(out, handle);`: a required pointer argument as `NonNull`, or (for
/// NULL) an early return of `PAGENC_RESULT_NULL_ARGUMENT`, recorded as the last error of
/// `handle` (a `&TrackerHandle`) when one is given.
macro_rules! try_nonnull {
    ($p:ident) => {
        match $crate::ffi::handle::nonnull($p) {
            Some(p) => p,
            None => return $crate::ffi::handle::NullValue::null_value(),
        }
    };
    ($p:ident, $h:expr) => {
        match $crate::ffi::handle::nonnull($p) {
            Some(p) => p,
            None => return $h.fail($crate::ffi::error::Error::Null(stringify!($p))),
        }
    };
}
