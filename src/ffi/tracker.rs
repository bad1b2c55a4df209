//! The tracker's exports: life cycle, the guest's hypercall and MSR, `struct kvm_run`, point
//! queries, callbacks and statistics.

use std::ffi::{c_char, c_void};

use kvm_bindings::kvm_run;

use super::error::{out_buf, pagenc_result, write_message, Error, NotHandled};
use super::handle::{arc_into_ptr, free_arc, pagenc_tracker, TrackerHandle};
use crate::core::{
    Layout, LayoutError, PageRange, PageState, RamRange, MAX_RAM_RANGES, PAGE_SHIFT,
};
use crate::hypercall::RejectReason;
use crate::kvm::consts::{KVM_EINVAL, KVM_EXIT_X86_RDMSR, KVM_EXIT_X86_WRMSR};
use crate::kvm::{handle_exit_detailed, ExitOutcome};
use crate::tracker::{ChangeCallback, ReadinessCallback, Stats, Tracker, TrackerError};

/// The number of rejection reasons: the length of `pagenc_stats.rejected`, indexed by
/// `pagenc_reject_reason`.
pub const PAGENC_REJECT_REASONS: usize = 7;
const _: () = assert!(PAGENC_REJECT_REASONS == RejectReason::COUNT);

/// The value written to `*hc_ret` when the call could not be carried out for a reason that is not
/// the guest's (NULL tracker, re-entrance, internal error): `-KVM_EINVAL`, so the guest does not
/// believe a change was recorded. The same value `pagenc_handle_exit` writes then.
fn host_failure_ret() -> u64 {
    (KVM_EINVAL as i64).wrapping_neg() as u64
}

/// One range of guest RAM, as the VMM describes it: `size` bytes from `gpa`. Both must be
/// multiples of 4 KiB and `size` non-zero. RAM below and above the PCI hole, and each hotplugged
/// DIMM, are separate entries.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct pagenc_ram_range {
    /// Guest physical address of the first byte.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
}

// The C array is handed to the core as its own `RamRange` (also `repr(C)`) without copying:
// both types must have the same layout.
const _: () = {
    use std::mem::{align_of, offset_of, size_of};
    assert!(size_of::<pagenc_ram_range>() == size_of::<RamRange>());
    assert!(align_of::<pagenc_ram_range>() == align_of::<RamRange>());
    assert!(offset_of!(pagenc_ram_range, gpa) == offset_of!(RamRange, gpa));
    assert!(offset_of!(pagenc_ram_range, size) == offset_of!(RamRange, size));
};

/// Why the guest's call or MSR write was refused: the index into `pagenc_stats.rejected`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum pagenc_reject_reason {
    /// The hypercall number is not `KVM_HC_MAP_GPA_RANGE` (guest got `-KVM_ENOSYS`).
    UnknownHypercall = 0,
    /// The gpa is not 4 KiB aligned.
    Unaligned = 1,
    /// npages is 0.
    ZeroLength = 2,
    /// gfn + npages wraps or goes past the 52-bit guest physical address limit.
    OutOfRange = 3,
    /// An attribute bit in 63:5 is set.
    ReservedAttrs = 4,
    /// The page-size hint (attribute bits 3:0) is not 0 (4K), 1 (2M) or 2 (1G).
    BadPageSizeHint = 5,
    /// A write to MSR_KVM_MIGRATION_CONTROL set a bit other than KVM_MIGRATION_READY (#GP).
    ReservedMsrBits = 6,
}

impl From<RejectReason> for pagenc_reject_reason {
    fn from(r: RejectReason) -> Self {
        // Exhaustive both ways: a new reason fails to compile here until the C enum has it.
        match r {
            RejectReason::UnknownHypercall => pagenc_reject_reason::UnknownHypercall,
            RejectReason::Unaligned => pagenc_reject_reason::Unaligned,
            RejectReason::ZeroLength => pagenc_reject_reason::ZeroLength,
            RejectReason::OutOfRange => pagenc_reject_reason::OutOfRange,
            RejectReason::ReservedAttrs => pagenc_reject_reason::ReservedAttrs,
            RejectReason::BadPageSizeHint => pagenc_reject_reason::BadPageSizeHint,
            RejectReason::ReservedMsrBits => pagenc_reject_reason::ReservedMsrBits,
        }
    }
}

