//! The C ABI of the encrypted-page transport ([`crate::transport`]): a `pagenc_transport` per
//! guest (over KVM or over a simulated firmware) and the simulated firmware itself
//! (`pagenc_simfw`, tests only). Shaped for QEMU's confidential-guest migration ops: send_setup,
//! send_page(gpa, host) → packet, send_finish, send_cancel, recv_setup, recv_page(gpa, host,
//! packet), recv_finish.
//!
//! Its own result codes (`pagenc_transport_result`) and last-error message per handle: the
//! tracker's `pagenc_result` is left as it is. Threads: a `pagenc_transport *` may be used from
//! any number of threads at once (multifd channel threads send or receive pages concurrently);
//! set-up, finish and cancel serialise on the transport, and every firmware command serialises
//! in the firmware (KVM's `kvm->lock` and the PSP's single queue, or the simulated firmware's
//! lock), so concurrent page calls overlap only in their copying and framing.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::error::{out_buf, write_message};
use super::handle::{arc_into_ptr, free_arc, Castable, NullValue, OwnershipArc};
use super::panic::PanicValue;
use crate::transport::wire::PacketPrefix;
use crate::transport::{
    sim_amd_certs, KvmVm, MemoryEncryptOp, Memslot, SendParams, SevMode, SevTransport, SimConfig,
    SimFirmware, SimRole, TransportError,
};

/// What a transport or simulated-firmware call did. Stable values, only ever appended to.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum pagenc_transport_result {
    /// Success.
    Ok = 0,
    /// A required pointer argument was NULL.
    NullArgument = 1,
    /// An argument is out of range (gpa, mode, role, memslot table, opt-in string).
    InvalidArgument = 2,
    /// A configuration the transport refuses: policy NOSEND, SEV-ES, SEV-SNP, or a policy that
    /// differs from the firmware's or the session's. Nothing was sent.
    Refused = 3,
    /// Called in the wrong order (a page before set-up, set-up twice, finish without a session).
    BadState = 4,
    /// Bytes from the migration stream (session record, packet) were refused.
    BadStream = 5,
    /// The SEV firmware failed the command; `pagenc_transport_last_fw_status` has its status.
    FirmwareError = 6,
    /// The kernel failed the ioctl before the firmware ran (EINVAL, EFAULT, ENOTTY, ...).
    KernelError = 7,
    /// The output buffer is too small; the size needed was written where the function says.
    BufferTooSmall = 8,
    /// A bug in pagenc (a caught panic).
    Internal = 9,
}

impl pagenc_transport_result {
    /// Every code, in numeric order.
    pub(crate) const ALL: [pagenc_transport_result; 10] = [
        pagenc_transport_result::Ok,
        pagenc_transport_result::NullArgument,
        pagenc_transport_result::InvalidArgument,
        pagenc_transport_result::Refused,
        pagenc_transport_result::BadState,
        pagenc_transport_result::BadStream,
        pagenc_transport_result::FirmwareError,
        pagenc_transport_result::KernelError,
        pagenc_transport_result::BufferTooSmall,
        pagenc_transport_result::Internal,
    ];

    fn text(self) -> &'static CStr {
        match self {
            pagenc_transport_result::Ok => c"success",
            pagenc_transport_result::NullArgument => c"a required pointer argument is NULL",
            pagenc_transport_result::InvalidArgument => c"invalid argument",
            pagenc_transport_result::Refused => c"configuration refused (policy, SEV-ES, SNP)",
            pagenc_transport_result::BadState => c"called in the wrong order",
            pagenc_transport_result::BadStream => c"migration stream data refused",
            pagenc_transport_result::FirmwareError => c"the SEV firmware failed the command",
            pagenc_transport_result::KernelError => c"the kernel failed the SEV ioctl",
            pagenc_transport_result::BufferTooSmall => c"buffer too small",
            pagenc_transport_result::Internal => c"internal error in pagenc (a bug)",
        }
    }
}

impl PanicValue for pagenc_transport_result {
    fn panic_value() -> Self {
        pagenc_transport_result::Internal
    }
}

impl NullValue for pagenc_transport_result {
    fn null_value() -> Self {
        pagenc_transport_result::NullArgument
    }
}

/// `pagenc_transport_send_setup`'s and `pagenc_transport_recv_setup`'s `mode`: plain SEV.
pub const PAGENC_SEV_MODE_SEV: u32 = 0;
/// SEV-ES (refused: upstream KVM cannot move the VMSA).
pub const PAGENC_SEV_MODE_SEV_ES: u32 = 1;
/// SEV-SNP (refused).
pub const PAGENC_SEV_MODE_SEV_SNP: u32 = 2;

/// `pagenc_simfw_config.role`: a launched guest, to be sent (state RUNNING).
pub const PAGENC_SIMFW_ROLE_SOURCE: u32 = 0;
/// `pagenc_simfw_config.role`: no guest yet (state UNINIT), RECEIVE_START creates it.
pub const PAGENC_SIMFW_ROLE_DESTINATION: u32 = 1;

/// The largest packet `pagenc_transport_send_page` writes (prefix, a 16 KiB firmware header,
/// one page): a buffer this big always suffices.
pub const PAGENC_TRANSPORT_PACKET_MAX: usize = 24 + 16384 + 4096;
/// The fixed prefix of a packet: read this many bytes, then `pagenc_transport_packet_size`.
pub const PAGENC_TRANSPORT_PACKET_PREFIX: usize = 24;
/// The largest session record.
pub const PAGENC_TRANSPORT_SESSION_MAX: usize = 24 + 2 * 16384;

