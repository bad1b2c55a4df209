//! The SEV ABI the transport speaks: `KVM_MEMORY_ENCRYPT_OP` command ids and argument structures
//! (kvm-bindings, the kernel's uapi), firmware status codes (`<linux/psp-sev.h>` through bindgen,
//! see build.rs) and the guest policy bits (the SEV API specification; no uapi header has them).

#![allow(non_upper_case_globals, non_camel_case_types, dead_code, missing_docs)]

use std::fmt;

mod generated {
    include!(concat!(env!("OUT_DIR"), "/sev_status.rs"));
}

pub use kvm_bindings::{
    kvm_sev_cmd, kvm_sev_receive_start, kvm_sev_receive_update_data, kvm_sev_send_start,
    kvm_sev_send_update_data,
};

/// The `KVM_MEMORY_ENCRYPT_OP` command ids the transport uses (`enum sev_cmd_id`).
pub mod cmd {
    pub use kvm_bindings::{
        sev_cmd_id_KVM_SEV_RECEIVE_FINISH as RECEIVE_FINISH,
        sev_cmd_id_KVM_SEV_RECEIVE_START as RECEIVE_START,
        sev_cmd_id_KVM_SEV_RECEIVE_UPDATE_DATA as RECEIVE_UPDATE_DATA,
        sev_cmd_id_KVM_SEV_SEND_CANCEL as SEND_CANCEL,
        sev_cmd_id_KVM_SEV_SEND_FINISH as SEND_FINISH, sev_cmd_id_KVM_SEV_SEND_START as SEND_START,
        sev_cmd_id_KVM_SEV_SEND_UPDATE_DATA as SEND_UPDATE_DATA,
    };
}

/// The firmware status codes (`SEV_RET_*`), as the kernel copies them into `kvm_sev_cmd.error`.
pub mod status {
    use super::generated as g;

    pub const SUCCESS: u32 = g::SEV_RET_SUCCESS as u32;
    pub const INVALID_PLATFORM_STATE: u32 = g::SEV_RET_INVALID_PLATFORM_STATE as u32;
    pub const INVALID_GUEST_STATE: u32 = g::SEV_RET_INVALID_GUEST_STATE as u32;
    pub const INVALID_CONFIG: u32 = g::SEV_RET_INAVLID_CONFIG as u32;
    pub const INVALID_LEN: u32 = g::SEV_RET_INVALID_LEN as u32;
    pub const ALREADY_OWNED: u32 = g::SEV_RET_ALREADY_OWNED as u32;
    pub const INVALID_CERTIFICATE: u32 = g::SEV_RET_INVALID_CERTIFICATE as u32;
    pub const POLICY_FAILURE: u32 = g::SEV_RET_POLICY_FAILURE as u32;
    pub const INACTIVE: u32 = g::SEV_RET_INACTIVE as u32;
    pub const INVALID_ADDRESS: u32 = g::SEV_RET_INVALID_ADDRESS as u32;
    pub const BAD_SIGNATURE: u32 = g::SEV_RET_BAD_SIGNATURE as u32;
    pub const BAD_MEASUREMENT: u32 = g::SEV_RET_BAD_MEASUREMENT as u32;
    pub const ASID_OWNED: u32 = g::SEV_RET_ASID_OWNED as u32;
    pub const INVALID_ASID: u32 = g::SEV_RET_INVALID_ASID as u32;
    pub const WBINVD_REQUIRED: u32 = g::SEV_RET_WBINVD_REQUIRED as u32;
    pub const DFFLUSH_REQUIRED: u32 = g::SEV_RET_DFFLUSH_REQUIRED as u32;
    pub const INVALID_GUEST: u32 = g::SEV_RET_INVALID_GUEST as u32;
    pub const INVALID_COMMAND: u32 = g::SEV_RET_INVALID_COMMAND as u32;
    pub const ACTIVE: u32 = g::SEV_RET_ACTIVE as u32;
    pub const HWSEV_RET_PLATFORM: u32 = g::SEV_RET_HWSEV_RET_PLATFORM as u32;
    pub const HWSEV_RET_UNSAFE: u32 = g::SEV_RET_HWSEV_RET_UNSAFE as u32;
    pub const UNSUPPORTED: u32 = g::SEV_RET_UNSUPPORTED as u32;
    pub const INVALID_PARAM: u32 = g::SEV_RET_INVALID_PARAM as u32;
    pub const RESOURCE_LIMIT: u32 = g::SEV_RET_RESOURCE_LIMIT as u32;
    pub const SECURE_DATA_INVALID: u32 = g::SEV_RET_SECURE_DATA_INVALID as u32;
    /// One past the last code this header knows.
    pub const MAX: u32 = g::SEV_RET_MAX as u32;
}

