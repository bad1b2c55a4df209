//! The wire constants of the stream (see docs/stream-format.md for the field table).
//!
//! Fixed-width fields are big-endian. Page numbers and lengths inside records are unsigned
//! LEB128 varints (minimal encoding required) so that an ordinary range costs a few bytes while
//! any gfn up to 2^64 stays representable: AMD's 2021 format used 32-bit gfns and broke above
//! 16 TiB.

/// The first four bytes of every stream: "PGEL" (PaGe Encryption List).
pub const MAGIC: [u8; 4] = *b"PGEL";
/// The version this build writes.
pub const VERSION: u16 = 2;
/// Every version this build reads. A newer build keeps reading all of these.
pub const KNOWN_VERSIONS: &[u16] = &[2];
/// Versions pagenc once wrote and no longer reads: version 1 had neither a checksum nor the
/// source's RAM ranges, so a damaged stream or one for another layout of the same size loaded
/// silently (docs/stream-format.md says why it is refused rather than read).
pub const RETIRED_VERSIONS: &[u16] = &[1];

/// Byte offsets of the header fields.
pub mod off {
    /// Magic, 4 bytes.
    pub const MAGIC: usize = 0;
    /// Version, u16.
    pub const VERSION: usize = 4;
    /// Flags, u16 (all reserved, must be zero).
    pub const FLAGS: usize = 6;
    /// Source RAM pages, u64.
    pub const RAM_PAGES: usize = 8;
    /// One past the source's highest RAM gfn, u64.
    pub const RAM_END: usize = 16;
    /// MSR_KVM_MIGRATION_CONTROL value, u64.
    pub const MSR: usize = 24;
    /// Shared pages in the map, u64.
    pub const SHARED_PAGES: usize = 32;
    /// Maximal shared ranges in the map, u64.
    pub const RANGE_COUNT: usize = 40;
    /// Records that follow the header, u64.
    pub const RECORD_COUNT: usize = 48;
    /// Number of the source's RAM ranges that follow, u32 (version 2).
    pub const LAYOUT_COUNT: usize = 56;
}

/// Size of the fixed header, up to and including the record count (the part every version
/// shares).
pub const HEADER_LEN: usize = 56;
/// Bytes of the layout count field after the fixed header.
pub const LAYOUT_COUNT_LEN: usize = 4;
/// Bytes of one RAM range in the layout block: start gfn and end gfn, u64 each.
pub const LAYOUT_ENTRY_LEN: usize = 16;
/// Bytes of the CRC32C trailer.
pub const CHECKSUM_LEN: usize = 4;

/// Offset of the first record of a stream whose layout block holds `ranges` ranges.
pub fn records_offset(ranges: usize) -> usize {
    HEADER_LEN + LAYOUT_COUNT_LEN + ranges * LAYOUT_ENTRY_LEN
}

/// CRC32C (Castagnoli, the iSCSI polynomial, as in ext4, Btrfs and SCTP): it catches every error
/// burst up to 32 bits, so any change of one byte, and almost every other damage.
const CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// The CRC32C of `bytes`, as stored (big-endian) in the trailer.
pub fn checksum(bytes: &[u8]) -> u32 {
    CRC32C.checksum(bytes)
}

/// Record tag: one shared range, `start: varint gfn, len: varint pages`.
pub const TAG_RANGE: u8 = 0x01;
/// Record tag: bitmap of whole chunks, `start: varint gfn (chunk aligned), chunks: varint`,
/// then `chunks * CHUNK_BYTES` bytes.
pub const TAG_BITMAP: u8 = 0x02;

/// log2 of the pages a bitmap chunk covers (the same 2^15 as the in-memory map's chunks).
pub const CHUNK_SHIFT: u32 = 15;
/// Pages per bitmap chunk.
pub const CHUNK_PAGES: u64 = 1 << CHUNK_SHIFT;
/// Bytes of one bitmap chunk.
pub const CHUNK_BYTES: usize = (CHUNK_PAGES / 8) as usize;
/// The smallest possible record (tag + two one-byte varints); bounds the record count a stream
/// of a given length can hold.
pub const MIN_RECORD_LEN: usize = 3;
/// The longest minimal LEB128 encoding of a u64.
pub const MAX_VARINT_LEN: usize = 10;

/// Length of the minimal LEB128 encoding of `v`.
pub fn varint_len(v: u64) -> usize {
    let bits = 64 - (v | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

/// Appends the minimal LEB128 encoding of `v` to `buf`, returning the number of bytes.
pub fn put_varint(buf: &mut Vec<u8>, mut v: u64) -> usize {
    let mut n = 0;
    loop {
        n += 1;
        if v < 0x80 {
            buf.push(v as u8);
            return n;
        }
        buf.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_is_crc32c() {
        // The check value of CRC-32/ISCSI (Castagnoli) from the CRC catalogue.
        assert_eq!(checksum(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn varint_len_matches_encoding() {
        for v in [0, 1, 127, 128, 16383, 16384, u32::MAX as u64, u64::MAX] {
            let mut b = Vec::new();
            assert_eq!(put_varint(&mut b, v), varint_len(v), "value {v}");
            assert_eq!(b.len(), varint_len(v));
        }
        assert_eq!(varint_len(u64::MAX), MAX_VARINT_LEN);
    }
}
