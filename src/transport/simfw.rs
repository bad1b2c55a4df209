//! A simulated SEV firmware behind the same entry point as the kernel ([`MemoryEncryptOp`]), so
//! that the SEV marshalling ([`super::sev`]) runs unchanged without SEV hardware.
//!
//! **Test only.** It holds its keys in plain memory and its key agreement is a model (below), so
//! it protects nothing. It cannot be selected by accident: [`SimFirmware::new`] refuses unless
//! given the opt-in string [`SIM_OPT_IN`], the name of the QEMU property that selects it
//! (`x-sev-simulated-firmware`, an `x-` property: unstable, for tests); it never touches a VM fd
//! or `/dev/sev`, and it reaches only the guest RAM given to it in its memslot table.
//!
//! What it models, per command, is what the kernel (`arch/x86/kvm/svm/sev.c`) and then the
//! firmware check, in that order:
//! - **The kernel:** the length query (`hdr_len` or `trans_len` 0 for SEND_UPDATE_DATA,
//!   `session_len` 0 for SEND_START: the firmware's lengths are written back and the call fails
//!   with `SEV_RET_INVALID_LEN`); `EINVAL` for zero addresses or lengths, `guest_len` above a
//!   page or crossing a page, blobs above 16 KiB; `EFAULT` for a guest address outside guest RAM
//!   (here: outside the memslot table, as KVM maps host addresses to GPAs).
//! - **The firmware:** the guest state machine (UNINIT, RUNNING, SUPDATE, SENT, RUPDATE) and
//!   `SEV_RET_INVALID_GUEST_STATE` for a command in the wrong state; policy NOSEND refuses
//!   SEND_START (`SEV_RET_POLICY_FAILURE`); header and transport lengths (`SEV_RET_INVALID_LEN`,
//!   16 KiB cap); certificates (`SEV_RET_INVALID_CERTIFICATE`, `SEV_RET_BAD_SIGNATURE`);
//!   integrity of the session and of every packet (`SEV_RET_BAD_MEASUREMENT`). A firmware
//!   failure makes the ioctl return `EIO` with the status in `kvm_sev_cmd.error`, as the kernel's
//!   `sev_issue_cmd` does.
//! - **The pages:** guest RAM of an "encrypted" page holds `plaintext XOR ChaCha20(vm key, gpa)`
//!   (an all-zero key means RAM holds plaintext: identity mode). SEND_UPDATE_DATA decrypts with
//!   the source's key and seals under the session's transport key (ChaCha20-Poly1305, a fresh
//!   nonce per packet, the tag in the packet header); RECEIVE_UPDATE_DATA checks the tag and
//!   re-encrypts under the destination's key. A damaged packet fails; a shared page sent through
//!   it, or an encrypted page copied around it, comes out as garbage, as on hardware.
//! - **The session:** SEND_START wraps a fresh transport key for the destination platform's PDH,
//!   and binds the policy and both platforms' PDHs into the wrapping's tag; RECEIVE_START unwraps
//!   it. The wrapping key is derived from the destination's *public* PDH (no Diffie-Hellman): the
//!   model checks who is bound to what, not secrecy.

use std::fmt;
use std::sync::{Mutex, MutexGuard};

use chacha20::cipher::{KeyIvInit, StreamCipher, StreamCipherSeek};
use chacha20::ChaCha20;
use chacha20poly1305::aead::{AeadCore, AeadInPlace, KeyInit, OsRng};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce, Tag};
use nix::errno::Errno;

use super::encrypt_op::MemoryEncryptOp;
use super::sev_abi::{
    cmd, kvm_sev_cmd, kvm_sev_receive_start, kvm_sev_receive_update_data, kvm_sev_send_start,
    kvm_sev_send_update_data, policy, status, FW_BLOB_MAX, PAGE_SIZE,
};

/// The opt-in [`SimFirmware::new`] requires: the name of the QEMU property that selects the
/// simulated firmware (`-object sev-guest,...,x-sev-simulated-firmware=on` or the test transport
/// object's equivalent; docs/transport.md).
pub const SIM_OPT_IN: &str = "x-sev-simulated-firmware";

/// Length of the simulated packet header: flags (4), nonce (12), tag (16). (The real firmware's
/// is 52 bytes: flags, IV, MAC; the marshalling learns either through the length query.)
pub const SIM_HDR_LEN: u32 = 32;
/// Length of the simulated session blob: magic (8), policy (4), nonce (12), wrapped key (32),
/// tag (16).
pub const SIM_SESSION_LEN: u32 = 72;
/// Length of a simulated PDH certificate and of a platform certificate chain: magic (8) and the
/// platform's 32-byte identity.
pub const SIM_CERT_LEN: usize = 40;

