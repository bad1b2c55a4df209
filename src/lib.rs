//! pagenc: the page-encryption list of an AMD SEV guest, kept for live migration.
//!
//! An SEV guest's memory is encrypted by default. The guest turns pages *shared* (and back) and
//! announces each change with the `KVM_HC_MAP_GPA_RANGE` hypercall, which KVM hands to the VMM as
//! `KVM_EXIT_HYPERCALL`; it says it may be migrated by writing `MSR_KVM_MIGRATION_CONTROL`.
//! pagenc keeps that list for the VMM and gives it back to the VMM's RAM migration code.
//!
//! The crate is split into rooms that each do one job:
//! - [`core`]: the page map itself (coalesced shared ranges in chunked containers). Pure data
//!   structure: no FFI, no KVM, no `unsafe`.
//! - [`hypercall`]: validation of the guest's hypercall arguments and MSR values, with the KVM
//!   error codes they map to.
//! - [`tracker`]: the thread-safe handle a VMM holds: the map behind a lock, readiness, the
//!   callbacks, statistics, the cursor and the run iterator.
//! - [`stream`]: the versioned migration-stream encoding of the list.
//! - [`kvm`]: the `struct kvm_run` adapter and VM-fd set-up helpers (ioctls).
//! - [`ffi`]: the C ABI (`include/pagenc.h`), a thin layer over the above.

#![deny(missing_debug_implementations)]

pub mod core;
pub mod ffi;
pub mod hypercall;
pub mod kvm;
pub mod stream;
pub mod tracker;

pub use crate::core::{Layout, LayoutError, PageRange, PageState, RamRange, Run};
pub use crate::hypercall::{HypercallError, RejectReason};
pub use crate::tracker::{Cursor, Runs, Stats, Tracker};
