//! The SEV implementation of the transport: the marshalling of `KVM_SEV_SEND_*` and
//! `KVM_SEV_RECEIVE_*` over any [`MemoryEncryptOp`] (the kernel, or the simulated firmware), and
//! the wire format around what the firmware produces.
//!
//! The transport keeps a small phase of its own (idle, sending, sent, receiving, received) to
//! refuse calls in the wrong order with a clear message before the firmware is bothered; the
//! firmware's own state machine stays the authority (a page racing a finish on another thread
//! gets the firmware's `INVALID_GUEST_STATE`).
//!
//! Threads: every method takes `&self`. Page calls read the phase under a short lock and then
//! call the firmware without it, so several multifd channel threads can send or receive at
//! once; the commands themselves are serialised below (KVM's `kvm->lock`, the PSP's one queue,
//! or the simulated firmware's lock).

use std::sync::{Arc, Mutex, MutexGuard};

use super::encrypt_op::MemoryEncryptOp;
use super::error::{PageCtx, Refusal, SevMode, TransportError};
use super::sev_abi::{
    cmd, kvm_sev_cmd, kvm_sev_receive_start, kvm_sev_receive_update_data, kvm_sev_send_start,
    kvm_sev_send_update_data, policy, status, SevCmd, SevStatus, FW_BLOB_MAX, PAGE_SIZE,
};
use super::wire::{
    Packet, PacketPrefix, SessionRecord, WireError, GPA_LIMIT, PACKET_HDR_MAX, PACKET_PREFIX_LEN,
    PACKET_TRANS_MAX,
};

/// What SEND_START needs: the guest's policy as configured, and the certificates of both
/// platforms.
#[derive(Debug, Clone, Copy)]
pub struct SendParams<'a> {
    /// The guest's policy as the VMM configured it (QEMU: `sev-guest,policy=`). Checked
    /// against NOSEND/ES before anything is sent, and against what the firmware reports.
    pub policy: u32,
    /// The kind of guest.
    pub mode: SevMode,
    /// This (source) platform's PDH certificate; it travels in the session record, and the
    /// destination hands it to RECEIVE_START.
    pub src_pdh: &'a [u8],
    /// The destination platform's PDH certificate (SEND_START's `pdh_cert`).
    pub dst_pdh: &'a [u8],
    /// The destination platform's certificate chain (PEK, OCA, CEK: `plat_certs`).
    pub dst_plat_certs: &'a [u8],
    /// The AMD certificate chain (ARK, ASK: `amd_certs`).
    pub amd_certs: &'a [u8],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    Sending { hdr_len: u32 },
    Sent,
    Receiving { hdr_len: u32 },
    Received,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Idle => "idle (no session)",
            Phase::Sending { .. } => "sending (after SEND_START)",
            Phase::Sent => "finished sending (after SEND_FINISH)",
            Phase::Receiving { .. } => "receiving (after RECEIVE_START)",
            Phase::Received => "finished receiving (after RECEIVE_FINISH)",
        }
    }
}

/// The SEV transport of one guest. See the module documentation.
#[derive(Debug)]
pub struct SevTransport {
    fw: Arc<dyn MemoryEncryptOp>,
    phase: Mutex<Phase>,
}

fn refuse_mode(mode: SevMode, policy_word: u32) -> Result<(), Refusal> {
    match mode {
        SevMode::SevSnp => Err(Refusal::Snp),
        SevMode::SevEs => Err(Refusal::SevEs {
            policy: policy_word,
        }),
        SevMode::Sev if policy_word & policy::ES != 0 => Err(Refusal::SevEs {
            policy: policy_word,
        }),
        SevMode::Sev => Ok(()),
    }
}

fn blob_len(field: &'static str, b: &[u8]) -> Result<u32, TransportError> {
    match u32::try_from(b.len()) {
        Ok(n) if (1..=FW_BLOB_MAX).contains(&n) => Ok(n),
        _ => Err(WireError::Length {
            field,
            value: b.len() as u64,
            min: 1,
            max: FW_BLOB_MAX.into(),
        }
        .into()),
    }
}