const PDH_MAGIC: &[u8; 8] = b"SIMPDH01";
const PLAT_MAGIC: &[u8; 8] = b"SIMPEK01";
const AMD_MAGIC: &[u8; 8] = b"SIMARK01";
const SESSION_MAGIC: &[u8; 8] = b"SIMSESS1";
const KEK_NONCE: &[u8; 12] = b"simfw-kek-v1";
/// The fixed "AMD root" identity of every simulated platform.
const AMD_ROOT_ID: [u8; 32] = *b"simulated AMD ARK/ASK, not real!";

/// The simulated AMD certificate chain (ARK and ASK) every simulated platform accepts in
/// SEND_START's `amd_certs`.
pub fn sim_amd_certs() -> Vec<u8> {
    [AMD_MAGIC.as_slice(), AMD_ROOT_ID.as_slice()].concat()
}

/// Which side of a migration the simulated guest is on when the firmware is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimRole {
    /// A launched guest (state RUNNING), to be sent.
    Source,
    /// No guest context yet (state UNINIT): RECEIVE_START creates it.
    Destination,
}

/// The firmware's state of the guest (the SEV API's GSTATE values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestState {
    /// No guest context (destination before RECEIVE_START).
    Uninit = 0,
    /// Launched or received; the guest may run.
    Running = 3,
    /// Between SEND_START and SEND_FINISH/SEND_CANCEL: the guest may still run (live migration).
    SendUpdate = 4,
    /// Between RECEIVE_START and RECEIVE_FINISH: the guest must not run.
    ReceiveUpdate = 5,
    /// After SEND_FINISH: the guest must never run again here.
    Sent = 6,
}

impl GuestState {
    /// The SEV API's name of the state.
    pub fn name(self) -> &'static str {
        match self {
            GuestState::Uninit => "UNINIT",
            GuestState::Running => "RUNNING",
            GuestState::SendUpdate => "SUPDATE",
            GuestState::ReceiveUpdate => "RUPDATE",
            GuestState::Sent => "SENT",
        }
    }

    /// Whether the VMM may run the guest's vCPUs in this state.
    pub fn may_run(self) -> bool {
        matches!(self, GuestState::Running | GuestState::SendUpdate)
    }
}

/// The simulated firmware's set-up.
#[derive(Clone)]
pub struct SimConfig {
    /// Source (launched guest) or destination (no guest yet).
    pub role: SimRole,
    /// The source guest's launch policy (what SEND_START reports); ignored for a destination,
    /// whose policy comes from RECEIVE_START.
    pub policy: u32,
    /// The guest's memory encryption key; all zeros: RAM holds plaintext (identity mode).
    pub memory_key: [u8; 32],
    /// This simulated platform's identity (its PDH).
    pub platform_id: [u8; 32],
}

impl fmt::Debug for SimConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keys stay out of logs even in a simulation.
        f.debug_struct("SimConfig")
            .field("role", &self.role)
            .field("policy", &self.policy)
            .field("identity_keys", &(self.memory_key == [0; 32]))
            .finish_non_exhaustive()
    }
}

/// One guest RAM mapping, as in KVM's memslot table: `size` bytes of guest physical memory at
/// `gpa` are mapped at host address `host` of this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct Memslot {
    /// Guest physical address (4 KiB aligned).
    pub gpa: u64,
    /// Size in bytes (a non-zero multiple of 4 KiB).
    pub size: u64,
    /// Host virtual address (4 KiB aligned).
    pub host: u64,
}

/// The largest memslot table accepted (KVM allows 509 user slots per address space on x86).
pub const MAX_MEMSLOTS: usize = 4096;

/// Why the simulated firmware could not be made or given a memslot table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SimError {
    /// The opt-in string was not [`SIM_OPT_IN`].
    NotOptedIn {
        /// What was given.
        given: String,
    },
    /// A memslot is empty, unaligned, wraps, or overlaps another one.
    Memslot {
        /// Its index in the table.
        index: usize,
        /// The slot.
        slot: Memslot,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// More memslots than [`MAX_MEMSLOTS`].
    TooManyMemslots {
        /// How many were given.
        count: usize,
    },
}

impl fmt::Display for SimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SimError::NotOptedIn { given } => write!(
                f,
                "the simulated SEV firmware is for tests only and needs the explicit opt-in \
                 \"{SIM_OPT_IN}\"; got \"{given}\" (on a real SEV host use the KVM entry point)"
            ),
            SimError::Memslot {
                index,
                slot,
                reason,
            } => write!(
                f,
                "memslot {index} (gpa {:#x}, size {:#x}, host {:#x}) {reason}",
                slot.gpa, slot.size, slot.host
            ),
            SimError::TooManyMemslots { count } => write!(
                f,
                "{count} memslots given; at most {MAX_MEMSLOTS} are allowed"
            ),
        }
    }
}

impl std::error::Error for SimError {}