/// An encrypted-page transport for one guest. Thread-safe (see the functions).
pub struct pagenc_transport {
    _private: [u8; 0],
    _not_send_sync: PhantomData<*mut u8>,
}

/// A simulated SEV firmware for one guest: tests only (explicit opt-in).
pub struct pagenc_simfw {
    _private: [u8; 0],
    _not_send_sync: PhantomData<*mut u8>,
}

impl fmt::Debug for pagenc_transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("pagenc_transport")
    }
}

impl fmt::Debug for pagenc_simfw {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("pagenc_simfw")
    }
}

/// What a `pagenc_transport *` points to.
#[derive(Debug)]
pub(crate) struct TransportHandle {
    t: SevTransport,
    /// The encoded session record of the last successful send set-up.
    record: Mutex<Option<Vec<u8>>>,
    last_error: Mutex<Option<FfiError>>,
    /// The firmware status of the last failure that had one (0 otherwise).
    last_fw_status: AtomicU32,
}

impl Castable for pagenc_transport {
    type Ownership = OwnershipArc;
    type RustType = TransportHandle;
}

impl Castable for pagenc_simfw {
    type Ownership = OwnershipArc;
    type RustType = SimFirmware;
}

/// A failure recorded as a transport's last error.
#[derive(Debug, Clone)]
enum FfiError {
    Null(&'static str),
    Mode(u32),
    Transport(TransportError),
    BufferTooSmall { needed: usize, len: usize },
}

impl fmt::Display for FfiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FfiError::Null(name) => write!(f, "argument `{name}` is NULL; it is required"),
            FfiError::Mode(m) => write!(
                f,
                "mode {m} is unknown; allowed: {PAGENC_SEV_MODE_SEV} (SEV), \
                 {PAGENC_SEV_MODE_SEV_ES} (SEV-ES), {PAGENC_SEV_MODE_SEV_SNP} (SEV-SNP)"
            ),
            FfiError::Transport(e) => e.fmt(f),
            FfiError::BufferTooSmall { needed, len } => write!(
                f,
                "buffer of {len} bytes is too small; {needed} bytes are needed"
            ),
        }
    }
}

fn code(e: &FfiError) -> pagenc_transport_result {
    use pagenc_transport_result as R;
    match e {
        FfiError::Null(_) => R::NullArgument,
        FfiError::Mode(_) => R::InvalidArgument,
        FfiError::BufferTooSmall { .. } => R::BufferTooSmall,
        FfiError::Transport(t) => match t {
            TransportError::Firmware { .. } | TransportError::LengthAnswer { .. } => {
                R::FirmwareError
            }
            TransportError::Kernel { .. } => R::KernelError,
            TransportError::Refused(_) | TransportError::PolicyMismatch { .. } => R::Refused,
            TransportError::State { .. } => R::BadState,
            TransportError::Wire(_)
            | TransportError::GpaMismatch { .. }
            | TransportError::HdrLenMismatch { .. } => R::BadStream,
            TransportError::Gpa { .. } => R::InvalidArgument,
            TransportError::BufferTooSmall { .. } => R::BufferTooSmall,
        },
    }
}

impl TransportHandle {
    fn new(fw: Arc<dyn MemoryEncryptOp>) -> TransportHandle {
        TransportHandle {
            t: SevTransport::new(fw),
            record: Mutex::new(None),
            last_error: Mutex::new(None),
            last_fw_status: AtomicU32::new(0),
        }
    }

    fn fail(&self, e: FfiError) -> pagenc_transport_result {
        let status = match &e {
            FfiError::Transport(TransportError::Firmware { status, .. }) => status.0,
            _ => 0,
        };
        self.last_fw_status.store(status, Ordering::Relaxed);
        let c = code(&e);
        *lock(&self.last_error) = Some(e);
        c
    }

    fn result(&self, r: Result<(), TransportError>) -> pagenc_transport_result {
        match r {
            Ok(()) => pagenc_transport_result::Ok,
            Err(e) => self.fail(FfiError::Transport(e)),
        }
    }
}

/// A lock whose value is always whole (replaced in one assignment): poisoning is ignored.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn mode_of(mode: u32) -> Option<SevMode> {
    match mode {
        PAGENC_SEV_MODE_SEV => Some(SevMode::Sev),
        PAGENC_SEV_MODE_SEV_ES => Some(SevMode::SevEs),
        PAGENC_SEV_MODE_SEV_SNP => Some(SevMode::SevSnp),
        _ => None,
    }
}

/// A C `(ptr, len)` input blob as a slice; NULL with length 0 is the empty slice.
///
/// # Safety
/// A non-NULL `p` points to `len` readable bytes for the lifetime `'a`.
unsafe fn in_slice<'a>(p: *const u8, len: usize) -> Option<&'a [u8]> {
    if p.is_null() {
        return (len == 0).then_some(&[]);
    }
    // SAFETY: per the contract.
    Some(unsafe { std::slice::from_raw_parts(p, len) })
}

