//! The `struct kvm_run` adapter: hands the exits pagenc owns to a [`Tracker`] and writes the
//! answer back into the run, so that the VMM only has to call `KVM_RUN` again.
//!
//! Exits handled (the layouts are kvm-bindings' `kvm_run`, as mmapped from the vCPU fd):
//! - `KVM_EXIT_HYPERCALL`: `nr`, `args[0..3]` and `flags` are read; the answer is **always**
//!   written to `hypercall.ret` (0, or `-KVM_EINVAL` / `-KVM_ENOSYS` for a refused call), since
//!   KVM puts `ret` in the guest's RAX when the vCPU runs again. KVM pre-sets `ret` to 0, so a
//!   VMM that forgets to write it tells the guest every call succeeded.
//! - `KVM_EXIT_X86_RDMSR` / `KVM_EXIT_X86_WRMSR` with reason `KVM_MSR_EXIT_REASON_FILTER` and
//!   index `MSR_KVM_MIGRATION_CONTROL`: a read fills `msr.data`; a write of 0 or
//!   `KVM_MIGRATION_READY` is taken; `msr.error` is written either way (1 makes KVM inject #GP,
//!   which is what the guest gets for a write with reserved bits).
//!
//! Anything else (another exit reason, another MSR, an MSR exit for another reason) comes back
//! as [`ExitOutcome::NotHandled`] with the run left untouched, for the VMM's own handling.
//!
//! A VMM that has enabled other hypercalls in `KVM_CAP_EXIT_HYPERCALL` must dispatch those
//! itself before calling [`handle_exit`]: pagenc answers every hypercall number other than
//! `KVM_HC_MAP_GPA_RANGE` with `-KVM_ENOSYS`.
//!
//! The VMM must complete the exit (`KVM_RUN` again) before it saves the vCPU's state for
//! migration: the guest's RIP is advanced past VMMCALL/WRMSR only then.

use std::fmt;

use kvm_bindings::kvm_run;

use crate::hypercall::HypercallError;
use crate::kvm::consts::{
    KVM_EINVAL, KVM_EXIT_HYPERCALL, KVM_EXIT_HYPERCALL_LONG_MODE, KVM_EXIT_X86_RDMSR,
    KVM_EXIT_X86_WRMSR, KVM_MSR_EXIT_REASON_FILTER, MSR_KVM_MIGRATION_CONTROL,
};
use crate::tracker::{Tracker, TrackerError};

/// `msr.error` value that makes KVM inject #GP into the guest.
const MSR_ERROR_GP: u8 = 1;

/// What [`handle_exit`] did with an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitOutcome {
    /// A `KVM_EXIT_HYPERCALL`; `ret` has been written to `hypercall.ret`.
    Hypercall {
        /// The value written to `hypercall.ret` (what the guest finds in RAX; KVM truncates it
        /// to 32 bits for a 32-bit guest): 0, or a negative `KVM_E*` code in two's complement.
        ret: u64,
        /// Whether the call was refused (`ret` != 0); nothing changed then.
        rejected: bool,
    },
    /// A read of `MSR_KVM_MIGRATION_CONTROL`; `value` has been written to `msr.data`.
    MsrRead {
        /// The MSR's value.
        value: u64,
    },
    /// A write of `MSR_KVM_MIGRATION_CONTROL`.
    MsrWrite {
        /// True if taken (`msr.error` = 0); false if refused for reserved bits (`msr.error` = 1:
        /// the guest gets #GP, the MSR keeps its value).
        accepted: bool,
    },
    /// Not an exit pagenc handles; the run is untouched.
    NotHandled {
        /// `kvm_run.exit_reason`.
        exit_reason: u32,
    },
}

/// The tracker could not take an exit that was pagenc's (it was called from one of its own
/// callbacks, or an earlier panic left it unusable). The run has still been answered with a
/// failure (`hypercall.ret` = `-KVM_EINVAL`, or `msr.error` = 1), so that a VMM that resumes the
/// vCPU anyway does not tell the guest an update was recorded; but the list is no longer
/// trustworthy, and the VMM must not migrate the guest on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitError {
    /// `kvm_run.exit_reason` of the exit.
    pub exit_reason: u32,
    /// What the tracker said.
    pub error: TrackerError,
}

impl fmt::Display for ExitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "kvm_run exit_reason {} ({}) could not be handled: {}",
            self.exit_reason,
            exit_reason_name(self.exit_reason),
            self.error
        )
    }
}

impl std::error::Error for ExitError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// The name of the exit reasons this module knows, for messages.
pub fn exit_reason_name(exit_reason: u32) -> &'static str {
    match exit_reason {
        KVM_EXIT_HYPERCALL => "KVM_EXIT_HYPERCALL",
        KVM_EXIT_X86_RDMSR => "KVM_EXIT_X86_RDMSR",
        KVM_EXIT_X86_WRMSR => "KVM_EXIT_X86_WRMSR",
        _ => "not handled by pagenc",
    }
}

/// The `hypercall.ret` written when the tracker failed internally (see [`ExitError`]).
fn internal_error_ret() -> u64 {
    (KVM_EINVAL as i64).wrapping_neg() as u64
}

