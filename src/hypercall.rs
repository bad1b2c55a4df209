//! Validation of what the guest hands the VMM: `KVM_HC_MAP_GPA_RANGE` arguments and
//! `MSR_KVM_MIGRATION_CONTROL` values.
//!
//! KVM itself checks only that the GPA is page aligned, that npages is not 0 and that the gfn
//! range does not wrap; it never looks at the attributes. The guest is untrusted, so everything is
//! checked again here, and every rejection says what was wrong, with which value, and what is
//! allowed. Nothing in this module touches the map: a call is validated completely before any
//! state changes.

use std::fmt;

use crate::core::{PageRange, PageState, MAX_GFN, PAGE_SHIFT};
use crate::kvm::consts::{
    KVM_EINVAL, KVM_ENOSYS, KVM_HC_MAP_GPA_RANGE, KVM_MAP_GPA_RANGE_ENCRYPTED,
    KVM_MAP_GPA_RANGE_PAGE_SZ_1G, KVM_MAP_GPA_RANGE_PAGE_SZ_2M, KVM_MAP_GPA_RANGE_PAGE_SZ_4K,
    KVM_MIGRATION_READY,
};

/// Bits 3:0 of the attributes: the page-size hint.
const ATTR_PAGE_SIZE_MASK: u64 = 0xf;
/// Every attribute bit that has a meaning; bits 63:5 are reserved and must be zero.
const ATTR_VALID_MASK: u64 = ATTR_PAGE_SIZE_MASK | KVM_MAP_GPA_RANGE_ENCRYPTED as u64;
/// Every MSR_KVM_MIGRATION_CONTROL bit the guest may set.
const MSR_VALID_MASK: u64 = KVM_MIGRATION_READY as u64;

/// Why a hypercall or an MSR write was refused. The numeric values index the rejection
/// counters in [`crate::Stats`] and are part of the C ABI (`pagenc_reject_reason`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// The hypercall number is not `KVM_HC_MAP_GPA_RANGE`.
    UnknownHypercall = 0,
    /// The GPA is not 4 KiB aligned.
    Unaligned = 1,
    /// npages is 0.
    ZeroLength = 2,
    /// gfn + npages wraps or goes past the 52-bit guest physical address limit.
    OutOfRange = 3,
    /// An attribute bit in 63:5 is set.
    ReservedAttrs = 4,
    /// The page-size hint (bits 3:0) is not 0 (4K), 1 (2M) or 2 (1G).
    BadPageSizeHint = 5,
    /// A write to MSR_KVM_MIGRATION_CONTROL set a bit other than KVM_MIGRATION_READY.
    ReservedMsrBits = 6,
}

impl RejectReason {
    /// How many reasons there are (the length of the rejection counter array).
    pub const COUNT: usize = 7;

    /// All reasons, in counter order.
    pub const ALL: [RejectReason; Self::COUNT] = [
        RejectReason::UnknownHypercall,
        RejectReason::Unaligned,
        RejectReason::ZeroLength,
        RejectReason::OutOfRange,
        RejectReason::ReservedAttrs,
        RejectReason::BadPageSizeHint,
        RejectReason::ReservedMsrBits,
    ];

    /// A short name, as used in statistics output.
    pub fn name(self) -> &'static str {
        match self {
            RejectReason::UnknownHypercall => "unknown-hypercall",
            RejectReason::Unaligned => "unaligned",
            RejectReason::ZeroLength => "zero-length",
            RejectReason::OutOfRange => "out-of-range",
            RejectReason::ReservedAttrs => "reserved-attrs",
            RejectReason::BadPageSizeHint => "bad-page-size-hint",
            RejectReason::ReservedMsrBits => "reserved-msr-bits",
        }
    }
}

/// A refused hypercall or MSR write: the reason and the offending values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HypercallError {
    /// Why it was refused.
    pub reason: RejectReason,
    /// The hypercall number (or the MSR index for an MSR write).
    pub nr: u64,
    /// The first three hypercall arguments (or the MSR value in `args[0]`).
    pub args: [u64; 3],
}

impl HypercallError {
    /// The value the guest must find in RAX (`kvm_run.hypercall.ret`): a negative KVM error
    /// code, two's complement. KVM truncates it to 32 bits for a 32-bit guest.
    pub fn kvm_ret(&self) -> u64 {
        let code = match self.reason {
            RejectReason::UnknownHypercall => KVM_ENOSYS,
            _ => KVM_EINVAL,
        };
        (code as i64).wrapping_neg() as u64
    }
}