/// Commands the simulated firmware has carried out (successes only), and failures returned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct SimStats {
    /// SEND_START.
    pub send_start: u64,
    /// SEND_UPDATE_DATA (pages sent through the firmware).
    pub send_update_data: u64,
    /// SEND_FINISH.
    pub send_finish: u64,
    /// SEND_CANCEL.
    pub send_cancel: u64,
    /// RECEIVE_START.
    pub receive_start: u64,
    /// RECEIVE_UPDATE_DATA (pages received through the firmware).
    pub receive_update_data: u64,
    /// RECEIVE_FINISH.
    pub receive_finish: u64,
    /// Length queries answered.
    pub length_queries: u64,
    /// Commands that failed (kernel errno or firmware status), length queries excluded.
    pub failures: u64,
}

struct State {
    guest: GuestState,
    policy: u32,
    /// The session's transport key, between SEND_START/RECEIVE_START and the end.
    tek: Option<[u8; 32]>,
    /// Sorted by host address, non-overlapping.
    slots: Vec<Memslot>,
    /// One-shot failure injection: (command id, status).
    inject: Option<(u32, u32)>,
    stats: SimStats,
}

/// The simulated SEV firmware of one guest (one VM fd). See the module documentation.
pub struct SimFirmware {
    memory_key: [u8; 32],
    platform_id: [u8; 32],
    /// The firmware is one queue: every command runs under this lock, start to end.
    state: Mutex<State>,
}

impl fmt::Debug for SimFirmware {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimFirmware")
            .field("guest_state", &self.guest_state())
            .finish_non_exhaustive()
    }
}

/// How a command failed: in the kernel (an errno, no firmware status) or in the firmware.
enum Fail {
    Kernel(Errno),
    Fw(u32),
}

type Step<T> = Result<T, Fail>;

fn check_memslots(slots: &[Memslot]) -> Result<Vec<Memslot>, SimError> {
    if slots.len() > MAX_MEMSLOTS {
        return Err(SimError::TooManyMemslots { count: slots.len() });
    }
    let page = u64::from(PAGE_SIZE);
    for (index, s) in slots.iter().enumerate() {
        let bad = |reason| {
            Err(SimError::Memslot {
                index,
                slot: *s,
                reason,
            })
        };
        if s.size == 0 {
            return bad("is empty");
        }
        if s.gpa % page != 0 || s.size % page != 0 || s.host % page != 0 {
            return bad("is not 4 KiB aligned (gpa, size and host must be)");
        }
        if s.gpa.checked_add(s.size).is_none() || s.host.checked_add(s.size).is_none() {
            return bad("wraps around the address space");
        }
        if s.host == 0 {
            return bad("has a NULL host address");
        }
    }
    let overlap = |by: fn(&Memslot) -> u64, what: &'static str| -> Result<(), SimError> {
        let mut idx: Vec<usize> = (0..slots.len()).collect();
        idx.sort_by_key(|&i| by(&slots[i]));
        for w in idx.windows(2) {
            let (a, b) = (&slots[w[0]], &slots[w[1]]);
            if by(a) + a.size > by(b) {
                return Err(SimError::Memslot {
                    index: w[1],
                    slot: *b,
                    reason: what,
                });
            }
        }
        Ok(())
    };
    overlap(|s| s.gpa, "overlaps another memslot's guest addresses")?;
    overlap(|s| s.host, "overlaps another memslot's host addresses")?;
    let mut sorted = slots.to_vec();
    sorted.sort_by_key(|s| s.host);
    Ok(sorted)
}

/// What the simulated SEND_UPDATE_DATA on a source with memory key `src_key`, then
/// RECEIVE_UPDATE_DATA on a destination with `dst_key`, do to the RAM bytes of the page at
/// `gpa_page` (4 KiB aligned): decrypt under the source's key, encrypt under the destination's.
/// `buf` is the whole page, or its first bytes. The keyed-mode verifier
/// ([`super::verify`]) uses this to predict an encrypted page on the destination, so the check
/// and the firmware share one definition of the memory encryption (tests/transport.rs checks it
/// against a model written independently).
pub fn rekey_page(src_key: &[u8; 32], dst_key: &[u8; 32], gpa_page: u64, buf: &mut [u8]) {
    memory_xor(src_key, gpa_page, 0, buf);
    memory_xor(dst_key, gpa_page, 0, buf);
}

/// XORs `buf` with the modelled memory-encryption keystream of `key` for the page at `gpa_page`,
/// starting `offset` bytes into the page. An all-zero key is the identity.
fn memory_xor(key: &[u8; 32], gpa_page: u64, offset: usize, buf: &mut [u8]) {
    if *key == [0; 32] {
        return;
    }
    let mut nonce = [0u8; 12];
    nonce[..8].copy_from_slice(&gpa_page.to_le_bytes());
    let mut c = ChaCha20::new(key.into(), &nonce.into());
    c.seek(offset as u64);
    c.apply_keystream(buf);
}