fn ptr(b: &[u8]) -> u64 {
    b.as_ptr() as usize as u64
}

impl SevTransport {
    /// A transport over `fw`.
    pub fn new(fw: Arc<dyn MemoryEncryptOp>) -> SevTransport {
        SevTransport {
            fw,
            phase: Mutex::new(Phase::Idle),
        }
    }

    /// The entry point it uses.
    pub fn firmware(&self) -> &Arc<dyn MemoryEncryptOp> {
        &self.fw
    }

    fn phase(&self) -> MutexGuard<'_, Phase> {
        // The phase is a Copy value replaced whole; a panic cannot leave it half-written.
        self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Issues `id` with argument `arg`.
    ///
    /// # Safety
    /// Every address in `arg` names memory valid for its length for the call (inputs readable,
    /// outputs writable), and `guest_uaddr`, if any, lies in the VM's guest RAM.
    unsafe fn issue<T>(
        &self,
        id: u32,
        arg: &mut T,
        page: Option<PageCtx>,
    ) -> Result<(), TransportError> {
        let mut c = kvm_sev_cmd {
            id,
            data: arg as *mut T as usize as u64,
            ..Default::default()
        };
        // SAFETY: `c.data` is `arg`, the live argument structure of `id`; the caller promises
        // the addresses inside it.
        match unsafe { self.fw.memory_encrypt_op(&mut c) } {
            Ok(()) => Ok(()),
            Err(errno) if c.error != status::SUCCESS => Err(TransportError::Firmware {
                cmd: SevCmd(id),
                status: SevStatus(c.error),
                errno,
                via: self.fw.describe(),
                page,
            }),
            Err(errno) => Err(TransportError::Kernel {
                cmd: SevCmd(id),
                errno,
                via: self.fw.describe(),
                page,
            }),
        }
    }