/// Statistics of a tracker (`pagenc_tracker_stats`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct pagenc_stats {
    /// Hypercalls handed to the tracker (`pagenc_map_gpa_range`, `pagenc_hypercall`, and
    /// `pagenc_handle_exit` for KVM_EXIT_HYPERCALL) with a non-NULL `t`, whatever the result:
    /// accepted, refused (`PAGENC_RESULT_GUEST_REJECTED`), `PAGENC_RESULT_REENTRANT`, and the
    /// call that ran into an internal error (after which the tracker refuses
    /// `pagenc_tracker_stats` too). MSR accesses are not included.
    pub hypercalls: u64,
    /// Refusals, indexed by `pagenc_reject_reason` (MSR writes with reserved bits under
    /// `PAGENC_REJECT_REASON_RESERVED_MSR_BITS`).
    pub rejected: [u64; PAGENC_REJECT_REASONS],
    /// Pages named by accepted calls that lie outside guest RAM (accepted, not stored).
    pub clipped_pages: u64,
    /// Pages whose state really changed, in total.
    pub pages_flipped: u64,
    /// Maximal shared ranges now.
    pub shared_ranges: u64,
    /// Shared pages now.
    pub shared_pages: u64,
    /// Bytes of memory the map uses now.
    pub heap_bytes: u64,
    /// MSR_KVM_MIGRATION_CONTROL now.
    pub msr_value: u64,
    /// Accepted MSR_KVM_MIGRATION_CONTROL writes, in total.
    pub msr_writes: u64,
    /// Pages of guest RAM in the layout.
    pub ram_pages: u64,
}

impl From<Stats> for pagenc_stats {
    fn from(s: Stats) -> Self {
        // Destructured so that a new field in `Stats` fails to compile here until it is mirrored.
        let Stats {
            hypercalls,
            rejected,
            clipped_pages,
            pages_flipped,
            shared_ranges,
            shared_pages,
            heap_bytes,
            msr_value,
            msr_writes,
            ram_pages,
        } = s;
        pagenc_stats {
            hypercalls,
            rejected,
            clipped_pages,
            pages_flipped,
            shared_ranges,
            shared_pages,
            heap_bytes,
            msr_value,
            msr_writes,
            ram_pages,
        }
    }
}

/// Called after every effective change, with the pages whose state really flipped
/// (`[gpa, gpa + npages * 4096)`) and their new state. See
/// `pagenc_tracker_set_change_callback`.
pub type pagenc_change_fn =
    Option<unsafe extern "C" fn(opaque: *mut c_void, gpa: u64, npages: u64, encrypted: bool)>;

/// Called after every change of MSR_KVM_MIGRATION_CONTROL: whether the guest is now ready for
/// migration, and the MSR's new value. See `pagenc_tracker_set_readiness_callback`.
pub type pagenc_readiness_fn =
    Option<unsafe extern "C" fn(opaque: *mut c_void, ready: bool, msr_value: u64)>;

/// A C function pointer and the caller's opaque pointer, as one value the Rust closures own.
struct CCallback<F> {
    f: F,
    opaque: *mut c_void,
}

// SAFETY: the tracker may call the callback from any thread that calls into it (that is the
// contract `pagenc_tracker_set_change_callback` / `_set_readiness_callback` state in the
// header), with `opaque` as given; pagenc never dereferences `opaque`. Making that safe for the
// caller's data is the caller's business, as with any C callback.
unsafe impl<F> Send for CCallback<F> {}

type ChangeFn = unsafe extern "C" fn(*mut c_void, u64, u64, bool);
type ReadinessFn = unsafe extern "C" fn(*mut c_void, bool, u64);

