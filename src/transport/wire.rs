//! The transport's wire format (docs/transport.md, "Wire format"): the session record that
//! travels before the first RAM page, and one packet per encrypted page. Big-endian, versioned,
//! every length checked against its limit before anything is allocated or copied; a refusal
//! names the field, its value and the limit.
//!
//! Pure data: no firmware, no FFI, no `unsafe`.

use std::fmt;

use super::sev_abi::{FW_BLOB_MAX, PAGE_SIZE};

/// First bytes of a session record.
pub const SESSION_MAGIC: [u8; 4] = *b"PGTS";
/// The one session record version this library writes and reads.
pub const SESSION_VERSION: u16 = 1;
/// Fixed part of a session record, before the PDH and the session blob.
pub const SESSION_FIXED_LEN: usize = 24;
/// Largest session record: the fixed part, a PDH and a session blob of 16 KiB each.
pub const SESSION_MAX_LEN: usize = SESSION_FIXED_LEN + 2 * FW_BLOB_MAX as usize;

/// The version byte of a page packet.
pub const PACKET_VERSION: u8 = 1;
/// The kind byte of a page packet carrying one encrypted page.
pub const PACKET_KIND_PAGE: u8 = 1;
/// Fixed prefix of a page packet: enough to know the whole packet's length.
pub const PACKET_PREFIX_LEN: usize = 24;
/// Largest packet header the firmware may produce (the kernel's 16 KiB blob limit).
pub const PACKET_HDR_MAX: u32 = FW_BLOB_MAX;
/// Largest transport payload: one page (the kernel takes at most one page per command).
pub const PACKET_TRANS_MAX: u32 = PAGE_SIZE;
/// Largest page packet.
pub const PACKET_MAX_LEN: usize =
    PACKET_PREFIX_LEN + PACKET_HDR_MAX as usize + PACKET_TRANS_MAX as usize;
/// Guest physical addresses are below 2^52 (the architectural limit).
pub const GPA_LIMIT: u64 = 1 << 52;

/// Why bytes from the stream were refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    /// Fewer bytes than the format needs.
    Truncated {
        /// "session record" or "page packet".
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes given.
        have: usize,
    },
    /// The magic or version/kind bytes are not this format's.
    BadMagic {
        /// "session record" or "page packet".
        what: &'static str,
        /// The bytes found, big-endian.
        found: u64,
        /// The bytes expected, big-endian.
        expected: u64,
    },
    /// A version this library does not read.
    Version {
        /// "session record" or "page packet".
        what: &'static str,
        /// The version found.
        found: u64,
        /// The version supported.
        supported: u64,
    },
    /// A field that must be zero (flags, reserved) is not.
    NotZero {
        /// The field's name.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// A length is zero or above its limit.
    Length {
        /// The field's name.
        field: &'static str,
        /// Its value.
        value: u64,
        /// The smallest value allowed.
        min: u64,
        /// The largest value allowed.
        max: u64,
    },
    /// A guest physical address that is not 4 KiB aligned or not below 2^52.
    Gpa {
        /// The address.
        gpa: u64,
    },
    /// Bytes after the end of the record or packet.
    Trailing {
        /// "session record" or "page packet".
        what: &'static str,
        /// The length the fields add up to.
        expected: usize,
        /// The length given.
        len: usize,
    },
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            WireError::Truncated { what, need, have } => write!(
                f,
                "{what} is truncated: {have} bytes given, at least {need} needed"
            ),
            WireError::BadMagic {
                what,
                found,
                expected,
            } => write!(
                f,
                "{what} starts with {found:#x}, expected {expected:#x}: not a pagenc transport {what}"
            ),
            WireError::Version {
                what,
                found,
                supported,
            } => write!(
                f,
                "{what} version {found} is not supported; this library reads version {supported}"
            ),
            WireError::NotZero { field, value } => {
                write!(f, "{field} is {value:#x}; it must be 0")
            }
            WireError::Length {
                field,
                value,
                min,
                max,
            } => write!(
                f,
                "{field} is {value}; it must be between {min} and {max}"
            ),
            WireError::Gpa { gpa } => write!(
                f,
                "packet gpa {gpa:#x} is not a 4 KiB aligned address below 2^52 ({GPA_LIMIT:#x})"
            ),
            WireError::Trailing {
                what,
                expected,
                len,
            } => write!(
                f,
                "{what} is {len} bytes but its fields add up to {expected}: {} bytes too many",
                len - expected
            ),
        }
    }
}

impl std::error::Error for WireError {}