/// Copies `bytes` into a caller's buffer: `BufferTooSmall` (with the size needed in
/// `*written`) when it does not fit.
///
/// # Safety
/// `buf` is NULL or points to `len` writable bytes; `written` is writable.
unsafe fn copy_out(
    bytes: &[u8],
    buf: *mut u8,
    len: usize,
    written: *mut usize,
) -> pagenc_transport_result {
    // SAFETY: per the contract, `written` is writable.
    unsafe { written.write(bytes.len()) };
    if buf.is_null() || len < bytes.len() {
        return pagenc_transport_result::BufferTooSmall;
    }
    // SAFETY: per the contract, `buf` has `len >= bytes.len()` writable bytes.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf, bytes.len()) };
    pagenc_transport_result::Ok
}

/// A short, static description of a transport result code. Any value is accepted ("unknown
/// pagenc_transport_result" for others). Any thread.
#[no_mangle]
pub extern "C" fn pagenc_transport_result_str(result: c_int) -> *const c_char {
    ffi_boundary! {
        pagenc_transport_result::ALL
            .iter()
            .find(|r| **r as c_int == result)
            .map_or(c"unknown pagenc_transport_result", |r| r.text())
            .as_ptr()
    }
}

// ------------------------------------------------------------------------------------------
// The simulated firmware.

/// The set-up of a simulated SEV firmware.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct pagenc_simfw_config {
    /// `PAGENC_SIMFW_ROLE_SOURCE` or `PAGENC_SIMFW_ROLE_DESTINATION`.
    pub role: u32,
    /// The source guest's launch policy (what SEND_START reports); ignored on a destination.
    pub policy: u32,
    /// The guest's memory key; all zeros: RAM holds plaintext (identity mode).
    pub memory_key: [u8; 32],
    /// The simulated platform's identity (its PDH).
    pub platform_id: [u8; 32],
}

/// One guest RAM mapping (as a KVM memslot): `size` bytes of guest physical memory at `gpa`,
/// mapped at `host` in this process. All three 4 KiB aligned.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct pagenc_memslot {
    /// Guest physical address.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// Host address of the mapping.
    pub host: *mut c_void,
}

/// Commands a simulated firmware carried out.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct pagenc_simfw_stats {
    /// SEND_START.
    pub send_start: u64,
    /// SEND_UPDATE_DATA: pages sent through the firmware.
    pub send_update_data: u64,
    /// SEND_FINISH.
    pub send_finish: u64,
    /// SEND_CANCEL.
    pub send_cancel: u64,
    /// RECEIVE_START.
    pub receive_start: u64,
    /// RECEIVE_UPDATE_DATA: pages received through the firmware.
    pub receive_update_data: u64,
    /// RECEIVE_FINISH.
    pub receive_finish: u64,
    /// Length queries answered.
    pub length_queries: u64,
    /// Commands failed (length queries excluded).
    pub failures: u64,
}

/// # Safety
/// `slots` is NULL with `n` 0, or points to `n` readable entries.
unsafe fn memslots(slots: *const pagenc_memslot, n: usize) -> Option<Vec<Memslot>> {
    if slots.is_null() {
        return (n == 0).then(Vec::new);
    }
    // SAFETY: per the contract.
    let s = unsafe { std::slice::from_raw_parts(slots, n) };
    Some(
        s.iter()
            .map(|m| Memslot {
                gpa: m.gpa,
                size: m.size,
                host: m.host as usize as u64,
            })
            .collect(),
    )
}

/// Makes a simulated SEV firmware for one guest. **Tests only**: `opt_in` must be the string
/// "x-sev-simulated-firmware" (the name of the QEMU property that selects it), or the call is
/// refused; it never touches a VM fd or `/dev/sev`.
///
/// `slots` (`n` entries, NULL if 0) is the guest RAM it may reach, as KVM's memslots: it maps a
/// command's host address to a GPA through it (the modelled encryption depends on the GPA).
///
/// Returns `PAGENC_TRANSPORT_RESULT_OK` and `*out`; `INVALID_ARGUMENT` for a wrong opt-in, an
/// unknown role, or a bad memslot table (empty, unaligned, wrapping, overlapping slots), with
/// the reason in `msg` (nullable, `msg_len` bytes, NUL-terminated, truncated if needed).
///
/// # Safety
/// `opt_in` is NULL or a NUL-terminated string; `cfg` is NULL or readable; `slots` points to
/// `n` readable entries (or is NULL with `n` 0); every slot's `[host, host + size)` stays
/// mapped, readable and writable until the firmware is freed or given other slots; `out` is
/// NULL or writable; `msg` is NULL or points to `msg_len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn pagenc_simfw_new(
    opt_in: *const c_char,
    cfg: *const pagenc_simfw_config,
    slots: *const pagenc_memslot,
    n: usize,
    out: *mut *mut pagenc_simfw,
    msg: *mut c_char,
    msg_len: usize,
) -> pagenc_transport_result {
    ffi_boundary! {
        // SAFETY: the contract: `msg` is NULL or points to `msg_len` writable bytes.
        let msg = unsafe { out_buf(msg, msg_len) };
        // SAFETY: the contract (every pointer argument).
        match unsafe { simfw_new(opt_in, cfg, slots, n) } {
            Ok(fw) => {
                let Some(out) = std::ptr::NonNull::new(out) else {
                    write_message(msg, &"argument `out` is NULL; it is required");
                    return pagenc_transport_result::NullArgument;
                };
                // SAFETY: the contract: `out` is writable.
                unsafe { out.as_ptr().write(arc_into_ptr::<pagenc_simfw>(fw)) };
                write_message(msg, &"");
                pagenc_transport_result::Ok
            }
            Err((code, m)) => {
                write_message(msg, &m);
                code
            }
        }
    }
}

