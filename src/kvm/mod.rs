//! KVM-facing code: ABI constants, the `struct kvm_run` adapter and VM-fd set-up helpers.

pub mod consts;