/// What SEND_START produced, sent before the first RAM page: everything RECEIVE_START needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// The guest policy the source firmware reported.
    pub policy: u32,
    /// Length of the packet header the source firmware writes per page (from its length query);
    /// the destination refuses packets with another header length.
    pub hdr_len: u32,
    /// The source platform's PDH certificate (RECEIVE_START's `pdh_uaddr`).
    pub pdh: Vec<u8>,
    /// The session blob SEND_START wrote (wrapped transport keys, nonce, policy MAC).
    pub session: Vec<u8>,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn check_len(field: &'static str, value: u32, max: u32) -> Result<usize, WireError> {
    if value == 0 || value > max {
        return Err(WireError::Length {
            field,
            value: value.into(),
            min: 1,
            max: max.into(),
        });
    }
    Ok(value as usize)
}

impl SessionRecord {
    /// Checks the lengths the encoder would write, so that an encoded record always decodes.
    pub fn validate(&self) -> Result<(), WireError> {
        let as32 = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        check_len("session record hdr_len", self.hdr_len, PACKET_HDR_MAX)?;
        check_len("session record pdh_len", as32(self.pdh.len()), FW_BLOB_MAX)?;
        check_len(
            "session record session_len",
            as32(self.session.len()),
            FW_BLOB_MAX,
        )?;
        Ok(())
    }

    /// The encoded length.
    pub fn encoded_len(&self) -> usize {
        SESSION_FIXED_LEN + self.pdh.len() + self.session.len()
    }

    /// Encodes the record (after [`SessionRecord::validate`]).
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        self.validate()?;
        let mut out = Vec::with_capacity(self.encoded_len());
        out.extend_from_slice(&SESSION_MAGIC);
        out.extend_from_slice(&SESSION_VERSION.to_be_bytes());
        out.extend_from_slice(&0u16.to_be_bytes());
        out.extend_from_slice(&self.policy.to_be_bytes());
        out.extend_from_slice(&self.hdr_len.to_be_bytes());
        out.extend_from_slice(&(self.pdh.len() as u32).to_be_bytes());
        out.extend_from_slice(&(self.session.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.pdh);
        out.extend_from_slice(&self.session);
        Ok(out)
    }

    /// Decodes a whole record: every length is checked before anything is copied, and bytes
    /// after the record are refused.
    pub fn decode(b: &[u8]) -> Result<SessionRecord, WireError> {
        const WHAT: &str = "session record";
        if b.len() < SESSION_FIXED_LEN {
            return Err(WireError::Truncated {
                what: WHAT,
                need: SESSION_FIXED_LEN,
                have: b.len(),
            });
        }
        if b[0..4] != SESSION_MAGIC {
            return Err(WireError::BadMagic {
                what: WHAT,
                found: be32(b, 0).into(),
                expected: u32::from_be_bytes(SESSION_MAGIC).into(),
            });
        }
        let version = be16(b, 4);
        if version != SESSION_VERSION {
            return Err(WireError::Version {
                what: WHAT,
                found: version.into(),
                supported: SESSION_VERSION.into(),
            });
        }
        let flags = be16(b, 6);
        if flags != 0 {
            return Err(WireError::NotZero {
                field: "session record flags",
                value: flags.into(),
            });
        }
        let policy = be32(b, 8);
        let hdr_len = be32(b, 12);
        check_len("session record hdr_len", hdr_len, PACKET_HDR_MAX)?;
        let pdh_len = check_len("session record pdh_len", be32(b, 16), FW_BLOB_MAX)?;
        let session_len = check_len("session record session_len", be32(b, 20), FW_BLOB_MAX)?;
        let expected = SESSION_FIXED_LEN + pdh_len + session_len;
        if b.len() < expected {
            return Err(WireError::Truncated {
                what: WHAT,
                need: expected,
                have: b.len(),
            });
        }
        if b.len() > expected {
            return Err(WireError::Trailing {
                what: WHAT,
                expected,
                len: b.len(),
            });
        }
        let pdh_end = SESSION_FIXED_LEN + pdh_len;
        Ok(SessionRecord {
            policy,
            hdr_len,
            pdh: b[SESSION_FIXED_LEN..pdh_end].to_vec(),
            session: b[pdh_end..expected].to_vec(),
        })
    }
}

/// The fixed prefix of a page packet, decoded and checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketPrefix {
    /// The page's guest physical address, as the source gave it.
    pub gpa: u64,
    /// Length of the firmware's packet header.
    pub hdr_len: u32,
    /// Length of the transport payload (the page's ciphertext).
    pub trans_len: u32,
}

impl PacketPrefix {
    /// The whole packet's length.
    pub fn packet_len(&self) -> usize {
        PACKET_PREFIX_LEN + self.hdr_len as usize + self.trans_len as usize
    }