/// The key-wrapping key for sessions to the platform `dst_id` (derived from public data: a
/// model, see the module documentation).
fn kek_for(dst_id: &[u8; 32]) -> [u8; 32] {
    let mut kek = [0u8; 32];
    let mut c = ChaCha20::new(dst_id.into(), KEK_NONCE.into());
    c.apply_keystream(&mut kek);
    kek
}

fn session_aad(policy: u32, src_id: &[u8; 32], dst_id: &[u8; 32]) -> Vec<u8> {
    [
        SESSION_MAGIC.as_slice(),
        &policy.to_be_bytes(),
        src_id.as_slice(),
        dst_id.as_slice(),
    ]
    .concat()
}

/// The platform identity inside a simulated certificate with `magic`, if it is one.
fn cert_id(blob: &[u8], magic: &[u8; 8]) -> Option<[u8; 32]> {
    if blob.len() != SIM_CERT_LEN || &blob[..8] != magic {
        return None;
    }
    blob[8..].try_into().ok()
}

/// Reads the command's argument structure from `data`.
///
/// # Safety
/// A non-zero `data` points to a readable `T` (the caller's contract of `memory_encrypt_op`).
unsafe fn read_arg<T: Copy>(data: u64) -> Step<T> {
    if data == 0 {
        return Err(Fail::Kernel(Errno::EFAULT));
    }
    // SAFETY: per the contract, `data` is the address of a live `T`; unaligned reads are fine.
    Ok(unsafe { std::ptr::read_unaligned(data as usize as *const T) })
}

/// Writes the command's argument structure back to `data` (as the kernel's copy_to_user).
///
/// # Safety
/// `data` points to a writable `T` (checked non-zero by [`read_arg`] first).
unsafe fn write_arg<T: Copy>(data: u64, v: &T) {
    // SAFETY: per the contract, `data` is the address of a live, writable `T`.
    unsafe { std::ptr::write_unaligned(data as usize as *mut T, *v) }
}

/// Copies a blob from the caller (the kernel's `psp_copy_user_blob`): `EINVAL` for a NULL
/// address or a length above 16 KiB.
///
/// # Safety
/// A non-zero `uaddr` names `len` readable bytes.
unsafe fn copy_blob(uaddr: u64, len: u32) -> Step<Vec<u8>> {
    if uaddr == 0 || len > FW_BLOB_MAX {
        return Err(Fail::Kernel(Errno::EINVAL));
    }
    // SAFETY: per the contract, `uaddr` names `len` readable bytes; len <= 16 KiB.
    Ok(unsafe { std::slice::from_raw_parts(uaddr as usize as *const u8, len as usize) }.to_vec())
}

/// Writes `bytes` to the caller's buffer, zero-filling the rest of its `len` bytes.
///
/// # Safety
/// `uaddr` names `len` writable bytes, and `bytes.len() <= len`.
unsafe fn put_blob(uaddr: u64, len: u32, bytes: &[u8]) {
    // SAFETY: per the contract, `uaddr` names `len` writable bytes that nothing else uses.
    let out = unsafe { std::slice::from_raw_parts_mut(uaddr as usize as *mut u8, len as usize) };
    out[..bytes.len()].copy_from_slice(bytes);
    out[bytes.len()..].fill(0);
}

impl SimFirmware {
    /// Makes the simulated firmware of one guest.
    ///
    /// Refuses unless `opt_in` is [`SIM_OPT_IN`], and refuses a memslot table with empty,
    /// unaligned, wrapping or overlapping slots.
    ///
    /// # Safety
    /// Every memslot's `[host, host + size)` is memory of this process, readable and writable,
    /// until the firmware is dropped or given another table ([`SimFirmware::set_memslots`]).
    pub unsafe fn new(
        opt_in: &str,
        config: SimConfig,
        memslots: &[Memslot],
    ) -> Result<SimFirmware, SimError> {
        if opt_in != SIM_OPT_IN {
            return Err(SimError::NotOptedIn {
                given: opt_in.chars().take(64).collect(),
            });
        }
        let slots = check_memslots(memslots)?;
        let guest = match config.role {
            SimRole::Source => GuestState::Running,
            SimRole::Destination => GuestState::Uninit,
        };
        Ok(SimFirmware {
            memory_key: config.memory_key,
            platform_id: config.platform_id,
            state: Mutex::new(State {
                guest,
                policy: config.policy,
                tek: None,
                slots,
                inject: None,
                stats: SimStats::default(),
            }),
        })
    }