impl CCallback<ChangeFn> {
    /// A method, so that closures capture the whole (Send) wrapper, not its raw-pointer field.
    fn call(&self, range: PageRange, state: PageState) {
        // SAFETY: the contract of `pagenc_tracker_set_change_callback`: `f` is safe to call
        // with `opaque` from any thread that calls into the tracker.
        unsafe {
            (self.f)(
                self.opaque,
                range.start << PAGE_SHIFT,
                range.len(),
                state.is_encrypted(),
            )
        }
    }
}

impl CCallback<ReadinessFn> {
    /// See the change callback's `call`.
    fn call(&self, ready: bool, value: u64) {
        // SAFETY: the contract of `pagenc_tracker_set_readiness_callback`, as above.
        unsafe { (self.f)(self.opaque, ready, value) }
    }
}

/// Builds a layout from a C array, bounding `n` before the slice is made.
///
/// # Safety
/// `ram` is NULL or points to `n` readable ranges.
unsafe fn layout_from_c(ram: *const pagenc_ram_range, n: usize) -> Result<Layout, Error> {
    // NULL first, as the header promises: a NULL `ram` with any `n` > 0 is NULL_ARGUMENT, even
    // an `n` that would also be too many ranges.
    if n != 0 && ram.is_null() {
        return Err(Error::Null("ram"));
    }
    if n > MAX_RAM_RANGES {
        return Err(LayoutError::TooManyRanges { count: n }.into());
    }
    let ram = if n == 0 {
        &[][..]
    } else {
        // SAFETY: the caller's contract: non-NULL `ram` points to `n` ranges; `n` is bounded;
        // `RamRange` has the layout of `pagenc_ram_range` (asserted above).
        unsafe { std::slice::from_raw_parts(ram.cast::<RamRange>(), n) }
    };
    Ok(Layout::new(ram)?)
}

/// Creates a tracker for a guest whose RAM is the `n` ranges at `ram` (any order; adjacent
/// ranges may touch; each address and size 4 KiB aligned, sizes non-zero, no overlap, all below
/// 2^52). `ram` may be NULL when `n` is 0 (a guest without RAM yet; see
/// `pagenc_tracker_set_layout`). Every page starts encrypted; migration is not ready.
///
/// On success writes the new tracker to `*out`, which the caller frees with
/// `pagenc_tracker_free`. Returns `PAGENC_RESULT_INVALID_LAYOUT` for a bad layout (the message is
/// available from `pagenc_layout_check`), `PAGENC_RESULT_NULL_ARGUMENT` if `out` is NULL or `ram`
/// is NULL with `n` > 0; `*out` is then untouched. pagenc keeps no pointer into `ram`.
///
/// # Safety
/// `ram` is NULL or points to `n` readable `struct pagenc_ram_range`; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn pagenc_tracker_new(
    ram: *const pagenc_ram_range,
    n: usize,
    out: *mut *mut pagenc_tracker,
) -> pagenc_result {
    ffi_boundary! {
        let out = try_nonnull!(out);
        // SAFETY: the contract: `ram` is NULL or points to `n` ranges.
        match unsafe { layout_from_c(ram, n) } {
            Ok(layout) => {
                let t = arc_into_ptr::<pagenc_tracker>(TrackerHandle::new(Tracker::new(layout)));
                // SAFETY: `out` is non-NULL and writable per the contract.
                unsafe { out.as_ptr().write(t) };
                pagenc_result::Ok
            }
            Err(e) => e.code(),
        }
    }
}

