//! Why a transport call failed. Every message says what was attempted, with which value, and
//! what is allowed; a firmware failure names the command and the firmware's status code.

use std::fmt;

use nix::errno::Errno;

use super::sev_abi::{policy, policy_names, SevCmd, SevStatus};
use super::wire::WireError;

/// Which guest the transport is asked to move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SevMode {
    /// Plain SEV: memory encrypted, register state not. The only mode upstream KVM can migrate.
    Sev,
    /// SEV-ES: the register state (VMSA) is encrypted too.
    SevEs,
    /// SEV-SNP.
    SevSnp,
}

/// A configuration the transport refuses before it calls the firmware.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The guest's policy forbids sending it (NOSEND, bit 3).
    NoSend {
        /// The policy.
        policy: u32,
    },
    /// An SEV-ES guest (mode, or policy bit 2 ES).
    SevEs {
        /// The policy.
        policy: u32,
    },
    /// An SEV-SNP guest.
    Snp,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Refusal::NoSend { policy: p } => write!(
                f,
                "the guest's SEV policy {p:#x} ({}) has NOSEND (bit 3, {:#x}) set: the guest \
                 owner forbade migrating it",
                policy_names(p),
                policy::NOSEND
            ),
            Refusal::SevEs { policy: p } => write!(
                f,
                "SEV-ES guests cannot be migrated (policy {p:#x}, {}): upstream KVM does not \
                 implement KVM_SEV_SEND_UPDATE_VMSA/RECEIVE_UPDATE_VMSA, so the encrypted \
                 register state (VMSA) cannot be moved",
                policy_names(p)
            ),
            Refusal::Snp => write!(
                f,
                "SEV-SNP guests cannot be migrated with KVM_SEV_SEND_*: SNP has no SEND/RECEIVE \
                 commands (its migration needs an in-guest migration agent)"
            ),
        }
    }
}

/// Where a page command came from, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageCtx {
    /// The page's guest physical address.
    pub gpa: u64,
    /// Its host address.
    pub host: u64,
}

/// A failed transport call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportError {
    /// The firmware refused or failed the command: the ioctl returned an error and
    /// `kvm_sev_cmd.error` holds the firmware's status.
    Firmware {
        /// The command.
        cmd: SevCmd,
        /// The firmware's status.
        status: SevStatus,
        /// The ioctl's errno (EIO from the kernel).
        errno: Errno,
        /// "KVM" or "simulated SEV firmware".
        via: &'static str,
        /// The page, for SEND/RECEIVE_UPDATE_DATA.
        page: Option<PageCtx>,
    },
    /// The ioctl failed before the firmware ran (`kvm_sev_cmd.error` 0): EINVAL for arguments
    /// the kernel refuses, EFAULT for an address outside guest RAM, ENOTTY for a non-SEV VM.
    Kernel {
        /// The command.
        cmd: SevCmd,
        /// The errno.
        errno: Errno,
        /// "KVM" or "simulated SEV firmware".
        via: &'static str,
        /// The page, for SEND/RECEIVE_UPDATE_DATA.
        page: Option<PageCtx>,
    },
    /// A length query's answer is outside what the transport accepts.
    LengthAnswer {
        /// The command queried.
        cmd: SevCmd,
        /// The length's name.
        what: &'static str,
        /// The answer.
        value: u64,
        /// The largest value accepted.
        max: u64,
    },
    /// Refused before calling the firmware.
    Refused(Refusal),
    /// Called in the wrong order (e.g. a page before setup, setup twice).
    State {
        /// The call.
        op: &'static str,
        /// The transport's phase.
        phase: &'static str,
        /// The phase the call needs.
        needs: &'static str,
    },
    /// Bytes from the stream (session record, packet) or a caller's blob refused.
    Wire(WireError),
    /// The firmware's view of the policy differs from the one configured.
    PolicyMismatch {
        /// What the VMM configured.
        configured: u32,
        /// What the firmware (or the session record) says.
        firmware: u32,
    },
    /// A packet is for another page than the one it is loaded into.
    GpaMismatch {
        /// The packet's gpa.
        packet: u64,
        /// The gpa it was delivered to.
        expected: u64,
    },
    /// A packet's header length differs from the session's.
    HdrLenMismatch {
        /// The packet's header length.
        packet: u32,
        /// The session record's.
        session: u32,
    },
    /// A gpa given to send a page is not a 4 KiB aligned address below 2^52.
    Gpa {
        /// The address.
        gpa: u64,
    },
    /// The caller's output buffer is too small.
    BufferTooSmall {
        /// Bytes needed.
        needed: usize,
        /// Bytes given.
        len: usize,
    },
}

impl From<WireError> for TransportError {
    fn from(e: WireError) -> Self {
        TransportError::Wire(e)
    }
}

impl From<Refusal> for TransportError {
    fn from(e: Refusal) -> Self {
        TransportError::Refused(e)
    }
}

fn page_suffix(page: &Option<PageCtx>) -> String {
    match page {
        Some(p) => format!(" for the page at gpa {:#x} (host {:#x})", p.gpa, p.host),
        None => String::new(),
    }
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransportError::Firmware {
                cmd,
                status,
                errno,
                via,
                page,
            } => write!(
                f,
                "{cmd} failed{}: the firmware returned {status} ({via}, ioctl {errno:?})",
                page_suffix(page)
            ),
            TransportError::Kernel {
                cmd,
                errno,
                via,
                page,
            } => write!(
                f,
                "{cmd} failed{} before reaching the firmware: {errno:?} {} ({}, {via})",
                page_suffix(page),
                errno.desc(),
                *errno as i32
            ),
            TransportError::LengthAnswer {
                cmd,
                what,
                value,
                max,
            } => write!(
                f,
                "the length query of {cmd} answered {what} = {value}; it must be between 1 and \
                 {max}"
            ),
            TransportError::Refused(r) => r.fmt(f),
            TransportError::State { op, phase, needs } => write!(
                f,
                "{op} called while the transport is {phase}; it needs {needs}"
            ),
            TransportError::Wire(e) => e.fmt(f),
            TransportError::PolicyMismatch {
                configured,
                firmware,
            } => write!(
                f,
                "guest policy mismatch: configured {configured:#x} ({}), but the firmware/session \
                 says {firmware:#x} ({})",
                policy_names(*configured),
                policy_names(*firmware)
            ),
            TransportError::GpaMismatch { packet, expected } => write!(
                f,
                "packet for gpa {packet:#x} delivered to gpa {expected:#x}; a packet must be \
                 loaded where it was sent from"
            ),
            TransportError::HdrLenMismatch { packet, session } => write!(
                f,
                "packet header length {packet} differs from the session's {session}"
            ),
            TransportError::Gpa { gpa } => {
                write!(f, "gpa {gpa:#x} is not a 4 KiB aligned address below 2^52")
            }
            TransportError::BufferTooSmall { needed, len } => write!(
                f,
                "output buffer of {len} bytes is too small; {needed} bytes are needed"
            ),
        }
    }
}

impl std::error::Error for TransportError {}
