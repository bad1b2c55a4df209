//! KVM-facing code: ABI constants, the `struct kvm_run` adapter and VM-fd set-up helpers.

pub mod consts;
pub mod run;
pub mod vm;

pub use run::{handle_exit, handle_exit_detailed, ExitError, ExitOutcome};
pub use vm::{
    cpuid_feature_bits, enable_exit_hypercall, enable_user_space_msr, set_migration_control_filter,
    supported_exit_hypercall_mask, VmError,
};