    /// A length query: the call is expected to fail with `SEV_RET_INVALID_LEN` after writing the
    /// lengths (a success is accepted too); anything else is the command's error.
    ///
    /// # Safety
    /// As for [`SevTransport::issue`]; a query carries no addresses the firmware dereferences.
    unsafe fn query<T>(&self, id: u32, arg: &mut T) -> Result<(), TransportError> {
        // SAFETY: the caller's contract.
        match unsafe { self.issue(id, arg, None) } {
            Ok(()) => Ok(()),
            Err(TransportError::Firmware { status, .. })
                if status == SevStatus(super::sev_abi::status::INVALID_LEN) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn simple(&self, id: u32) -> Result<(), TransportError> {
        // SEND_FINISH, SEND_CANCEL and RECEIVE_FINISH take no argument structure: the kernel
        // never reads `data` for them.
        let mut none = 0u64;
        // SAFETY: `none` is a live u64; the command has no addresses.
        unsafe { self.issue(id, &mut none, None) }
    }

    /// Source: SEND_START. Refuses SNP, SEV-ES (mode or policy ES) and NOSEND before calling the
    /// firmware; asks the session length (length query), issues SEND_START with the
    /// destination's certificates, checks the policy the firmware reports, and asks the packet
    /// header length (SEND_UPDATE_DATA length query). Returns the session record that must
    /// reach the destination before the first page.
    ///
    /// On a failure after SEND_START succeeded, SEND_CANCEL is issued, so the source guest stays
    /// runnable.
    pub fn send_start(&self, p: &SendParams<'_>) -> Result<SessionRecord, TransportError> {
        refuse_mode(p.mode, p.policy)?;
        if p.policy & policy::NOSEND != 0 {
            return Err(Refusal::NoSend { policy: p.policy }.into());
        }
        blob_len("source PDH length", p.src_pdh)?;
        let pdh_len = blob_len("destination PDH length", p.dst_pdh)?;
        let plat_len = blob_len(
            "destination platform certificate chain length",
            p.dst_plat_certs,
        )?;
        let amd_len = blob_len("AMD certificate chain length", p.amd_certs)?;
        // Held for the whole set-up: two set-ups must not interleave their commands.
        let mut ph = self.phase();
        // A received guest (RECEIVE_FINISH done) runs here now and may be sent on.
        if !matches!(*ph, Phase::Idle | Phase::Received) {
            return Err(TransportError::State {
                op: "send setup (SEND_START)",
                phase: ph.name(),
                needs: "idle (no session, the last one cancelled, or a guest received)",
            });
        }

        let mut q = kvm_sev_send_start::default();
        // SAFETY: a session-length query: every address is 0.
        unsafe { self.query(cmd::SEND_START, &mut q)? };
        if q.session_len == 0 || q.session_len > FW_BLOB_MAX {
            return Err(TransportError::LengthAnswer {
                cmd: SevCmd(cmd::SEND_START),
                what: "session_len",
                value: q.session_len.into(),
                max: FW_BLOB_MAX.into(),
            });
        }
        let mut session = vec![0u8; q.session_len as usize];
        let mut a = kvm_sev_send_start {
            pdh_cert_uaddr: ptr(p.dst_pdh),
            pdh_cert_len: pdh_len,
            plat_certs_uaddr: ptr(p.dst_plat_certs),
            plat_certs_len: plat_len,
            amd_certs_uaddr: ptr(p.amd_certs),
            amd_certs_len: amd_len,
            session_uaddr: session.as_mut_ptr() as usize as u64,
            session_len: q.session_len,
            ..Default::default()
        };
        // SAFETY: the three certificate addresses are live slices of the given lengths (read
        // only), the session buffer is ours and session_len long (written).
        unsafe { self.issue(cmd::SEND_START, &mut a, None)? };

        let mut finish = || -> Result<SessionRecord, TransportError> {
            if a.policy != p.policy {
                return Err(TransportError::PolicyMismatch {
                    configured: p.policy,
                    firmware: a.policy,
                });
            }
            if a.session_len == 0 || a.session_len > q.session_len {
                return Err(TransportError::LengthAnswer {
                    cmd: SevCmd(cmd::SEND_START),
                    what: "session_len written",
                    value: a.session_len.into(),
                    max: q.session_len.into(),
                });
            }
            let mut u = kvm_sev_send_update_data::default();
            // SAFETY: a length query: every address is 0.
            unsafe { self.query(cmd::SEND_UPDATE_DATA, &mut u)? };
            if u.hdr_len == 0 || u.hdr_len > PACKET_HDR_MAX {
                return Err(TransportError::LengthAnswer {
                    cmd: SevCmd(cmd::SEND_UPDATE_DATA),
                    what: "hdr_len",
                    value: u.hdr_len.into(),
                    max: PACKET_HDR_MAX.into(),
                });
            }
            if u.trans_len == 0 || u.trans_len > PACKET_TRANS_MAX {
                return Err(TransportError::LengthAnswer {
                    cmd: SevCmd(cmd::SEND_UPDATE_DATA),
                    what: "trans_len",
                    value: u.trans_len.into(),
                    max: PACKET_TRANS_MAX.into(),
                });
            }
            session.truncate(a.session_len as usize);
            let record = SessionRecord {
                policy: a.policy,
                hdr_len: u.hdr_len,
                pdh: p.src_pdh.to_vec(),
                session: std::mem::take(&mut session),
            };
            record.validate()?;
            Ok(record)
        };
        match finish() {
            Ok(record) => {
                *ph = Phase::Sending {
                    hdr_len: record.hdr_len,
                };
                Ok(record)
            }
            Err(e) => {
                // SEND_START put the guest in SUPDATE: put it back to RUNNING. If that fails too,
                // the first error is the one to report; the caller's cancel path retries.
                let _ = self.simple(cmd::SEND_CANCEL);
                Err(e)
            }
        }
    }

    /// The packet length [`SevTransport::send_page`] writes in this session (0 if not sending).
    pub fn packet_len(&self) -> usize {
        match *self.phase() {
            Phase::Sending { hdr_len } | Phase::Receiving { hdr_len } => {
                PACKET_PREFIX_LEN + hdr_len as usize + PAGE_SIZE as usize
            }
            _ => 0,
        }
    }

    /// Source: one encrypted page through SEND_UPDATE_DATA. `host` is the page's address in
    /// this process (the kernel pins it; it must be 4 KiB aligned guest RAM), `gpa` its guest
    /// physical address (carried in the packet). Writes the whole packet (prefix, firmware
    /// header, ciphertext) into `out` and returns its length.
    ///
    /// # Safety
    /// `host` is the address of a 4 KiB page of this guest's RAM, mapped for the whole call.
    pub unsafe fn send_page(
        &self,
        gpa: u64,
        host: u64,
        out: &mut [u8],
    ) -> Result<usize, TransportError> {
        if gpa % u64::from(PAGE_SIZE) != 0 || gpa >= GPA_LIMIT {
            return Err(TransportError::Gpa { gpa });
        }
        let hdr_len = match *self.phase() {
            Phase::Sending { hdr_len } => hdr_len,
            other => {
                return Err(TransportError::State {
                    op: "send page (SEND_UPDATE_DATA)",
                    phase: other.name(),
                    needs: "sending (after send setup)",
                })
            }
        };
        let prefix = PacketPrefix {
            gpa,
            hdr_len,
            trans_len: PAGE_SIZE,
        };
        let needed = prefix.packet_len();
        if out.len() < needed {
            return Err(TransportError::BufferTooSmall {
                needed,
                len: out.len(),
            });
        }
        let (pre, rest) = out.split_at_mut(PACKET_PREFIX_LEN);
        let (hdr, rest) = rest.split_at_mut(hdr_len as usize);
        let trans = &mut rest[..PAGE_SIZE as usize];
        let mut a = kvm_sev_send_update_data {
            hdr_uaddr: hdr.as_mut_ptr() as usize as u64,
            hdr_len,
            guest_uaddr: host,
            guest_len: PAGE_SIZE,
            trans_uaddr: trans.as_mut_ptr() as usize as u64,
            trans_len: PAGE_SIZE,
            ..Default::default()
        };
        // SAFETY: hdr and trans are parts of `out`, exclusively ours, of the lengths given;
        // `host` is a mapped guest page (this fn's contract).
        unsafe { self.issue(cmd::SEND_UPDATE_DATA, &mut a, Some(PageCtx { gpa, host }))? };
        prefix.write(pre);
        Ok(needed)
    }

    /// Source: SEND_FINISH, after the destination confirmed it loaded every page. The source
    /// guest must never run again afterwards.
    pub fn send_finish(&self) -> Result<(), TransportError> {
        let mut ph = self.phase();
        if !matches!(*ph, Phase::Sending { .. }) {
            return Err(TransportError::State {
                op: "send finish (SEND_FINISH)",
                phase: ph.name(),
                needs: "sending (after send setup)",
            });
        }
        // Held across the command: a finish must not race a cancel.
        self.simple(cmd::SEND_FINISH)?;
        *ph = Phase::Sent;
        Ok(())
    }

    /// Source: SEND_CANCEL after a failed or cancelled migration; the source guest runs on.
    /// Without a session (setup never ran or failed and was already undone) it does nothing.
    pub fn send_cancel(&self) -> Result<(), TransportError> {
        let mut ph = self.phase();
        match *ph {
            Phase::Idle => Ok(()),
            Phase::Sending { .. } => {
                self.simple(cmd::SEND_CANCEL)?;
                *ph = Phase::Idle;
                Ok(())
            }
            other => Err(TransportError::State {
                op: "send cancel (SEND_CANCEL)",
                phase: other.name(),
                needs: "sending (after send setup) or idle",
            }),
        }
    }

    /// Destination: RECEIVE_START from the session record. `policy` is the guest policy the
    /// destination was configured with; it must equal the record's. Refuses SNP, SEV-ES and a
    /// record whose policy has ES or NOSEND.
    pub fn receive_start(
        &self,
        record: &[u8],
        mode: SevMode,
        policy_word: u32,
    ) -> Result<(), TransportError> {
        refuse_mode(mode, policy_word)?;
        let r = SessionRecord::decode(record)?;
        refuse_mode(mode, r.policy)?;
        if r.policy & policy::NOSEND != 0 {
            return Err(Refusal::NoSend { policy: r.policy }.into());
        }
        if r.policy != policy_word {
            return Err(TransportError::PolicyMismatch {
                configured: policy_word,
                firmware: r.policy,
            });
        }
        let mut ph = self.phase();
        if *ph != Phase::Idle {
            return Err(TransportError::State {
                op: "receive setup (RECEIVE_START)",
                phase: ph.name(),
                needs: "idle (no session)",
            });
        }
        let mut a = kvm_sev_receive_start {
            handle: 0,
            policy: r.policy,
            pdh_uaddr: ptr(&r.pdh),
            pdh_len: r.pdh.len() as u32,
            session_uaddr: ptr(&r.session),
            session_len: r.session.len() as u32,
            ..Default::default()
        };
        // SAFETY: pdh and session are live vectors of the lengths given (read only).
        unsafe { self.issue(cmd::RECEIVE_START, &mut a, None)? };
        *ph = Phase::Receiving { hdr_len: r.hdr_len };
        Ok(())
    }

    /// Destination: one packet through RECEIVE_UPDATE_DATA into the page at `host` (guest
    /// physical address `gpa`, which must be the packet's). The firmware checks the packet's
    /// integrity before it writes guest memory.
    ///
    /// # Safety
    /// `host` is the address of a 4 KiB page of this guest's RAM, mapped for the whole call.
    pub unsafe fn receive_page(
        &self,
        gpa: u64,
        host: u64,
        packet: &[u8],
    ) -> Result<(), TransportError> {
        let hdr_len = match *self.phase() {
            Phase::Receiving { hdr_len } => hdr_len,
            other => {
                return Err(TransportError::State {
                    op: "receive page (RECEIVE_UPDATE_DATA)",
                    phase: other.name(),
                    needs: "receiving (after receive setup)",
                })
            }
        };
        let pk = Packet::decode(packet)?;
        if pk.prefix.gpa != gpa {
            return Err(TransportError::GpaMismatch {
                packet: pk.prefix.gpa,
                expected: gpa,
            });
        }
        if pk.prefix.hdr_len != hdr_len {
            return Err(TransportError::HdrLenMismatch {
                packet: pk.prefix.hdr_len,
                session: hdr_len,
            });
        }
        let mut a = kvm_sev_receive_update_data {
            hdr_uaddr: ptr(pk.hdr),
            hdr_len: pk.prefix.hdr_len,
            guest_uaddr: host,
            guest_len: pk.prefix.trans_len,
            trans_uaddr: ptr(pk.trans),
            trans_len: pk.prefix.trans_len,
            ..Default::default()
        };
        // SAFETY: hdr and trans are parts of `packet`, live for the call and only read; `host`
        // is a mapped guest page (this fn's contract).
        unsafe {
            self.issue(
                cmd::RECEIVE_UPDATE_DATA,
                &mut a,
                Some(PageCtx { gpa, host }),
            )
        }
    }

    /// Destination: RECEIVE_FINISH, after the last page and before the guest first runs.
    pub fn receive_finish(&self) -> Result<(), TransportError> {
        let mut ph = self.phase();
        if !matches!(*ph, Phase::Receiving { .. }) {
            return Err(TransportError::State {
                op: "receive finish (RECEIVE_FINISH)",
                phase: ph.name(),
                needs: "receiving (after receive setup)",
            });
        }
        self.simple(cmd::RECEIVE_FINISH)?;
        *ph = Phase::Received;
        Ok(())
    }
}