/// SEV guest policy bits (SEV API specification, "Guest Policy"): bit 0 NODBG, 1 NOKS, 2 ES,
/// 3 NOSEND, 4 DOMAIN, 5 SEV, 23:16 API_MAJOR, 31:24 API_MINOR. The kernel headers do not define
/// them (QEMU's `target/i386/sev.h` has the same `SEV_POLICY_*` values), so they are written here.
pub mod policy {
    /// Debugging of the guest is disallowed.
    pub const NODBG: u32 = 1 << 0;
    /// Sharing keys with other guests is disallowed.
    pub const NOKS: u32 = 1 << 1;
    /// SEV-ES is required (the guest's register state is encrypted).
    pub const ES: u32 = 1 << 2;
    /// Sending the guest to another platform is disallowed.
    pub const NOSEND: u32 = 1 << 3;
    /// The guest may only be sent to platforms in the same domain.
    pub const DOMAIN: u32 = 1 << 4;
    /// The guest may only be sent to platforms that support SEV.
    pub const SEV: u32 = 1 << 5;
}

/// The largest blob the kernel copies to the firmware (`SEV_FW_BLOB_MAX_SIZE`, 16 KiB, in the
/// kernel's private `include/linux/psp-sev.h`): certificates, the session, packet headers.
pub const FW_BLOB_MAX: u32 = 16 * 1024;

/// The page size the kernel pins for SEND/RECEIVE_UPDATE_DATA (`PAGE_SIZE`): one page per call.
pub const PAGE_SIZE: u32 = 4096;

/// A `KVM_MEMORY_ENCRYPT_OP` command id, printed by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SevCmd(pub u32);

impl SevCmd {
    /// The command's name without the `KVM_SEV_` prefix.
    pub fn name(self) -> &'static str {
        match self.0 {
            cmd::SEND_START => "SEND_START",
            cmd::SEND_UPDATE_DATA => "SEND_UPDATE_DATA",
            cmd::SEND_FINISH => "SEND_FINISH",
            cmd::SEND_CANCEL => "SEND_CANCEL",
            cmd::RECEIVE_START => "RECEIVE_START",
            cmd::RECEIVE_UPDATE_DATA => "RECEIVE_UPDATE_DATA",
            cmd::RECEIVE_FINISH => "RECEIVE_FINISH",
            _ => "an SEV command the transport does not use",
        }
    }
}

impl fmt::Display for SevCmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KVM_SEV_{} ({})", self.name(), self.0)
    }
}

/// A firmware status code (`kvm_sev_cmd.error`), printed by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SevStatus(pub u32);

impl SevStatus {
    /// Every code `<linux/psp-sev.h>` defines, success included.
    pub const ALL: [u32; 25] = [
        status::SUCCESS,
        status::INVALID_PLATFORM_STATE,
        status::INVALID_GUEST_STATE,
        status::INVALID_CONFIG,
        status::INVALID_LEN,
        status::ALREADY_OWNED,
        status::INVALID_CERTIFICATE,
        status::POLICY_FAILURE,
        status::INACTIVE,
        status::INVALID_ADDRESS,
        status::BAD_SIGNATURE,
        status::BAD_MEASUREMENT,
        status::ASID_OWNED,
        status::INVALID_ASID,
        status::WBINVD_REQUIRED,
        status::DFFLUSH_REQUIRED,
        status::INVALID_GUEST,
        status::INVALID_COMMAND,
        status::ACTIVE,
        status::HWSEV_RET_PLATFORM,
        status::HWSEV_RET_UNSAFE,
        status::UNSUPPORTED,
        status::INVALID_PARAM,
        status::RESOURCE_LIMIT,
        status::SECURE_DATA_INVALID,
    ];