/// Checks a RAM layout as `pagenc_tracker_new` and `pagenc_tracker_set_layout` would, without
/// creating anything: `PAGENC_RESULT_OK`, or the code and (when `msg` is not NULL) the message
/// saying which range is wrong, copied as by `pagenc_last_error` (at most `msg_len - 1` bytes
/// and a NUL). Use it to explain a failed `pagenc_tracker_new`. Safe from any thread.
///
/// # Safety
/// `ram` is NULL or points to `n` readable ranges; `msg` is NULL or points to `msg_len`
/// writable bytes.
#[no_mangle]
pub unsafe extern "C" fn pagenc_layout_check(
    ram: *const pagenc_ram_range,
    n: usize,
    msg: *mut c_char,
    msg_len: usize,
) -> pagenc_result {
    ffi_boundary! {
        // SAFETY: the contract: `ram` is NULL or points to `n` ranges.
        match unsafe { layout_from_c(ram, n) } {
            Ok(_) => pagenc_result::Ok,
            Err(e) => {
                // SAFETY: the contract: `msg` is NULL or points to `msg_len` writable bytes.
                write_message(unsafe { out_buf(msg, msg_len) }, &e);
                e.code()
            }
        }
    }
}

/// Frees the caller's reference to a tracker. NULL is fine; freeing twice is not.
///
/// Iterators and cursors made from `t` may still be in use and freed later: they keep the
/// tracker alive (but nothing can change it any more). No callback runs after this returns.
/// Must not run while another thread is still calling a function on `t`.
///
/// # Safety
/// `t` is NULL or a live tracker the caller owns and does not use again.
#[no_mangle]
pub unsafe extern "C" fn pagenc_tracker_free(t: *mut pagenc_tracker) {
    ffi_boundary! {
        // SAFETY: the contract: `t` is NULL or a live tracker the caller gives up.
        unsafe { free_arc(t) }
    }
}

/// Replaces the RAM layout (memory hotplug and unplug), with the rules of `pagenc_tracker_new`.
/// Shared pages that are still RAM stay shared; pages that stop being RAM are forgotten. On
/// failure nothing changes and `pagenc_last_error` says which range is wrong. The tracker's
/// lock is held for O(chunks of 128 MiB holding shared pages), never for O(shared ranges), so
/// vCPUs are not stalled by how fragmented the guest made its list. Any thread.
///
/// # Safety
/// `t` is NULL or a live tracker; `ram` is NULL or points to `n` readable ranges.
#[no_mangle]
pub unsafe extern "C" fn pagenc_tracker_set_layout(
    t: *mut pagenc_tracker,
    ram: *const pagenc_ram_range,
    n: usize,
) -> pagenc_result {
    ffi_boundary! {
        let t = try_ref!(t);
        // SAFETY: the contract: `ram` is NULL or points to `n` ranges.
        match unsafe { layout_from_c(ram, n) } {
            Ok(layout) => match t.tracker.set_layout(layout) {
                Ok(()) => pagenc_result::Ok,
                Err(e) => t.fail(e),
            },
            Err(e) => t.fail(e),
        }
    }
}

/// Guest reset (reboot): every page encrypted again and migration not ready. The change callback
/// hears every range that was shared; the readiness callback hears the change if the guest was
/// ready. Without a change callback the list is emptied in O(1) under the tracker's lock and
/// freed after it; with one, the lock is held while the callback hears every shared range (its
/// ordering promise), O(shared ranges). Any thread.
///
/// # Safety
/// `t` is NULL or a live tracker.
#[no_mangle]
pub unsafe extern "C" fn pagenc_tracker_reset(t: *mut pagenc_tracker) -> pagenc_result {
    ffi_boundary! {
        let t = try_ref!(t);
        match t.tracker.reset() {
            Ok(()) => pagenc_result::Ok,
            Err(e) => t.fail(e),
        }
    }
}

/// Shared body of `pagenc_map_gpa_range` and `pagenc_hypercall`.
///
/// # Safety
/// As for those two.
unsafe fn hypercall_c(
    t: *mut pagenc_tracker,
    nr: u64,
    args: [u64; 3],
    hc_ret: *mut u64,
) -> pagenc_result {
    let hc_ret = std::ptr::NonNull::new(hc_ret);
    let answer = |v: u64| {
        if let Some(p) = hc_ret {
            // SAFETY: the contract: a non-NULL `hc_ret` is writable.
            unsafe { p.as_ptr().write(v) };
        }
    };
    // Written first, so that the guest never reads a stale 0 ("done") even if what follows
    // panics.
    answer(host_failure_ret());
    ffi_boundary! {
        let t = try_ref!(t);
        match t.tracker.handle_hypercall(nr, args) {
            Ok(_) => {
                answer(crate::tracker::HypercallOutcome::RET);
                pagenc_result::Ok
            }
            Err(TrackerError::Guest(e)) => {
                answer(e.kvm_ret());
                t.fail(TrackerError::Guest(e))
            }
            Err(e) => t.fail(e),
        }
    }
}