    /// Writes the prefix into `out[..PACKET_PREFIX_LEN]`.
    pub fn write(&self, out: &mut [u8]) {
        out[0] = PACKET_VERSION;
        out[1] = PACKET_KIND_PAGE;
        out[2..4].copy_from_slice(&0u16.to_be_bytes());
        out[4..8].copy_from_slice(&self.hdr_len.to_be_bytes());
        out[8..16].copy_from_slice(&self.gpa.to_be_bytes());
        out[16..20].copy_from_slice(&self.trans_len.to_be_bytes());
        out[20..24].copy_from_slice(&0u32.to_be_bytes());
    }

    /// Decodes and checks the first [`PACKET_PREFIX_LEN`] bytes of `b` (more are ignored): a
    /// receiver reads the prefix, learns the packet's length from it, then reads the rest.
    pub fn decode(b: &[u8]) -> Result<PacketPrefix, WireError> {
        const WHAT: &str = "page packet";
        if b.len() < PACKET_PREFIX_LEN {
            return Err(WireError::Truncated {
                what: WHAT,
                need: PACKET_PREFIX_LEN,
                have: b.len(),
            });
        }
        if b[0] != PACKET_VERSION {
            return Err(WireError::Version {
                what: WHAT,
                found: b[0].into(),
                supported: PACKET_VERSION.into(),
            });
        }
        if b[1] != PACKET_KIND_PAGE {
            return Err(WireError::BadMagic {
                what: WHAT,
                found: u16::from_be_bytes([b[0], b[1]]).into(),
                expected: u16::from_be_bytes([PACKET_VERSION, PACKET_KIND_PAGE]).into(),
            });
        }
        let flags = be16(b, 2);
        if flags != 0 {
            return Err(WireError::NotZero {
                field: "page packet flags",
                value: flags.into(),
            });
        }
        let hdr_len = be32(b, 4);
        check_len("page packet hdr_len", hdr_len, PACKET_HDR_MAX)?;
        let gpa = be64(b, 8);
        if gpa % u64::from(PAGE_SIZE) != 0 || gpa >= GPA_LIMIT {
            return Err(WireError::Gpa { gpa });
        }
        let trans_len = be32(b, 16);
        check_len("page packet trans_len", trans_len, PACKET_TRANS_MAX)?;
        let reserved = be32(b, 20);
        if reserved != 0 {
            return Err(WireError::NotZero {
                field: "page packet reserved",
                value: reserved.into(),
            });
        }
        Ok(PacketPrefix {
            gpa,
            hdr_len,
            trans_len,
        })
    }
}

/// A whole page packet, borrowed from the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<'a> {
    /// The checked prefix.
    pub prefix: PacketPrefix,
    /// The firmware's packet header.
    pub hdr: &'a [u8],
    /// The transport payload.
    pub trans: &'a [u8],
}

impl<'a> Packet<'a> {
    /// Decodes a whole packet; bytes after it are refused.
    pub fn decode(b: &'a [u8]) -> Result<Packet<'a>, WireError> {
        let prefix = PacketPrefix::decode(b)?;
        let expected = prefix.packet_len();
        if b.len() < expected {
            return Err(WireError::Truncated {
                what: "page packet",
                need: expected,
                have: b.len(),
            });
        }
        if b.len() > expected {
            return Err(WireError::Trailing {
                what: "page packet",
                expected,
                len: b.len(),
            });
        }
        let hdr_end = PACKET_PREFIX_LEN + prefix.hdr_len as usize;
        Ok(Packet {
            prefix,
            hdr: &b[PACKET_PREFIX_LEN..hdr_end],
            trans: &b[hdr_end..expected],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> SessionRecord {
        SessionRecord {
            policy: 0x1,
            hdr_len: 32,
            pdh: vec![7; 40],
            session: vec![9; 72],
        }
    }

    #[test]
    fn session_round_trip_and_layout() {
        let r = record();
        let b = r.encode().unwrap();
        assert_eq!(b.len(), r.encoded_len());
        assert_eq!(&b[..8], b"PGTS\x00\x01\x00\x00");
        assert_eq!(
            &b[8..24],
            &[0, 0, 0, 1, 0, 0, 0, 32, 0, 0, 0, 40, 0, 0, 0, 72]
        );
        assert_eq!(SessionRecord::decode(&b).unwrap(), r);
    }

    #[test]
    fn session_lengths_are_capped_before_use() {
        let mut b = record().encode().unwrap();
        b[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        let e = SessionRecord::decode(&b).unwrap_err();
        assert_eq!(
            e.to_string(),
            "session record pdh_len is 4294967295; it must be between 1 and 16384"
        );
    }

    #[test]
    fn packet_prefix_round_trip() {
        let p = PacketPrefix {
            gpa: 0x1234_5000,
            hdr_len: 32,
            trans_len: 4096,
        };
        let mut b = [0u8; PACKET_PREFIX_LEN];
        p.write(&mut b);
        assert_eq!(PacketPrefix::decode(&b).unwrap(), p);
        assert_eq!(p.packet_len(), 24 + 32 + 4096);
    }
}