    /// The code's name without the `SEV_RET_` prefix.
    pub fn name(self) -> &'static str {
        match self.0 {
            status::SUCCESS => "SUCCESS",
            status::INVALID_PLATFORM_STATE => "INVALID_PLATFORM_STATE",
            status::INVALID_GUEST_STATE => "INVALID_GUEST_STATE",
            status::INVALID_CONFIG => "INVALID_CONFIG",
            status::INVALID_LEN => "INVALID_LEN",
            status::ALREADY_OWNED => "ALREADY_OWNED",
            status::INVALID_CERTIFICATE => "INVALID_CERTIFICATE",
            status::POLICY_FAILURE => "POLICY_FAILURE",
            status::INACTIVE => "INACTIVE",
            status::INVALID_ADDRESS => "INVALID_ADDRESS",
            status::BAD_SIGNATURE => "BAD_SIGNATURE",
            status::BAD_MEASUREMENT => "BAD_MEASUREMENT",
            status::ASID_OWNED => "ASID_OWNED",
            status::INVALID_ASID => "INVALID_ASID",
            status::WBINVD_REQUIRED => "WBINVD_REQUIRED",
            status::DFFLUSH_REQUIRED => "DFFLUSH_REQUIRED",
            status::INVALID_GUEST => "INVALID_GUEST",
            status::INVALID_COMMAND => "INVALID_COMMAND",
            status::ACTIVE => "ACTIVE",
            status::HWSEV_RET_PLATFORM => "HWSEV_RET_PLATFORM",
            status::HWSEV_RET_UNSAFE => "HWSEV_RET_UNSAFE",
            status::UNSUPPORTED => "UNSUPPORTED",
            status::INVALID_PARAM => "INVALID_PARAM",
            status::RESOURCE_LIMIT => "RESOURCE_LIMIT",
            status::SECURE_DATA_INVALID => "SECURE_DATA_INVALID",
            _ => "unknown status",
        }
    }
}

impl fmt::Display for SevStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SEV_RET_{} ({:#x})", self.name(), self.0)
    }
}

/// Names of the policy bits set in `policy`, for messages ("NODBG|NOSEND").
pub fn policy_names(policy: u32) -> String {
    const NAMES: [(u32, &str); 6] = [
        (policy::NODBG, "NODBG"),
        (policy::NOKS, "NOKS"),
        (policy::ES, "ES"),
        (policy::NOSEND, "NOSEND"),
        (policy::DOMAIN, "DOMAIN"),
        (policy::SEV, "SEV"),
    ];
    let v: Vec<&str> = NAMES
        .iter()
        .filter(|(bit, _)| policy & bit != 0)
        .map(|(_, n)| *n)
        .collect();
    if v.is_empty() {
        "none".to_string()
    } else {
        v.join("|")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_has_a_name_and_the_header_has_no_more() {
        for (i, s) in SevStatus::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i);
            assert_ne!(SevStatus(*s).name(), "unknown status");
        }
        assert_eq!(SevStatus::ALL.len() as u32, status::MAX);
        assert_eq!(SevStatus(status::MAX).name(), "unknown status");
    }

    #[test]
    fn names_in_messages() {
        assert_eq!(
            SevStatus(status::POLICY_FAILURE).to_string(),
            "SEV_RET_POLICY_FAILURE (0x7)"
        );
        assert_eq!(
            SevCmd(cmd::SEND_UPDATE_DATA).to_string(),
            "KVM_SEV_SEND_UPDATE_DATA (9)"
        );
        assert_eq!(policy_names(0x9), "NODBG|NOSEND");
        assert_eq!(policy_names(0), "none");
    }
}