/// Handles `KVM_HC_MAP_GPA_RANGE` (hypercall 12) from its arguments, for a VMM that decodes
/// `KVM_EXIT_HYPERCALL` itself: `gpa` (4 KiB aligned), `npages` (> 0, `gpa + npages * 4096`
/// within 52 bits), `attrs` (bits 3:0 page-size hint 0/1/2, bit 4 encrypted, bits 63:5 zero).
/// Pages outside guest RAM are accepted and not stored.
///
/// `*hc_ret`, when `hc_ret` is not NULL, is **always** written, on every return: the value to put
/// in `kvm_run.hypercall.ret` (the guest's RAX): 0 on success, `-KVM_EINVAL` (as uint64_t) for a
/// refused call, and also `-KVM_EINVAL` when the call could not be carried out (NULL `t`,
/// `PAGENC_RESULT_REENTRANT`, `PAGENC_RESULT_INTERNAL`).
///
/// Returns `PAGENC_RESULT_OK`, or `PAGENC_RESULT_GUEST_REJECTED` for a refused call (nothing
/// changed; `pagenc_last_error` names the bad value; counted in the stats; the VM goes on).
/// Callable from every vCPU thread at once and concurrently with everything else on `t`.
///
/// # Safety
/// `t` is NULL or a live tracker; `hc_ret` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn pagenc_map_gpa_range(
    t: *mut pagenc_tracker,
    gpa: u64,
    npages: u64,
    attrs: u64,
    hc_ret: *mut u64,
) -> pagenc_result {
    let nr = crate::kvm::consts::KVM_HC_MAP_GPA_RANGE as u64;
    // SAFETY: same contract.
    unsafe { hypercall_c(t, nr, [gpa, npages, attrs], hc_ret) }
}

/// Like `pagenc_map_gpa_range`, with the hypercall number: any `nr` other than
/// `KVM_HC_MAP_GPA_RANGE` (12) is refused with `PAGENC_RESULT_GUEST_REJECTED` and `*hc_ret` =
/// `-KVM_ENOSYS` (-1000 as uint64_t). A VMM that handles other hypercalls itself dispatches them
/// before calling this. `*hc_ret` is always written when not NULL, as for
/// `pagenc_map_gpa_range`.
///
/// # Safety
/// `t` is NULL or a live tracker; `hc_ret` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn pagenc_hypercall(
    t: *mut pagenc_tracker,
    nr: u64,
    a0: u64,
    a1: u64,
    a2: u64,
    hc_ret: *mut u64,
) -> pagenc_result {
    // SAFETY: same contract.
    unsafe { hypercall_c(t, nr, [a0, a1, a2], hc_ret) }
}