/// `pagenc_simfw_new` without its outputs.
///
/// # Safety
/// As for `pagenc_simfw_new`.
unsafe fn simfw_new(
    opt_in: *const c_char,
    cfg: *const pagenc_simfw_config,
    slots: *const pagenc_memslot,
    n: usize,
) -> Result<SimFirmware, (pagenc_transport_result, String)> {
    let null = |what: &str| {
        (
            pagenc_transport_result::NullArgument,
            format!("argument `{what}` is NULL; it is required"),
        )
    };
    if opt_in.is_null() {
        return Err(null("opt_in"));
    }
    if cfg.is_null() {
        return Err(null("cfg"));
    }
    // SAFETY: the contract: a NUL-terminated string.
    let opt_in = unsafe { CStr::from_ptr(opt_in) }.to_string_lossy();
    // SAFETY: the contract: readable.
    let cfg = unsafe { cfg.read() };
    let role = match cfg.role {
        PAGENC_SIMFW_ROLE_SOURCE => SimRole::Source,
        PAGENC_SIMFW_ROLE_DESTINATION => SimRole::Destination,
        r => {
            return Err((
                pagenc_transport_result::InvalidArgument,
                format!("role {r} is unknown; allowed: 0 (source), 1 (destination)"),
            ))
        }
    };
    // SAFETY: the contract: `slots` has `n` readable entries or is NULL with 0.
    let Some(slots) = (unsafe { memslots(slots, n) }) else {
        return Err(null("slots (with n > 0)"));
    };
    let config = SimConfig {
        role,
        policy: cfg.policy,
        memory_key: cfg.memory_key,
        platform_id: cfg.platform_id,
    };
    // SAFETY: the contract: the slots' memory stays mapped until free or set_memslots.
    unsafe { SimFirmware::new(&opt_in, config, &slots) }
        .map_err(|e| (pagenc_transport_result::InvalidArgument, e.to_string()))
}

/// Replaces the simulated firmware's memslot table (memory hotplug). A refused table
/// (`INVALID_ARGUMENT`, reason in `msg`) leaves the old one. Any thread.
///
/// # Safety
/// As for `pagenc_simfw_new`'s `slots`, `msg`; `fw` is NULL or a live simulated firmware.
#[no_mangle]
pub unsafe extern "C" fn pagenc_simfw_set_memslots(
    fw: *const pagenc_simfw,
    slots: *const pagenc_memslot,
    n: usize,
    msg: *mut c_char,
    msg_len: usize,
) -> pagenc_transport_result {
    ffi_boundary! {
        let fw = try_ref!(fw);
        // SAFETY: the contract: `msg` is NULL or points to `msg_len` writable bytes.
        let msg = unsafe { out_buf(msg, msg_len) };
        // SAFETY: the contract: `slots` has `n` readable entries or is NULL with 0.
        let Some(slots) = (unsafe { memslots(slots, n) }) else {
            write_message(msg, &"slots is NULL but n is not 0");
            return pagenc_transport_result::NullArgument;
        };
        // SAFETY: the contract: the slots' memory stays mapped.
        match unsafe { fw.set_memslots(&slots) } {
            Ok(()) => {
                write_message(msg, &"");
                pagenc_transport_result::Ok
            }
            Err(e) => {
                write_message(msg, &e);
                pagenc_transport_result::InvalidArgument
            }
        }
    }
}

/// Frees a simulated firmware (NULL is fine). A transport made from it keeps it alive until the
/// transport is freed too.
///
/// # Safety
/// `fw` is NULL or a simulated firmware the caller owns and never uses again.
#[no_mangle]
pub unsafe extern "C" fn pagenc_simfw_free(fw: *mut pagenc_simfw) {
    ffi_boundary! {
        // SAFETY: the contract.
        unsafe { free_arc(fw) }
    }
}

/// Whether the VMM may run the guest's vCPUs: true while the firmware's guest state is RUNNING
/// or SUPDATE; false on a destination before RECEIVE_FINISH and on a source after SEND_FINISH.
/// A VMM asserts it before starting the vCPUs. False for NULL. Any thread.
///
/// # Safety
/// `fw` is NULL or a live simulated firmware.
#[no_mangle]
pub unsafe extern "C" fn pagenc_simfw_guest_may_run(fw: *const pagenc_simfw) -> bool {
    ffi_boundary! {
        let fw = try_ref!(fw);
        fw.guest_may_run()
    }
}

/// The firmware's guest state as the SEV API numbers it: 0 UNINIT, 3 RUNNING, 4 SUPDATE,
/// 5 RUPDATE, 6 SENT. 0 for NULL. Any thread.
///
/// # Safety
/// `fw` is NULL or a live simulated firmware.
#[no_mangle]
pub unsafe extern "C" fn pagenc_simfw_guest_state(fw: *const pagenc_simfw) -> u32 {
    ffi_boundary! {
        // SAFETY: the contract: `fw` is NULL or a live simulated firmware.
        match unsafe { super::handle::try_ref(fw) } {
            Some(fw) => fw.guest_state() as u32,
            None => 0,
        }
    }
}