impl fmt::Display for HypercallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [gpa, npages, attrs] = self.args;
        match self.reason {
            RejectReason::UnknownHypercall => write!(
                f,
                "hypercall nr {} is not handled; only KVM_HC_MAP_GPA_RANGE ({}) is",
                self.nr, KVM_HC_MAP_GPA_RANGE
            ),
            RejectReason::Unaligned => write!(
                f,
                "MAP_GPA_RANGE gpa {gpa:#x} is not 4 KiB aligned (the low 12 bits must be 0)"
            ),
            RejectReason::ZeroLength => write!(
                f,
                "MAP_GPA_RANGE at gpa {gpa:#x} has npages 0; at least 1 page is required"
            ),
            RejectReason::OutOfRange => write!(
                f,
                "MAP_GPA_RANGE gpa {gpa:#x} + {npages} pages ends past the 52-bit guest physical \
                 address limit {:#x}",
                MAX_GFN << PAGE_SHIFT
            ),
            RejectReason::ReservedAttrs => write!(
                f,
                "MAP_GPA_RANGE attributes {attrs:#x} set reserved bits {:#x}; only bits 4:0 \
                 (page-size hint and encrypted) may be set",
                attrs & !ATTR_VALID_MASK
            ),
            RejectReason::BadPageSizeHint => write!(
                f,
                "MAP_GPA_RANGE attributes {attrs:#x} have page-size hint {}; allowed are 0 (4K), \
                 1 (2M) and 2 (1G)",
                attrs & ATTR_PAGE_SIZE_MASK
            ),
            RejectReason::ReservedMsrBits => write!(
                f,
                "MSR_KVM_MIGRATION_CONTROL write {gpa:#x} sets reserved bits {:#x}; only \
                 KVM_MIGRATION_READY ({:#x}) may be set",
                gpa & !MSR_VALID_MASK,
                MSR_VALID_MASK
            ),
        }
    }
}

impl std::error::Error for HypercallError {}

/// The page-size hint of a MAP_GPA_RANGE call. It is recorded for statistics only: Linux sends
/// the 4K hint even for 2M and 1G runs, so the hint never decides alignment or length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageSizeHint {
    /// 4 KiB.
    Size4K,
    /// 2 MiB.
    Size2M,
    /// 1 GiB.
    Size1G,
}

/// A validated MAP_GPA_RANGE request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapRequest {
    /// The guest pages, `[gfn, gfn + npages)`.
    pub range: PageRange,
    /// The state the guest asks for.
    pub state: PageState,
    /// The (advisory) page-size hint.
    pub hint: PageSizeHint,
}

/// Validates a `KVM_HC_MAP_GPA_RANGE` call; `nr` is checked too so that a VMM can hand over any
/// hypercall exit. On success nothing has been changed yet; the caller applies the request.
pub fn validate_map_gpa_range(
    nr: u64,
    gpa: u64,
    npages: u64,
    attrs: u64,
) -> Result<MapRequest, HypercallError> {
    let fail = |reason| HypercallError {
        reason,
        nr,
        args: [gpa, npages, attrs],
    };
    if nr != KVM_HC_MAP_GPA_RANGE as u64 {
        return Err(fail(RejectReason::UnknownHypercall));
    }
    if attrs & !ATTR_VALID_MASK != 0 {
        return Err(fail(RejectReason::ReservedAttrs));
    }
    let hint = match attrs & ATTR_PAGE_SIZE_MASK {
        x if x == KVM_MAP_GPA_RANGE_PAGE_SZ_4K as u64 => PageSizeHint::Size4K,
        x if x == KVM_MAP_GPA_RANGE_PAGE_SZ_2M as u64 => PageSizeHint::Size2M,
        x if x == KVM_MAP_GPA_RANGE_PAGE_SZ_1G as u64 => PageSizeHint::Size1G,
        _ => return Err(fail(RejectReason::BadPageSizeHint)),
    };
    if gpa & ((1 << PAGE_SHIFT) - 1) != 0 {
        return Err(fail(RejectReason::Unaligned));
    }
    if npages == 0 {
        return Err(fail(RejectReason::ZeroLength));
    }
    let gfn = gpa >> PAGE_SHIFT;
    let range = match gfn.checked_add(npages) {
        Some(end) if end <= MAX_GFN => PageRange { start: gfn, end },
        _ => return Err(fail(RejectReason::OutOfRange)),
    };
    let state = if attrs & KVM_MAP_GPA_RANGE_ENCRYPTED as u64 != 0 {
        PageState::Encrypted
    } else {
        PageState::Shared
    };
    Ok(MapRequest { range, state, hint })
}

/// Validates a guest write to MSR_KVM_MIGRATION_CONTROL: 0 and KVM_MIGRATION_READY are taken,
/// any other bit is refused (the VMM then injects #GP).
pub fn validate_migration_control(index: u32, value: u64) -> Result<u64, HypercallError> {
    if value & !MSR_VALID_MASK != 0 {
        return Err(HypercallError {
            reason: RejectReason::ReservedMsrBits,
            nr: index as u64,
            args: [value, 0, 0],
        });
    }
    Ok(value)
}