/// Handles one vCPU exit, reading and writing the `struct kvm_run` the vCPU fd maps:
///
/// - `KVM_EXIT_HYPERCALL`: `KVM_HC_MAP_GPA_RANGE` is applied as by `pagenc_map_gpa_range`
///   (honouring `KVM_EXIT_HYPERCALL_LONG_MODE`), and `hypercall.ret` is **always** written:
///   0, `-KVM_EINVAL`, or `-KVM_ENOSYS` for another hypercall number (which a VMM that handles
///   others must dispatch before calling this).
/// - `KVM_EXIT_X86_RDMSR` / `KVM_EXIT_X86_WRMSR` for MSR_KVM_MIGRATION_CONTROL (0x4b564d08)
///   with reason `KVM_MSR_EXIT_REASON_FILTER`: a read fills `msr.data`; a write of 0 or
///   KVM_MIGRATION_READY is taken; `msr.error` is written (1 = the guest gets #GP, for reserved
///   bits).
///
/// Returns `PAGENC_RESULT_OK`; `PAGENC_RESULT_GUEST_REJECTED` when the guest was answered with an
/// error (the VM goes on: just re-enter `KVM_RUN`); `PAGENC_RESULT_UNHANDLED_EXIT` for any other
/// exit, MSR or MSR exit reason, with `run` untouched (handle it yourself);
/// `PAGENC_RESULT_REENTRANT` / `PAGENC_RESULT_INTERNAL` when the tracker could not take it (the
/// guest was still answered with a failure; do not migrate on this tracker's list). Call it from
/// the vCPU thread that owns `run`, concurrently with any other call on `t`.
///
/// # Safety
/// `t` is NULL or a live tracker; `run` is NULL or a `struct kvm_run` (at least
/// `sizeof(struct kvm_run)` bytes) that no other thread touches during the call.
#[no_mangle]
pub unsafe extern "C" fn pagenc_handle_exit(
    t: *mut pagenc_tracker,
    run: *mut kvm_run,
) -> pagenc_result {
    ffi_boundary! {
        let t = try_ref!(t);
        let run = try_nonnull!(run, t);
        // SAFETY: the contract: `run` is a kvm_run exclusively ours for the call.
        let run = unsafe { &mut *run.as_ptr() };
        match handle_exit_detailed(&t.tracker, run) {
            Ok((ExitOutcome::Hypercall { rejected: false, .. }, _))
            | Ok((ExitOutcome::MsrRead { .. }, _))
            | Ok((ExitOutcome::MsrWrite { accepted: true }, _)) => pagenc_result::Ok,
            Ok((ExitOutcome::Hypercall { rejected: true, .. }, why))
            | Ok((ExitOutcome::MsrWrite { accepted: false }, why)) => match why {
                Some(e) => t.fail(TrackerError::Guest(e)),
                None => pagenc_result::GuestRejected,
            },
            Ok((ExitOutcome::NotHandled { exit_reason }, _)) => {
                let why = if exit_reason == KVM_EXIT_X86_RDMSR || exit_reason == KVM_EXIT_X86_WRMSR
                {
                    // SAFETY: an MSR exit reason: the kernel filled `msr`.
                    let msr = unsafe { &run.__bindgen_anon_1.msr };
                    NotHandled::Msr {
                        exit_reason,
                        index: msr.index,
                        reason: msr.reason,
                    }
                } else {
                    NotHandled::Exit { exit_reason }
                };
                t.fail(why)
            }
            Err(e) => t.fail(e),
        }
    }
}

/// Reads MSR `index` for the guest: MSR_KVM_MIGRATION_CONTROL's value into `*value`. Another
/// index gives `PAGENC_RESULT_UNHANDLED_EXIT` (not pagenc's MSR). `*value` is written only on
/// success. Any thread.
///
/// # Safety
/// `t` is NULL or a live tracker; `value` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn pagenc_msr_read(
    t: *mut pagenc_tracker,
    index: u32,
    value: *mut u64,
) -> pagenc_result {
    ffi_boundary! {
        let t = try_ref!(t);
        let value = try_nonnull!(value, t);
        match t.tracker.rdmsr(index) {
            Ok(v) => {
                // SAFETY: the contract: `value` is writable.
                unsafe { value.as_ptr().write(v) };
                pagenc_result::Ok
            }
            Err(e) => t.fail(e),
        }
    }
}

/// Writes MSR `index` for the guest: 0 or KVM_MIGRATION_READY (1) to MSR_KVM_MIGRATION_CONTROL
/// is taken (the readiness callback hears a change); any other bit gives
/// `PAGENC_RESULT_GUEST_REJECTED` (inject #GP; nothing changes); another index gives
/// `PAGENC_RESULT_UNHANDLED_EXIT`. Any thread.
///
/// # Safety
/// `t` is NULL or a live tracker.
#[no_mangle]
pub unsafe extern "C" fn pagenc_msr_write(
    t: *mut pagenc_tracker,
    index: u32,
    value: u64,
) -> pagenc_result {
    ffi_boundary! {
        let t = try_ref!(t);
        match t.tracker.wrmsr(index, value) {
            Ok(()) => pagenc_result::Ok,
            Err(e) => t.fail(e),
        }
    }
}