/// The commands carried out so far, into `*out`. Any thread.
///
/// # Safety
/// `fw` is NULL or a live simulated firmware; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn pagenc_simfw_get_stats(
    fw: *const pagenc_simfw,
    out: *mut pagenc_simfw_stats,
) -> pagenc_transport_result {
    ffi_boundary! {
        let fw = try_ref!(fw);
        let out = try_nonnull!(out);
        let s = fw.stats();
        let c = pagenc_simfw_stats {
            send_start: s.send_start,
            send_update_data: s.send_update_data,
            send_finish: s.send_finish,
            send_cancel: s.send_cancel,
            receive_start: s.receive_start,
            receive_update_data: s.receive_update_data,
            receive_finish: s.receive_finish,
            length_queries: s.length_queries,
            failures: s.failures,
        };
        // SAFETY: the contract: `out` is writable.
        unsafe { out.as_ptr().write(c) };
        pagenc_transport_result::Ok
    }
}

/// Makes the next command `cmd_id` (a `KVM_SEV_*` id) fail in the simulated firmware with
/// firmware status `status` (an `SEV_RET_*` code), once; 0 clears a pending injection. For
/// tests of failure paths. Any thread.
///
/// # Safety
/// `fw` is NULL or a live simulated firmware.
#[no_mangle]
pub unsafe extern "C" fn pagenc_simfw_inject_failure(
    fw: *const pagenc_simfw,
    cmd_id: u32,
    status: u32,
) -> pagenc_transport_result {
    ffi_boundary! {
        let fw = try_ref!(fw);
        fw.inject_failure(cmd_id, status);
        pagenc_transport_result::Ok
    }
}

/// `pagenc_simfw_cert`'s `kind`: this platform's PDH certificate (a real host exports it with
/// `SEV_PDH_CERT_EXPORT`).
pub const PAGENC_SIMFW_CERT_PDH: u32 = 0;
/// `pagenc_simfw_cert`'s `kind`: this platform's certificate chain (PEK, OCA, CEK).
pub const PAGENC_SIMFW_CERT_PLATFORM: u32 = 1;
/// `pagenc_simfw_cert`'s `kind`: the AMD chain (ARK, ASK) every simulated platform accepts.
pub const PAGENC_SIMFW_CERT_AMD: u32 = 2;

/// Copies one of the simulated platform's certificates (`kind`: 0 PDH, 1 platform chain,
/// 2 AMD chain) into `buf` and its length into `*written`; `BUFFER_TOO_SMALL` (with the length
/// in `*written`) when `len` is too small, `INVALID_ARGUMENT` for another `kind`. Any thread.
///
/// # Safety
/// `fw` is NULL or a live simulated firmware; `buf` is NULL or points to `len` writable bytes;
/// `written` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn pagenc_simfw_cert(
    fw: *const pagenc_simfw,
    kind: u32,
    buf: *mut u8,
    len: usize,
    written: *mut usize,
) -> pagenc_transport_result {
    ffi_boundary! {
        let fw = try_ref!(fw);
        let written = try_nonnull!(written);
        let bytes = match kind {
            PAGENC_SIMFW_CERT_PDH => fw.pdh_cert(),
            PAGENC_SIMFW_CERT_PLATFORM => fw.platform_certs(),
            PAGENC_SIMFW_CERT_AMD => sim_amd_certs(),
            _ => return pagenc_transport_result::InvalidArgument,
        };
        // SAFETY: the contract: `buf` has `len` writable bytes or is NULL; `written` writable.
        unsafe { copy_out(&bytes, buf, len, written.as_ptr()) }
    }
}

// ------------------------------------------------------------------------------------------
// The transport.

/// A transport over the real kernel: `KVM_MEMORY_ENCRYPT_OP` on `vm_fd`, with `sev_fd` (the
/// `/dev/sev` fd) in every command. **Never run on SEV hardware** (see docs/transport.md).
/// pagenc neither keeps nor closes the fds beyond the transport's life. Returns
/// `INVALID_ARGUMENT` for a negative `vm_fd`. Any thread.
///
/// # Safety
/// `vm_fd` and `sev_fd` stay open until the transport is freed; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn pagenc_transport_new_kvm(
    vm_fd: c_int,
    sev_fd: c_int,
    out: *mut *mut pagenc_transport,
) -> pagenc_transport_result {
    ffi_boundary! {
        let out = try_nonnull!(out);
        if vm_fd < 0 {
            return pagenc_transport_result::InvalidArgument;
        }
        // SAFETY: the contract: both fds stay open until the transport is freed.
        let vm = unsafe { KvmVm::new(vm_fd, sev_fd) };
        let h = TransportHandle::new(Arc::new(vm));
        // SAFETY: the contract: `out` is writable.
        unsafe { out.as_ptr().write(arc_into_ptr::<pagenc_transport>(h)) };
        pagenc_transport_result::Ok
    }
}