    /// Replaces the memslot table (memory hotplug, a VMM's memory listener). Refused tables
    /// leave the old one in place.
    ///
    /// # Safety
    /// As for [`SimFirmware::new`], for the new table.
    pub unsafe fn set_memslots(&self, memslots: &[Memslot]) -> Result<(), SimError> {
        let slots = check_memslots(memslots)?;
        self.lock().slots = slots;
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every command leaves the state whole before it can panic (state changes are single
        // assignments at the end), so a poisoned lock still holds a consistent state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The firmware's state of the guest.
    pub fn guest_state(&self) -> GuestState {
        self.lock().guest
    }

    /// Whether the VMM may run the guest now: true while RUNNING or SUPDATE (a live migration in
    /// progress), false before RECEIVE_FINISH on a destination and forever after SEND_FINISH on
    /// a source. A VMM asserts this before it starts the vCPUs.
    pub fn guest_may_run(&self) -> bool {
        self.guest_state().may_run()
    }

    /// The commands carried out so far.
    pub fn stats(&self) -> SimStats {
        self.lock().stats
    }

    /// The guest's policy as the firmware knows it (launch policy, or RECEIVE_START's).
    pub fn policy(&self) -> u32 {
        self.lock().policy
    }

    /// This platform's PDH certificate (what `SEV_PDH_CERT_EXPORT` gives on a real host).
    pub fn pdh_cert(&self) -> Vec<u8> {
        [PDH_MAGIC.as_slice(), self.platform_id.as_slice()].concat()
    }

    /// This platform's certificate chain (PEK, OCA, CEK in real life) that signs its PDH.
    pub fn platform_certs(&self) -> Vec<u8> {
        [PLAT_MAGIC.as_slice(), self.platform_id.as_slice()].concat()
    }

    /// Makes the next command `cmd_id` fail in the firmware with `status` (one shot): to test
    /// that every firmware error reaches the caller. `status` 0 clears a pending injection.
    pub fn inject_failure(&self, cmd_id: u32, status: u32) {
        self.lock().inject = (status != 0).then_some((cmd_id, status));
    }

    /// The firmware's entry for `cmd_id`: a pending injected failure, else continue.
    fn firmware_entry(st: &mut State, cmd_id: u32) -> Step<()> {
        match st.inject {
            Some((id, s)) if id == cmd_id => {
                st.inject = None;
                Err(Fail::Fw(s))
            }
            _ => Ok(()),
        }
    }

    fn require(st: &State, want: GuestState) -> Step<()> {
        if st.guest == want {
            Ok(())
        } else {
            Err(Fail::Fw(status::INVALID_GUEST_STATE))
        }
    }

    /// The kernel's page checks and pinning: the guest range must be one non-empty piece of a
    /// page and lie in guest RAM. Returns the page's GPA and the offset in it.
    fn pin(st: &State, uaddr: u64, len: u32) -> Step<(u64, usize)> {
        let offset = (uaddr % u64::from(PAGE_SIZE)) as u32;
        if len > PAGE_SIZE || len + offset > PAGE_SIZE {
            return Err(Fail::Kernel(Errno::EINVAL));
        }
        let i = st.slots.partition_point(|s| s.host <= uaddr);
        let slot = i
            .checked_sub(1)
            .map(|i| st.slots[i])
            .filter(|s| uaddr - s.host < s.size)
            .ok_or(Fail::Kernel(Errno::EFAULT))?;
        let gpa_page = slot.gpa + (uaddr - slot.host) - u64::from(offset);
        Ok((gpa_page, offset as usize))
    }

    fn send_start(&self, st: &mut State, data: u64) -> Step<()> {
        // SAFETY: the caller's contract: `data` is a live kvm_sev_send_start.
        let mut p: kvm_sev_send_start = unsafe { read_arg(data)? };
        if p.session_len == 0 {
            // The kernel's __sev_send_start_query_session_length(): the firmware sees a zeroed
            // structure and answers with the length it needs.
            Self::firmware_entry(st, cmd::SEND_START)?;
            p.session_len = SIM_SESSION_LEN;
            // SAFETY: as above, writable.
            unsafe { write_arg(data, &p) };
            st.stats.length_queries += 1;
            return Err(Fail::Fw(status::INVALID_LEN));
        }
        if p.pdh_cert_uaddr == 0
            || p.pdh_cert_len == 0
            || p.session_uaddr == 0
            || p.session_len > FW_BLOB_MAX
        {
            return Err(Fail::Kernel(Errno::EINVAL));
        }
        // SAFETY: the caller's contract: non-zero addresses name their lengths.
        let pdh = unsafe { copy_blob(p.pdh_cert_uaddr, p.pdh_cert_len)? };
        // SAFETY: as above.
        let plat = unsafe { copy_blob(p.plat_certs_uaddr, p.plat_certs_len)? };
        // SAFETY: as above.
        let amd = unsafe { copy_blob(p.amd_certs_uaddr, p.amd_certs_len)? };

        Self::firmware_entry(st, cmd::SEND_START)?;
        Self::require(st, GuestState::Running)?;
        if st.policy & policy::NOSEND != 0 {
            return Err(Fail::Fw(status::POLICY_FAILURE));
        }
        if p.session_len < SIM_SESSION_LEN {
            p.session_len = SIM_SESSION_LEN;
            // SAFETY: as above, writable.
            unsafe { write_arg(data, &p) };
            return Err(Fail::Fw(status::INVALID_LEN));
        }
        if amd != sim_amd_certs() {
            return Err(Fail::Fw(status::INVALID_CERTIFICATE));
        }
        let dst_id = cert_id(&pdh, PDH_MAGIC).ok_or(Fail::Fw(status::INVALID_CERTIFICATE))?;
        if cert_id(&plat, PLAT_MAGIC) != Some(dst_id) {
            // The platform chain does not sign this PDH.
            return Err(Fail::Fw(status::BAD_SIGNATURE));
        }

        let tek: [u8; 32] = ChaCha20Poly1305::generate_key(&mut OsRng).into();
        let nonce = ChaCha20Poly1305::generate_nonce(&mut OsRng);
        let mut wrapped = tek;
        let aad = session_aad(st.policy, &self.platform_id, &dst_id);
        let tag = ChaCha20Poly1305::new(&kek_for(&dst_id).into())
            .encrypt_in_place_detached(&nonce, &aad, &mut wrapped)
            .map_err(|_| Fail::Fw(status::HWSEV_RET_PLATFORM))?;
        let session = [
            SESSION_MAGIC.as_slice(),
            &st.policy.to_be_bytes(),
            nonce.as_slice(),
            wrapped.as_slice(),
            tag.as_slice(),
        ]
        .concat();
        debug_assert_eq!(session.len(), SIM_SESSION_LEN as usize);
        // SAFETY: the caller's contract: session_uaddr names session_len (>= SIM_SESSION_LEN)
        // writable bytes.
        unsafe { put_blob(p.session_uaddr, p.session_len, &session) };
        p.policy = st.policy;
        p.session_len = SIM_SESSION_LEN;
        // SAFETY: as above, writable.
        unsafe { write_arg(data, &p) };
        st.tek = Some(tek);
        st.guest = GuestState::SendUpdate;
        st.stats.send_start += 1;
        Ok(())
    }

    fn send_update_data(&self, st: &mut State, data: u64) -> Step<()> {
        // SAFETY: the caller's contract: `data` is a live kvm_sev_send_update_data.
        let mut p: kvm_sev_send_update_data = unsafe { read_arg(data)? };
        if p.hdr_len == 0 || p.trans_len == 0 {
            // __sev_send_update_data_query_lengths(): the firmware gets a zeroed structure, so it
            // cannot know the page's length; it answers with its header length and a whole page.
            Self::firmware_entry(st, cmd::SEND_UPDATE_DATA)?;
            p.hdr_len = SIM_HDR_LEN;
            p.trans_len = PAGE_SIZE;
            // SAFETY: as above, writable.
            unsafe { write_arg(data, &p) };
            st.stats.length_queries += 1;
            return Err(Fail::Fw(status::INVALID_LEN));
        }
        if p.trans_uaddr == 0 || p.guest_uaddr == 0 || p.guest_len == 0 || p.hdr_uaddr == 0 {
            return Err(Fail::Kernel(Errno::EINVAL));
        }
        let (gpa_page, offset) = Self::pin(st, p.guest_uaddr, p.guest_len)?;

        Self::firmware_entry(st, cmd::SEND_UPDATE_DATA)?;
        Self::require(st, GuestState::SendUpdate)?;
        if p.hdr_len > FW_BLOB_MAX || p.trans_len > FW_BLOB_MAX {
            return Err(Fail::Fw(status::INVALID_LEN));
        }
        if p.hdr_len < SIM_HDR_LEN || p.trans_len < p.guest_len {
            return Err(Fail::Fw(status::INVALID_LEN));
        }
        let tek = st.tek.ok_or(Fail::Fw(status::INVALID_GUEST_STATE))?;
        let mut buf = vec![0u8; p.guest_len as usize];
        // SAFETY: `pin` found guest_uaddr..+guest_len inside a memslot, which the constructor's
        // contract keeps readable. The guest may be writing the page concurrently (live
        // migration): a torn copy is what the firmware would read too; the dirty log resends it.
        unsafe {
            std::ptr::copy_nonoverlapping(
                p.guest_uaddr as usize as *const u8,
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        memory_xor(&self.memory_key, gpa_page, offset, &mut buf);
        let nonce = ChaCha20Poly1305::generate_nonce(&mut OsRng);
        let flags = 0u32.to_be_bytes();
        let aad = [flags.as_slice(), nonce.as_slice()].concat();
        let tag = ChaCha20Poly1305::new(&tek.into())
            .encrypt_in_place_detached(&nonce, &aad, &mut buf)
            .map_err(|_| Fail::Fw(status::HWSEV_RET_PLATFORM))?;
        let hdr = [aad.as_slice(), tag.as_slice()].concat();
        // SAFETY: the caller's contract: hdr_uaddr names hdr_len (>= 32) writable bytes and
        // trans_uaddr trans_len (>= guest_len) writable bytes.
        unsafe {
            put_blob(p.hdr_uaddr, p.hdr_len, &hdr);
            put_blob(p.trans_uaddr, p.trans_len, &buf);
        }
        st.stats.send_update_data += 1;
        Ok(())
    }

    fn receive_start(&self, st: &mut State, data: u64) -> Step<()> {
        // SAFETY: the caller's contract: `data` is a live kvm_sev_receive_start.
        let mut p: kvm_sev_receive_start = unsafe { read_arg(data)? };
        if p.pdh_uaddr == 0 || p.pdh_len == 0 || p.session_uaddr == 0 || p.session_len == 0 {
            return Err(Fail::Kernel(Errno::EINVAL));
        }
        // SAFETY: the caller's contract: non-zero addresses name their lengths.
        let pdh = unsafe { copy_blob(p.pdh_uaddr, p.pdh_len)? };
        // SAFETY: as above.
        let session = unsafe { copy_blob(p.session_uaddr, p.session_len)? };

        Self::firmware_entry(st, cmd::RECEIVE_START)?;
        Self::require(st, GuestState::Uninit)?;
        let src_id = cert_id(&pdh, PDH_MAGIC).ok_or(Fail::Fw(status::INVALID_CERTIFICATE))?;
        if session.len() != SIM_SESSION_LEN as usize {
            return Err(Fail::Fw(status::INVALID_LEN));
        }
        if &session[..8] != SESSION_MAGIC {
            return Err(Fail::Fw(status::INVALID_PARAM));
        }
        let session_policy = u32::from_be_bytes(session[8..12].try_into().expect("4 bytes"));
        let nonce = Nonce::from_slice(&session[12..24]);
        let mut tek: [u8; 32] = session[24..56].try_into().expect("32 bytes");
        let tag = Tag::from_slice(&session[56..72]);
        let aad = session_aad(session_policy, &src_id, &self.platform_id);
        ChaCha20Poly1305::new(Key::from_slice(&kek_for(&self.platform_id)))
            .decrypt_in_place_detached(nonce, &aad, &mut tek, tag)
            .map_err(|_| Fail::Fw(status::BAD_MEASUREMENT))?;
        if p.policy != session_policy {
            return Err(Fail::Fw(status::POLICY_FAILURE));
        }
        p.handle = 1;
        // SAFETY: as above, writable.
        unsafe { write_arg(data, &p) };
        st.policy = session_policy;
        st.tek = Some(tek);
        st.guest = GuestState::ReceiveUpdate;
        st.stats.receive_start += 1;
        Ok(())
    }

    fn receive_update_data(&self, st: &mut State, data: u64) -> Step<()> {
        // SAFETY: the caller's contract: `data` is a live kvm_sev_receive_update_data.
        let p: kvm_sev_receive_update_data = unsafe { read_arg(data)? };
        if p.hdr_uaddr == 0
            || p.hdr_len == 0
            || p.guest_uaddr == 0
            || p.guest_len == 0
            || p.trans_uaddr == 0
            || p.trans_len == 0
        {
            return Err(Fail::Kernel(Errno::EINVAL));
        }
        let offset = (p.guest_uaddr % u64::from(PAGE_SIZE)) as u32;
        if p.guest_len > PAGE_SIZE || p.guest_len + offset > PAGE_SIZE {
            return Err(Fail::Kernel(Errno::EINVAL));
        }
        // SAFETY: the caller's contract: non-zero addresses name their lengths.
        let hdr = unsafe { copy_blob(p.hdr_uaddr, p.hdr_len)? };
        // SAFETY: as above.
        let mut buf = unsafe { copy_blob(p.trans_uaddr, p.trans_len)? };
        let (gpa_page, offset) = Self::pin(st, p.guest_uaddr, p.guest_len)?;

        Self::firmware_entry(st, cmd::RECEIVE_UPDATE_DATA)?;
        Self::require(st, GuestState::ReceiveUpdate)?;
        if p.hdr_len != SIM_HDR_LEN || p.trans_len != p.guest_len {
            return Err(Fail::Fw(status::INVALID_LEN));
        }
        if hdr[..4] != [0; 4] {
            return Err(Fail::Fw(status::INVALID_PARAM));
        }
        let tek = st.tek.ok_or(Fail::Fw(status::INVALID_GUEST_STATE))?;
        let nonce = Nonce::from_slice(&hdr[4..16]);
        let tag = Tag::from_slice(&hdr[16..32]);
        // Checked before guest memory is touched: a damaged packet changes nothing.
        ChaCha20Poly1305::new(Key::from_slice(&tek))
            .decrypt_in_place_detached(nonce, &hdr[..16], &mut buf, tag)
            .map_err(|_| Fail::Fw(status::BAD_MEASUREMENT))?;
        memory_xor(&self.memory_key, gpa_page, offset, &mut buf);
        // SAFETY: `pin` found guest_uaddr..+guest_len inside a memslot, which the constructor's
        // contract keeps writable; the destination guest does not run before RECEIVE_FINISH.
        unsafe {
            std::ptr::copy_nonoverlapping(
                buf.as_ptr(),
                p.guest_uaddr as usize as *mut u8,
                buf.len(),
            )
        };
        st.stats.receive_update_data += 1;
        Ok(())
    }

    fn transition(st: &mut State, id: u32, from: GuestState, to: GuestState) -> Step<()> {
        Self::firmware_entry(st, id)?;
        Self::require(st, from)?;
        st.guest = to;
        if to != GuestState::ReceiveUpdate && to != GuestState::SendUpdate {
            st.tek = None;
        }
        Ok(())
    }
}

impl MemoryEncryptOp for SimFirmware {
    unsafe fn memory_encrypt_op(&self, c: &mut kvm_sev_cmd) -> Result<(), Errno> {
        let mut st = self.lock();
        let st = &mut *st;
        let r = match c.id {
            cmd::SEND_START => self.send_start(st, c.data),
            cmd::SEND_UPDATE_DATA => self.send_update_data(st, c.data),
            cmd::SEND_FINISH => {
                let r = Self::transition(st, c.id, GuestState::SendUpdate, GuestState::Sent);
                st.stats.send_finish += u64::from(r.is_ok());
                r
            }
            cmd::SEND_CANCEL => {
                let r = Self::transition(st, c.id, GuestState::SendUpdate, GuestState::Running);
                st.stats.send_cancel += u64::from(r.is_ok());
                r
            }
            cmd::RECEIVE_START => self.receive_start(st, c.data),
            cmd::RECEIVE_UPDATE_DATA => self.receive_update_data(st, c.data),
            cmd::RECEIVE_FINISH => {
                let r = Self::transition(st, c.id, GuestState::ReceiveUpdate, GuestState::Running);
                st.stats.receive_finish += u64::from(r.is_ok());
                r
            }
            // svm_mem_enc_op()'s default case; the launch, debug and attestation commands are
            // not simulated either.
            _ => Err(Fail::Kernel(Errno::EINVAL)),
        };
        match r {
            Ok(()) => {
                c.error = status::SUCCESS;
                Ok(())
            }
            Err(Fail::Kernel(e)) => {
                st.stats.failures += 1;
                c.error = status::SUCCESS;
                Err(e)
            }
            Err(Fail::Fw(s)) => {
                if s != status::INVALID_LEN {
                    st.stats.failures += 1;
                }
                c.error = s;
                Err(Errno::EIO)
            }
        }
    }

    fn describe(&self) -> &'static str {
        "simulated SEV firmware"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opt_in_is_required() {
        let cfg = SimConfig {
            role: SimRole::Source,
            policy: 0,
            memory_key: [0; 32],
            platform_id: [1; 32],
        };
        // SAFETY: no memslots, so no memory promise to keep.
        let e = unsafe { SimFirmware::new("sev", cfg.clone(), &[]) }.unwrap_err();
        assert!(e.to_string().contains("x-sev-simulated-firmware"), "{e}");
        // SAFETY: as above.
        assert!(unsafe { SimFirmware::new(SIM_OPT_IN, cfg, &[]) }.is_ok());
    }

    #[test]
    fn memslots_are_checked() {
        let s = |gpa, size, host| Memslot { gpa, size, host };
        assert!(check_memslots(&[s(0, 0x1000, 0x10000)]).is_ok());
        for (bad, why) in [
            (vec![s(0, 0, 0x10000)], "empty"),
            (vec![s(0x10, 0x1000, 0x10000)], "aligned"),
            (
                vec![s(0, 0x2000, 0x10000), s(0x1000, 0x1000, 0x20000)],
                "guest",
            ),
            (
                vec![s(0, 0x2000, 0x10000), s(0x4000, 0x1000, 0x11000)],
                "host",
            ),
            (vec![s(!0xfff, 0x2000, 0x10000)], "wraps"),
        ] {
            let e = check_memslots(&bad).unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn identity_key_is_identity_and_others_are_not() {
        let mut b = [7u8; 64];
        memory_xor(&[0; 32], 0x1000, 0, &mut b);
        assert_eq!(b, [7u8; 64]);
        memory_xor(&[1; 32], 0x1000, 0, &mut b);
        assert_ne!(b, [7u8; 64]);
        // The keystream depends on the gpa and is seekable: bytes 32.. of the page at offset 32
        // are the same as when the whole page is transformed.
        let mut whole = [0u8; 64];
        memory_xor(&[1; 32], 0x1000, 0, &mut whole);
        let mut tail = [0u8; 32];
        memory_xor(&[1; 32], 0x1000, 32, &mut tail);
        assert_eq!(tail, whole[32..]);
        let mut other = [0u8; 64];
        memory_xor(&[1; 32], 0x2000, 0, &mut other);
        assert_ne!(other, whole);
    }
}