/// Whether the page holding `gpa` (any byte address) is encrypted now. Pages outside guest RAM
/// are not tracked and read as encrypted. Returns false, which is also "shared", when `t` is
/// NULL, when called from one of `t`'s callbacks, or on an internal error; use
/// `pagenc_cursor_query` to tell those apart. Any thread; O(log n) and takes the tracker's lock:
/// for a page-by-page walk use a cursor.
///
/// # Safety
/// `t` is NULL or a live tracker.
#[no_mangle]
pub unsafe extern "C" fn pagenc_is_encrypted(t: *const pagenc_tracker, gpa: u64) -> bool {
    ffi_boundary! {
        let t = try_ref!(t);
        match t.tracker.state(gpa) {
            Ok(s) => s.is_encrypted(),
            Err(e) => {
                t.fail(e);
                false
            }
        }
    }
}

/// Whether the guest has declared itself ready for migration (wrote KVM_MIGRATION_READY to
/// MSR_KVM_MIGRATION_CONTROL, and not 0 since). False when `t` is NULL. Any thread, lock-free.
///
/// # Safety
/// `t` is NULL or a live tracker.
#[no_mangle]
pub unsafe extern "C" fn pagenc_is_ready(t: *const pagenc_tracker) -> bool {
    ffi_boundary! {
        try_ref!(t).tracker.is_ready()
    }
}

/// Fills `*out` with the tracker's statistics (written only on success). O(shared ranges). Any
/// thread.
///
/// # Safety
/// `t` is NULL or a live tracker; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn pagenc_tracker_stats(
    t: *const pagenc_tracker,
    out: *mut pagenc_stats,
) -> pagenc_result {
    ffi_boundary! {
        let t = try_ref!(t);
        let out = try_nonnull!(out, t);
        match t.tracker.stats() {
            Ok(s) => {
                // SAFETY: the contract: `out` is writable.
                unsafe { out.as_ptr().write(s.into()) };
                pagenc_result::Ok
            }
            Err(e) => t.fail(e),
        }
    }
}

/// Installs the change callback, replacing any earlier one; a NULL `cb` removes it. After every
/// effective change (hypercall, reset) `cb(opaque, gpa, npages, encrypted)` is called once per
/// maximal range of pages whose state really flipped, in ascending order; a call that changes
/// nothing calls nothing. A layout change and `pagenc_load` call nothing.
///
/// The callback runs on the thread that made the change, with the tracker's lock held, so
/// callbacks come in the order of the changes, one at a time. It must return quickly and must
/// not call functions on `t`: those that change `t` or take its lock fail with
/// `PAGENC_RESULT_REENTRANT` instead of deadlocking (the lock-free `pagenc_is_ready` and
/// `pagenc_msr_read` answer, and cursors may answer from their cache). It may run on any
/// thread that calls into `t`, until this function or `pagenc_tracker_free` replaces or drops
/// it: `opaque` must stay valid and be safe to use from those threads. pagenc never reads
/// `opaque`. Any thread.
///
/// # Safety
/// `t` is NULL or a live tracker; `cb`, when not NULL, is safe to call with `opaque` as above.
#[no_mangle]
pub unsafe extern "C" fn pagenc_tracker_set_change_callback(
    t: *mut pagenc_tracker,
    cb: pagenc_change_fn,
    opaque: *mut c_void,
) -> pagenc_result {
    ffi_boundary! {
        let t = try_ref!(t);
        let cb = cb.map(|f| {
            let c: CCallback<ChangeFn> = CCallback { f, opaque };
            Box::new(move |r, s| c.call(r, s)) as ChangeCallback
        });
        match t.tracker.set_change_callback(cb) {
            Ok(()) => pagenc_result::Ok,
            Err(e) => t.fail(e),
        }
    }
}