/// A transport over a simulated firmware (which it keeps alive). Any thread.
///
/// # Safety
/// `fw` is NULL or a live simulated firmware; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn pagenc_transport_new_simfw(
    fw: *const pagenc_simfw,
    out: *mut *mut pagenc_transport,
) -> pagenc_transport_result {
    ffi_boundary! {
        let out = try_nonnull!(out);
        // SAFETY: the contract: `fw` is NULL or a live simulated firmware.
        let Some(fw) = (unsafe { super::handle::try_clone_arc(fw) }) else {
            return pagenc_transport_result::NullArgument;
        };
        let h = TransportHandle::new(fw);
        // SAFETY: the contract: `out` is writable.
        unsafe { out.as_ptr().write(arc_into_ptr::<pagenc_transport>(h)) };
        pagenc_transport_result::Ok
    }
}

/// Frees a transport (NULL is fine). It does not cancel or finish a session: the VMM calls
/// `pagenc_transport_send_cancel` on a failed migration first.
///
/// # Safety
/// `t` is NULL or a transport the caller owns, not in use by another thread, never used again.
#[no_mangle]
pub unsafe extern "C" fn pagenc_transport_free(t: *mut pagenc_transport) {
    ffi_boundary! {
        // SAFETY: the contract.
        unsafe { free_arc(t) }
    }
}

/// The detailed message of the last failure on `t` (what was wrong, with which value; the
/// command and the firmware's status code for firmware failures), NUL-terminated into `buf`
/// (at most `len - 1` bytes); returns its full length. "" and 0 if nothing failed yet or `t`
/// is NULL. With several threads it may be another thread's failure. Any thread.
///
/// # Safety
/// `t` is NULL or a live transport; `buf` is NULL or points to `len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn pagenc_transport_last_error(
    t: *const pagenc_transport,
    buf: *mut c_char,
    len: usize,
) -> usize {
    ffi_boundary! {
        // SAFETY: the contract.
        let buf = unsafe { out_buf(buf, len) };
        // SAFETY: the contract.
        let Some(t) = (unsafe { super::handle::try_ref(t) }) else {
            return write_message(buf, &"");
        };
        match &*lock(&t.last_error) {
            Some(e) => write_message(buf, e),
            None => write_message(buf, &""),
        }
    }
}

/// The SEV firmware status (`SEV_RET_*`) of the last failure on `t`, if it was a firmware
/// failure (`PAGENC_TRANSPORT_RESULT_FIRMWARE_ERROR`); 0 otherwise or for NULL. Any thread.
///
/// # Safety
/// `t` is NULL or a live transport.
#[no_mangle]
pub unsafe extern "C" fn pagenc_transport_last_fw_status(t: *const pagenc_transport) -> u32 {
    ffi_boundary! {
        // SAFETY: the contract: `t` is NULL or a live transport.
        match unsafe { super::handle::try_ref(t) } {
            Some(t) => t.last_fw_status.load(Ordering::Relaxed),
            None => 0,
        }
    }
}

/// What the source needs for SEND_START. Every blob is `(pointer, length)`, 1..16384 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct pagenc_transport_send_params {
    /// The guest policy as configured (QEMU: `sev-guest,policy=`).
    pub policy: u32,
    /// `PAGENC_SEV_MODE_*`.
    pub mode: u32,
    /// This (source) platform's PDH certificate; travels in the session record.
    pub src_pdh: *const u8,
    /// Its length.
    pub src_pdh_len: usize,
    /// The destination platform's PDH certificate.
    pub dst_pdh: *const u8,
    /// Its length.
    pub dst_pdh_len: usize,
    /// The destination platform's certificate chain.
    pub dst_plat_certs: *const u8,
    /// Its length.
    pub dst_plat_certs_len: usize,
    /// The AMD certificate chain (ARK, ASK).
    pub amd_certs: *const u8,
    /// Its length.
    pub amd_certs_len: usize,
}

/// Source set-up: refuses SNP, SEV-ES (mode or policy bit 2) and NOSEND (policy bit 3) with
/// `REFUSED` before anything reaches the firmware; then SEND_START (after its session-length
/// query), a check of the policy the firmware reports, and the packet header length query.
/// The session record is kept for `pagenc_transport_session_record`. On a failure after
/// SEND_START succeeded, SEND_CANCEL is issued: the source guest may run on. Call once per
/// migration, from one thread (the migration thread's setup).
///
/// # Safety
/// `t` is NULL or a live transport; `p` is NULL or readable, and its blobs point to their
/// lengths of readable bytes.
#[no_mangle]
pub unsafe extern "C" fn pagenc_transport_send_setup(
    t: *const pagenc_transport,
    p: *const pagenc_transport_send_params,
) -> pagenc_transport_result {
    ffi_boundary! {
        let t = try_ref!(t);
        let p = try_nonnull!(p);
        // SAFETY: the contract: readable.
        let p = unsafe { p.as_ptr().read() };
        let Some(mode) = mode_of(p.mode) else {
            return t.fail(FfiError::Mode(p.mode));
        };
        // SAFETY: the contract: each blob points to its length of readable bytes.
        let blobs = unsafe {
            (
                in_slice(p.src_pdh, p.src_pdh_len),
                in_slice(p.dst_pdh, p.dst_pdh_len),
                in_slice(p.dst_plat_certs, p.dst_plat_certs_len),
                in_slice(p.amd_certs, p.amd_certs_len),
            )
        };
        let (Some(src_pdh), Some(dst_pdh), Some(dst_plat_certs), Some(amd_certs)) = blobs else {
            return t.fail(FfiError::Null("a certificate pointer with a non-zero length"));
        };
        let r = t.t.send_start(&SendParams {
            policy: p.policy,
            mode,
            src_pdh,
            dst_pdh,
            dst_plat_certs,
            amd_certs,
        });
        match r.and_then(|rec| rec.encode().map_err(TransportError::from)) {
            Ok(bytes) => {
                *lock(&t.record) = Some(bytes);
                pagenc_transport_result::Ok
            }
            Err(e) => t.fail(FfiError::Transport(e)),
        }
    }
}

