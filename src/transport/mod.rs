//! The encrypted-page transport (issue 14, library side): an SEV guest's encrypted pages go
//! through the SEV firmware (`KVM_SEV_SEND_*` on the source, `KVM_SEV_RECEIVE_*` on the
//! destination), shared pages go as they are (that choice is the VMM's, from the page list).
//!
//! The rooms:
//! - [`sev_abi`]: command ids, argument structures (kvm-bindings), firmware status codes
//!   (`<linux/psp-sev.h>`), policy bits.
//! - [`encrypt_op`]: the ioctl-level entry point, the [`MemoryEncryptOp`] trait, and its real
//!   implementation on a VM fd ([`KvmVm`], never run on SEV hardware).
//! - [`simfw`]: the simulated SEV firmware behind the same trait (tests only, explicit opt-in).
//! - [`sev`]: the marshalling, [`SevTransport`]: session set-up on both sides, one page per
//!   SEND/RECEIVE_UPDATE_DATA, finish, cancel, the refusals.
//! - [`wire`]: the versioned, length-checked session record and page packet.
//! - [`verify`]: the keyed-mode check of a migration through the simulated firmware (every page
//!   equal to the source where shared, re-keyed where encrypted).
//! - [`error`]: what failed, named.
//!
//! docs/transport.md has the flow on real hardware, the wire format and why this is Rust.

pub mod encrypt_op;
pub mod error;
pub mod sev;
pub mod sev_abi;
pub mod simfw;
pub mod verify;
pub mod wire;

pub use encrypt_op::{KvmVm, MemoryEncryptOp};
pub use error::{PageCtx, Refusal, SevMode, TransportError};
pub use sev::{SendParams, SevTransport};
pub use simfw::{
    rekey_page, sim_amd_certs, GuestState, Memslot, SimConfig, SimError, SimFirmware, SimRole,
    SimStats, SIM_OPT_IN,
};
pub use verify::{Expected, Found, Mismatch, Report, Verifier, VerifyError};
pub use wire::{Packet, PacketPrefix, SessionRecord, WireError};