/// Handles one vCPU exit for `tracker`, reading and writing `run` (see the module documentation
/// for what is handled and what is written). Call it after every `KVM_RUN` that returned 0, and
/// handle the exit yourself when it returns [`ExitOutcome::NotHandled`].
pub fn handle_exit(tracker: &Tracker, run: &mut kvm_run) -> Result<ExitOutcome, ExitError> {
    handle_exit_detailed(tracker, run).map(|(outcome, _)| outcome)
}

/// [`handle_exit`], also returning why the guest's call or MSR write was refused (what was
/// wrong, with which value) when the outcome is a rejection (`Hypercall { rejected: true }` or
/// `MsrWrite { accepted: false }`); `None` otherwise. For a VMM (or the C layer) that reports
/// the refusal; the guest has been answered either way.
pub fn handle_exit_detailed(
    tracker: &Tracker,
    run: &mut kvm_run,
) -> Result<(ExitOutcome, Option<HypercallError>), ExitError> {
    let exit_reason = run.exit_reason;
    match exit_reason {
        KVM_EXIT_HYPERCALL => handle_hypercall(tracker, run),
        KVM_EXIT_X86_RDMSR | KVM_EXIT_X86_WRMSR => handle_msr(tracker, run),
        _ => Ok((ExitOutcome::NotHandled { exit_reason }, None)),
    }
}

type Handled = Result<(ExitOutcome, Option<HypercallError>), ExitError>;

fn handle_hypercall(tracker: &Tracker, run: &mut kvm_run) -> Handled {
    // SAFETY: exit_reason told us which member the kernel filled: KVM_EXIT_HYPERCALL means
    // `hypercall`. Every bit pattern is a valid value of it (integers and an integer union).
    let hc = unsafe { &mut run.__bindgen_anon_1.hypercall };
    // SAFETY: exit_reason told us which member the kernel filled; `flags` (u64) overlays the old
    // `longmode` (u32) and both are plain integers. Kernels before 6.5 wrote only `longmode`,
    // whose value is bit 0 of `flags` (the upper half, then `pad`, is ignored).
    let flags = unsafe { hc.__bindgen_anon_1.flags };
    let long_mode = flags & KVM_EXIT_HYPERCALL_LONG_MODE != 0;
    let mut nr = hc.nr;
    let mut args = [hc.args[0], hc.args[1], hc.args[2]];
    if !long_mode {
        // As KVM does for a 32-bit guest before it exits (so a no-op for a run KVM filled): the
        // guest passed 32-bit registers.
        nr &= 0xffff_ffff;
        for a in &mut args {
            *a &= 0xffff_ffff;
        }
    }
    let (ret, result) = match tracker.handle_hypercall(nr, args) {
        Ok(_) => (
            0,
            Ok((
                ExitOutcome::Hypercall {
                    ret: 0,
                    rejected: false,
                },
                None,
            )),
        ),
        Err(TrackerError::Guest(e)) => {
            let ret = e.kvm_ret();
            (
                ret,
                Ok((
                    ExitOutcome::Hypercall {
                        ret,
                        rejected: true,
                    },
                    Some(e),
                )),
            )
        }
        Err(error) => (
            internal_error_ret(),
            Err(ExitError {
                exit_reason: KVM_EXIT_HYPERCALL,
                error,
            }),
        ),
    };
    hc.ret = ret;
    result
}

fn handle_msr(tracker: &Tracker, run: &mut kvm_run) -> Handled {
    let exit_reason = run.exit_reason;
    // SAFETY: exit_reason told us which member the kernel filled: KVM_EXIT_X86_RDMSR and
    // KVM_EXIT_X86_WRMSR both mean `msr`. Every bit pattern is a valid value of it (integers).
    let msr = unsafe { &mut run.__bindgen_anon_1.msr };
    if msr.reason != KVM_MSR_EXIT_REASON_FILTER || msr.index != MSR_KVM_MIGRATION_CONTROL {
        // Not an exit pagenc's filter made: the VMM's own MSR handling (e.g. an unknown MSR it
        // emulates) owns it.
        return Ok((ExitOutcome::NotHandled { exit_reason }, None));
    }
    let fail = |error| ExitError { exit_reason, error };
    if exit_reason == KVM_EXIT_X86_RDMSR {
        match tracker.rdmsr(msr.index) {
            Ok(value) => {
                msr.data = value;
                msr.error = 0;
                Ok((ExitOutcome::MsrRead { value }, None))
            }
            Err(TrackerError::NotOurMsr { .. }) => {
                Ok((ExitOutcome::NotHandled { exit_reason }, None))
            }
            Err(error) => {
                msr.error = MSR_ERROR_GP;
                Err(fail(error))
            }
        }
    } else {
        match tracker.wrmsr(msr.index, msr.data) {
            Ok(()) => {
                msr.error = 0;
                Ok((ExitOutcome::MsrWrite { accepted: true }, None))
            }
            Err(TrackerError::Guest(e)) => {
                msr.error = MSR_ERROR_GP;
                Ok((ExitOutcome::MsrWrite { accepted: false }, Some(e)))
            }
            Err(TrackerError::NotOurMsr { .. }) => {
                Ok((ExitOutcome::NotHandled { exit_reason }, None))
            }
            Err(error) => {
                msr.error = MSR_ERROR_GP;
                Err(fail(error))
            }
        }
    }
}