/// Copies the session record of the last successful send set-up into `buf` (it must reach the
/// destination before the first page) and its length into `*written`; `BUFFER_TOO_SMALL` with
/// the length in `*written` if `len` is too small (at most `PAGENC_TRANSPORT_SESSION_MAX`),
/// `BAD_STATE` before a send set-up. May be called again. Any thread.
///
/// # Safety
/// `t` is NULL or a live transport; `buf` is NULL or points to `len` writable bytes; `written`
/// is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn pagenc_transport_session_record(
    t: *const pagenc_transport,
    buf: *mut u8,
    len: usize,
    written: *mut usize,
) -> pagenc_transport_result {
    ffi_boundary! {
        let t = try_ref!(t);
        let written = try_nonnull!(written);
        let rec = lock(&t.record).clone();
        let Some(rec) = rec else {
            return t.fail(FfiError::Transport(TransportError::State {
                op: "session record",
                phase: "without a session record",
                needs: "a successful send setup",
            }));
        };
        // SAFETY: the contract.
        let r = unsafe { copy_out(&rec, buf, len, written.as_ptr()) };
        if r == pagenc_transport_result::BufferTooSmall {
            return t.fail(FfiError::BufferTooSmall { needed: rec.len(), len });
        }
        r
    }
}

/// The length of every packet `pagenc_transport_send_page` writes in the current session (0
/// before set-up); never more than `PAGENC_TRANSPORT_PACKET_MAX`. Any thread.
///
/// # Safety
/// `t` is NULL or a live transport.
#[no_mangle]
pub unsafe extern "C" fn pagenc_transport_packet_len(t: *const pagenc_transport) -> usize {
    ffi_boundary! {
        let t = try_ref!(t);
        t.t.packet_len()
    }
}

/// Source: sends the encrypted page at guest physical address `gpa`, mapped at `host` (4 KiB
/// aligned guest RAM), through SEND_UPDATE_DATA: writes the packet (prefix, firmware header,
/// ciphertext; docs/transport.md) into `buf` and its length into `*written`.
/// `BUFFER_TOO_SMALL` (size needed in `*written`), `INVALID_ARGUMENT` for an unaligned gpa or
/// one past 2^52, `BAD_STATE` outside a session, `FIRMWARE_ERROR` / `KERNEL_ERROR` with the
/// command, code and page in the message. Any number of threads at once (multifd channels).
///
/// # Safety
/// `t` is NULL or a live transport; `host` is the address of a page of this guest's RAM,
/// mapped for the call; `buf` is NULL or points to `len` writable bytes; `written` is NULL or
/// writable.
#[no_mangle]
pub unsafe extern "C" fn pagenc_transport_send_page(
    t: *const pagenc_transport,
    gpa: u64,
    host: *const c_void,
    buf: *mut u8,
    len: usize,
    written: *mut usize,
) -> pagenc_transport_result {
    ffi_boundary! {
        let t = try_ref!(t);
        let written = try_nonnull!(written);
        if host.is_null() {
            return t.fail(FfiError::Null("host"));
        }
        let out: &mut [u8] = if buf.is_null() {
            &mut []
        } else {
            // SAFETY: the contract: `buf` points to `len` writable bytes.
            unsafe { std::slice::from_raw_parts_mut(buf, len) }
        };
        // SAFETY: the contract: `host` is a mapped page of this guest's RAM.
        match unsafe { t.t.send_page(gpa, host as usize as u64, out) } {
            Ok(n) => {
                // SAFETY: the contract: writable.
                unsafe { written.as_ptr().write(n) };
                pagenc_transport_result::Ok
            }
            Err(e) => {
                if let TransportError::BufferTooSmall { needed, .. } = e {
                    // SAFETY: the contract: writable.
                    unsafe { written.as_ptr().write(needed) };
                }
                t.fail(FfiError::Transport(e))
            }
        }
    }
}

/// Source: SEND_FINISH, only after the destination confirmed it loaded everything (return
/// path): the source guest must never run again afterwards. Any thread, once.
///
/// # Safety
/// `t` is NULL or a live transport.
#[no_mangle]
pub unsafe extern "C" fn pagenc_transport_send_finish(
    t: *const pagenc_transport,
) -> pagenc_transport_result {
    ffi_boundary! {
        let t = try_ref!(t);
        t.result(t.t.send_finish())
    }
}

/// Source: SEND_CANCEL after a failed or cancelled migration, so the source guest runs on. OK
/// without a session (nothing to undo). Any thread.
///
/// # Safety
/// `t` is NULL or a live transport.
#[no_mangle]
pub unsafe extern "C" fn pagenc_transport_send_cancel(
    t: *const pagenc_transport,
) -> pagenc_transport_result {
    ffi_boundary! {
        let t = try_ref!(t);
        let r = t.t.send_cancel();
        if r.is_ok() {
            *lock(&t.record) = None;
        }
        t.result(r)
    }
}