/// Installs the readiness callback, replacing any earlier one; a NULL `cb` removes it.
/// `cb(opaque, ready, msr_value)` is called after every change of MSR_KVM_MIGRATION_CONTROL's
/// value (guest write, reset, `pagenc_load`), so a VMM can add and remove its migration blocker.
/// The same rules as for the change callback apply (lock held, no calls into `t`, any thread,
/// `opaque` the caller's business).
///
/// # Safety
/// `t` is NULL or a live tracker; `cb`, when not NULL, is safe to call with `opaque` as above.
#[no_mangle]
pub unsafe extern "C" fn pagenc_tracker_set_readiness_callback(
    t: *mut pagenc_tracker,
    cb: pagenc_readiness_fn,
    opaque: *mut c_void,
) -> pagenc_result {
    ffi_boundary! {
        let t = try_ref!(t);
        let cb = cb.map(|f| {
            let c: CCallback<ReadinessFn> = CCallback { f, opaque };
            Box::new(move |ready, value| c.call(ready, value)) as ReadinessCallback
        });
        match t.tracker.set_readiness_callback(cb) {
            Ok(()) => pagenc_result::Ok,
            Err(e) => t.fail(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffi::handle::try_ref;

    fn q35() -> [pagenc_ram_range; 2] {
        [
            pagenc_ram_range {
                gpa: 0,
                size: 2 << 30,
            },
            pagenc_ram_range {
                gpa: 4 << 30,
                size: 2 << 30,
            },
        ]
    }

    /// A panic inside pagenc (here: a Rust change callback that panics while the tracker's lock
    /// is held) must come back as PAGENC_RESULT_INTERNAL, the guest must still get an error in
    /// hc_ret, and the tracker must refuse to go on rather than serve a half-updated map.
    #[test]
    fn a_panic_is_caught_and_poisons_the_tracker() {
        let ram = q35();
        let mut t: *mut pagenc_tracker = std::ptr::null_mut();
        // SAFETY: `ram` holds 2 ranges; `t` is writable.
        let rc = unsafe { pagenc_tracker_new(ram.as_ptr(), 2, &mut t) };
        assert_eq!(rc, pagenc_result::Ok);
        // SAFETY: `t` is the live tracker just made.
        let h = unsafe { try_ref(t) }.expect("a tracker");
        h.tracker
            .set_change_callback(Some(Box::new(|_, _| panic!("deliberate test panic"))))
            .expect("set callback");

        let mut ret = 0;
        // SAFETY: `t` is live, `ret` writable.
        let rc = unsafe { pagenc_map_gpa_range(t, 0x1000, 1, 0, &mut ret) };
        assert_eq!(rc, pagenc_result::Internal);
        assert_eq!(ret, host_failure_ret());

        // Every later call that needs the map fails instead of reading it, on this thread
        // and on others.
        let t_addr = t as usize;
        let check = move || {
            let t = t_addr as *mut pagenc_tracker;
            let mut ret = 0;
            // SAFETY: `t` is live until freed at the end of the test.
            let rc = unsafe { pagenc_map_gpa_range(t, 0x2000, 1, 0, &mut ret) };
            assert_eq!(rc, pagenc_result::Internal);
            assert_eq!(ret, host_failure_ret());
            let mut s = pagenc_stats::default();
            // SAFETY: as above; `s` writable.
            let rc = unsafe { pagenc_tracker_stats(t, &mut s) };
            assert_eq!(rc, pagenc_result::Internal);
            let mut msg = [0u8; 256];
            // SAFETY: as above; `msg` holds 256 bytes.
            let n = unsafe { crate::ffi::pagenc_last_error(t, msg.as_mut_ptr().cast(), 256) };
            let msg = String::from_utf8_lossy(&msg[..n.min(255)]);
            assert!(msg.contains("unusable"), "{msg}");
        };
        check();
        std::thread::spawn(check)
            .join()
            .expect("the checking thread");
        // SAFETY: `t` is live and not used again.
        unsafe { pagenc_tracker_free(t) };
    }
}