/// Destination set-up: checks the session record (`BAD_STREAM` with the field, value and limit
/// for a malformed one), refuses SNP/SEV-ES/NOSEND and a record whose policy differs from the
/// configured `policy` (`REFUSED`), then RECEIVE_START. Before any page.
///
/// # Safety
/// `t` is NULL or a live transport; `record` points to `len` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn pagenc_transport_recv_setup(
    t: *const pagenc_transport,
    policy: u32,
    mode: u32,
    record: *const u8,
    len: usize,
) -> pagenc_transport_result {
    ffi_boundary! {
        let t = try_ref!(t);
        let Some(mode) = mode_of(mode) else {
            return t.fail(FfiError::Mode(mode));
        };
        // SAFETY: the contract.
        let Some(record) = (unsafe { in_slice(record, len) }) else {
            return t.fail(FfiError::Null("record"));
        };
        t.result(t.t.receive_start(record, mode, policy))
    }
}

/// Checks a packet's fixed prefix (`PAGENC_TRANSPORT_PACKET_PREFIX` bytes of `prefix`, `len`
/// at least that) and writes the whole packet's length to `*total`, so that a receiver reads
/// exactly that many bytes (never more than `PAGENC_TRANSPORT_PACKET_MAX`). `BAD_STREAM` for a
/// malformed prefix (message on `t`). Any thread.
///
/// # Safety
/// `t` is NULL or a live transport; `prefix` points to `len` readable bytes; `total` is NULL or
/// writable.
#[no_mangle]
pub unsafe extern "C" fn pagenc_transport_packet_size(
    t: *const pagenc_transport,
    prefix: *const u8,
    len: usize,
    total: *mut usize,
) -> pagenc_transport_result {
    ffi_boundary! {
        let t = try_ref!(t);
        let total = try_nonnull!(total);
        // SAFETY: the contract.
        let Some(prefix) = (unsafe { in_slice(prefix, len) }) else {
            return t.fail(FfiError::Null("prefix"));
        };
        match PacketPrefix::decode(prefix) {
            Ok(p) => {
                // SAFETY: the contract: writable.
                unsafe { total.as_ptr().write(p.packet_len()) };
                pagenc_transport_result::Ok
            }
            Err(e) => t.fail(FfiError::Transport(e.into())),
        }
    }
}

/// Destination: loads one packet into the page at guest physical address `gpa`, mapped at
/// `host`, through RECEIVE_UPDATE_DATA. The packet must be for that gpa (`BAD_STREAM`
/// otherwise); the firmware checks its integrity before writing guest memory (a damaged packet
/// gives `FIRMWARE_ERROR`, status `SEV_RET_BAD_MEASUREMENT` in the simulation, and leaves the
/// page unchanged). Any number of threads at once.
///
/// # Safety
/// `t` is NULL or a live transport; `host` is the address of a page of this guest's RAM,
/// mapped for the call; `packet` points to `len` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn pagenc_transport_recv_page(
    t: *const pagenc_transport,
    gpa: u64,
    host: *mut c_void,
    packet: *const u8,
    len: usize,
) -> pagenc_transport_result {
    ffi_boundary! {
        let t = try_ref!(t);
        if host.is_null() {
            return t.fail(FfiError::Null("host"));
        }
        // SAFETY: the contract.
        let Some(packet) = (unsafe { in_slice(packet, len) }) else {
            return t.fail(FfiError::Null("packet"));
        };
        // SAFETY: the contract: `host` is a mapped page of this guest's RAM.
        t.result(unsafe { t.t.receive_page(gpa, host as usize as u64, packet) })
    }
}

/// Destination: RECEIVE_FINISH after the last page and before the guest first runs.
///
/// # Safety
/// `t` is NULL or a live transport.
#[no_mangle]
pub unsafe extern "C" fn pagenc_transport_recv_finish(
    t: *const pagenc_transport,
) -> pagenc_transport_result {
    ffi_boundary! {
        let t = try_ref!(t);
        t.result(t.t.receive_finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::wire::{PACKET_MAX_LEN, PACKET_PREFIX_LEN, SESSION_MAX_LEN};

    #[test]
    fn codes_are_dense_and_named() {
        for (i, r) in pagenc_transport_result::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
            // SAFETY: a static NUL-terminated string.
            let s = unsafe { CStr::from_ptr(pagenc_transport_result_str(*r as c_int)) };
            assert_ne!(s.to_bytes(), b"unknown pagenc_transport_result");
        }
        // SAFETY: as above.
        let s = unsafe { CStr::from_ptr(pagenc_transport_result_str(10)) };
        assert_eq!(s.to_bytes(), b"unknown pagenc_transport_result");
    }

    #[test]
    fn header_constants_are_the_wire_format_s() {
        // Written as literals for cbindgen, which cannot see the wire module.
        assert_eq!(PAGENC_TRANSPORT_PACKET_MAX, PACKET_MAX_LEN);
        assert_eq!(PAGENC_TRANSPORT_PACKET_PREFIX, PACKET_PREFIX_LEN);
        assert_eq!(PAGENC_TRANSPORT_SESSION_MAX, SESSION_MAX_LEN);
    }

    #[test]
    fn the_opt_in_constant_is_the_documented_name() {
        assert_eq!(crate::transport::SIM_OPT_IN, "x-sev-simulated-firmware");
    }
}
