//! Why a stream could not be written or loaded. Every refusal names the offending value, the
//! byte offset where it was found, and what is allowed.

use std::fmt;

use super::format::{CHUNK_PAGES, KNOWN_VERSIONS, RETIRED_VERSIONS};
use crate::core::{PageRange, PAGE_SHIFT};
use crate::tracker::TrackerError;

/// A stable number per kind of [`StreamError`], for the C ABI and for tests that check which
/// error a corrupted stream gives. Values are never reused.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamErrorKind {
    /// See [`StreamError::Io`].
    Io = 1,
    /// See [`StreamError::Tracker`].
    Tracker = 2,
    /// See [`StreamError::Truncated`].
    Truncated = 3,
    /// See [`StreamError::BadMagic`].
    BadMagic = 4,
    /// See [`StreamError::UnsupportedVersion`].
    UnsupportedVersion = 5,
    /// See [`StreamError::ReservedFlags`].
    ReservedFlags = 6,
    /// See [`StreamError::LayoutMismatch`].
    LayoutMismatch = 7,
    /// See [`StreamError::BadMsr`].
    BadMsr = 8,
    /// See [`StreamError::RecordCountTooLarge`].
    RecordCountTooLarge = 9,
    /// See [`StreamError::BadVarint`].
    BadVarint = 10,
    /// See [`StreamError::UnknownRecord`].
    UnknownRecord = 11,
    /// See [`StreamError::EmptyRecord`].
    EmptyRecord = 12,
    /// See [`StreamError::Unsorted`].
    Unsorted = 13,
    /// See [`StreamError::Overlap`].
    Overlap = 14,
    /// See [`StreamError::NotMerged`].
    NotMerged = 15,
    /// See [`StreamError::OutOfRam`].
    OutOfRam = 16,
    /// See [`StreamError::BitmapUnaligned`].
    BitmapUnaligned = 17,
    /// See [`StreamError::EmptyBitmapChunk`].
    EmptyBitmapChunk = 18,
    /// See [`StreamError::TrailingBytes`].
    TrailingBytes = 19,
    /// See [`StreamError::CountMismatch`].
    CountMismatch = 20,
    /// See [`StreamError::ChecksumMismatch`].
    ChecksumMismatch = 21,
}

/// What a refused stream means for the VMM, in the few classes it can act on differently
/// (the C ABI's `pagenc_stream_problem`). Values are never reused.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamProblem {
    /// Not a page-encryption stream at all (wrong magic).
    NotAStream = 1,
    /// Written by a newer pagenc: upgrade the destination.
    NewerVersion = 2,
    /// A version this build does not read: one pagenc no longer reads (1), or one it never
    /// wrote.
    OldVersion = 3,
    /// Made for another RAM layout: the destination's guest RAM differs from the source's.
    WrongLayout = 4,
    /// The bytes changed in transit or storage: the checksum does not match, or the stream is
    /// cut short.
    Damaged = 5,
    /// The checksum matches but the content breaks the format's rules: a faulty or hostile
    /// writer, not a transport error.
    Invalid = 6,
    /// Not about the bytes: the writer failed, or the tracker refused the call.
    NotTheStream = 7,
}

/// Which header count disagreed with the records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CountField {
    /// The number of shared pages.
    SharedPages,
    /// The number of maximal shared ranges.
    Ranges,
}

/// Which part of the RAM layout summary disagreed with the destination's layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayoutField {
    /// Total pages of RAM.
    RamPages,
    /// One past the highest RAM gfn.
    RamEnd,
}

/// What was wrong with a varint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VarintProblem {
    /// More than 64 bits.
    Overflow,
    /// Not the shortest encoding (a trailing zero group), so the stream is not canonical.
    Overlong,
}

/// Why saving or loading the stream failed.
#[derive(Debug)]
pub enum StreamError {
    /// The writer failed.
    Io(std::io::Error),
    /// The tracker refused the call (re-entrance from a callback, or poisoned).
    Tracker(TrackerError),
    /// The stream ends inside `what`, which starts at `offset` and needs `needed` bytes; only
    /// `available` are left.
    Truncated {
        /// The field or record being read.
        what: &'static str,
        /// Byte offset where it starts.
        offset: usize,
        /// Bytes it needs.
        needed: u64,
        /// Bytes left in the stream from `offset`.
        available: usize,
    },
    /// The first four bytes are not the magic `PGEL`.
    BadMagic {
        /// What was found.
        found: [u8; 4],
    },
    /// A version this build does not read (see [`KNOWN_VERSIONS`]).
    UnsupportedVersion {
        /// The stream's version.
        found: u16,
    },
    /// Flag bits that no known version defines.
    ReservedFlags {
        /// The flags field.
        flags: u16,
    },
    /// The source's RAM layout summary differs from the destination's layout.
    LayoutMismatch {
        /// Which part differs.
        field: LayoutField,
        /// The stream's (source's) value.
        stream: u64,
        /// The destination's value.
        destination: u64,
    },
    /// The MSR_KVM_MIGRATION_CONTROL value sets reserved bits.
    BadMsr {
        /// The value.
        value: u64,
    },
    /// The header announces more records than the remaining bytes can hold.
    RecordCountTooLarge {
        /// The announced count.
        count: u64,
        /// The most records the remaining bytes can hold.
        max: u64,
    },
    /// A varint is malformed.
    BadVarint {
        /// Byte offset of its first byte.
        offset: usize,
        /// What is wrong.
        problem: VarintProblem,
    },
    /// A record tag no known version defines.
    UnknownRecord {
        /// Byte offset of the record.
        offset: usize,
        /// The tag byte.
        tag: u8,
    },
    /// A range of 0 pages or a bitmap of 0 chunks.
    EmptyRecord {
        /// Byte offset of the record.
        offset: usize,
        /// Its start gfn.
        start: u64,
    },
    /// A record starts before the previous one started.
    Unsorted {
        /// Byte offset of the record.
        offset: usize,
        /// Its start gfn.
        start: u64,
        /// Start gfn of the previous record.
        prev_start: u64,
    },
    /// A record starts inside the previous one.
    Overlap {
        /// Byte offset of the record.
        offset: usize,
        /// Its start gfn.
        start: u64,
        /// One past the last gfn of the previous record.
        prev_end: u64,
    },
    /// A record starts exactly where the previous record of the same kind ends: the encoder
    /// always merges those, so the stream is not canonical.
    NotMerged {
        /// Byte offset of the record.
        offset: usize,
        /// Its start gfn (= the previous record's end).
        start: u64,
    },
    /// Shared pages outside the destination's RAM (or past the 2^64 page limit).
    OutOfRam {
        /// Byte offset of the record.
        offset: usize,
        /// First gfn of the offending pages.
        start: u64,
        /// Number of pages (saturated at `u64::MAX`).
        len: u64,
    },
    /// A bitmap record's start is not a multiple of 2^15 pages.
    BitmapUnaligned {
        /// Byte offset of the record.
        offset: usize,
        /// Its start gfn.
        start: u64,
    },
    /// A chunk of a bitmap record has no shared page: the encoder never writes one.
    EmptyBitmapChunk {
        /// Byte offset of the chunk's bits.
        offset: usize,
        /// First gfn of the chunk.
        chunk_start: u64,
    },
    /// Bytes follow the last record the header announced.
    TrailingBytes {
        /// Byte offset of the first extra byte.
        offset: usize,
        /// Number of extra bytes.
        count: usize,
    },
    /// The CRC32C trailer does not match the bytes before it: the stream was damaged.
    ChecksumMismatch {
        /// The trailer's value.
        stored: u32,
        /// The CRC32C of the bytes before it.
        computed: u32,
        /// The stream's length in bytes.
        len: usize,
    },
    /// The source's RAM ranges (the layout block) differ from the destination's layout.
    LayoutRangeMismatch {
        /// Byte offset of the first range that differs (or of where it would be).
        offset: usize,
        /// Its index in the sorted, coalesced list of RAM ranges.
        index: usize,
        /// The source's range there, if it has that many.
        stream: Option<PageRange>,
        /// The destination's range there, if it has that many.
        destination: Option<PageRange>,
    },
    /// A header count disagrees with the records.
    CountMismatch {
        /// Which count.
        field: CountField,
        /// The header's value.
        header: u64,
        /// What the records hold.
        actual: u64,
    },
}

impl StreamError {
    /// The kind, a stable number for the C ABI.
    pub fn kind(&self) -> StreamErrorKind {
        use StreamErrorKind as K;
        match self {
            StreamError::Io(_) => K::Io,
            StreamError::Tracker(_) => K::Tracker,
            StreamError::Truncated { .. } => K::Truncated,
            StreamError::BadMagic { .. } => K::BadMagic,
            StreamError::UnsupportedVersion { .. } => K::UnsupportedVersion,
            StreamError::ReservedFlags { .. } => K::ReservedFlags,
            StreamError::LayoutMismatch { .. } => K::LayoutMismatch,
            StreamError::BadMsr { .. } => K::BadMsr,
            StreamError::RecordCountTooLarge { .. } => K::RecordCountTooLarge,
            StreamError::BadVarint { .. } => K::BadVarint,
            StreamError::UnknownRecord { .. } => K::UnknownRecord,
            StreamError::EmptyRecord { .. } => K::EmptyRecord,
            StreamError::Unsorted { .. } => K::Unsorted,
            StreamError::Overlap { .. } => K::Overlap,
            StreamError::NotMerged { .. } => K::NotMerged,
            StreamError::OutOfRam { .. } => K::OutOfRam,
            StreamError::BitmapUnaligned { .. } => K::BitmapUnaligned,
            StreamError::EmptyBitmapChunk { .. } => K::EmptyBitmapChunk,
            StreamError::TrailingBytes { .. } => K::TrailingBytes,
            StreamError::CountMismatch { .. } => K::CountMismatch,
            StreamError::ChecksumMismatch { .. } => K::ChecksumMismatch,
            StreamError::LayoutRangeMismatch { .. } => K::LayoutMismatch,
        }
    }

    /// The class of the problem, for a VMM that must tell "wrong layout" from "damaged" from
    /// "newer version" without parsing the message.
    pub fn problem(&self) -> StreamProblem {
        use StreamProblem as P;
        match self {
            StreamError::Io(_) | StreamError::Tracker(_) => P::NotTheStream,
            StreamError::BadMagic { .. } => P::NotAStream,
            StreamError::UnsupportedVersion { found } => {
                if *found > newest() {
                    P::NewerVersion
                } else {
                    P::OldVersion
                }
            }
            StreamError::LayoutMismatch { .. } | StreamError::LayoutRangeMismatch { .. } => {
                P::WrongLayout
            }
            // Checked before the checksum only when the stream is too short to hold one.
            StreamError::ChecksumMismatch { .. } | StreamError::Truncated { .. } => P::Damaged,
            _ => P::Invalid,
        }
    }
}

fn newest() -> u16 {
    KNOWN_VERSIONS.iter().max().copied().unwrap_or(0)
}

/// `[start, end)` gfns as guest physical bytes, for messages.
fn gpa_range(r: &Option<PageRange>) -> String {
    match r {
        Some(r) => format!(
            "gpa [{:#x}, {:#x})",
            r.start << PAGE_SHIFT,
            r.end << PAGE_SHIFT
        ),
        None => "none".into(),
    }
}

fn versions() -> String {
    KNOWN_VERSIONS
        .iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamError::Io(e) => write!(f, "writing the page-encryption stream failed: {e}"),
            StreamError::Tracker(e) => e.fmt(f),
            StreamError::Truncated {
                what,
                offset,
                needed,
                available,
            } => write!(
                f,
                "page-encryption stream truncated: {what} at byte {offset} needs {needed} bytes, \
                 only {available} are left"
            ),
            StreamError::BadMagic { found } => write!(
                f,
                "not a page-encryption stream: magic is {found:02x?}, expected \"PGEL\" \
                 (50 47 45 4c)"
            ),
            StreamError::UnsupportedVersion { found } => {
                let why = if *found > newest() {
                    "newer than this build of pagenc; upgrade the destination"
                } else if RETIRED_VERSIONS.contains(found) {
                    "from an older pagenc and no longer read: it has no checksum and does not \
                     name its RAM layout, so damage or another layout could load unnoticed; \
                     migrate from a source with this build's pagenc"
                } else {
                    "not a version pagenc ever wrote"
                };
                write!(
                    f,
                    "page-encryption stream version {found} is {why}; this build reads versions {}",
                    versions()
                )
            }
            StreamError::ReservedFlags { flags } => write!(
                f,
                "page-encryption stream flags {flags:#06x} set bits no known version defines; \
                 flags must be 0"
            ),
            StreamError::LayoutMismatch {
                field,
                stream,
                destination,
            } => {
                let what = match field {
                    LayoutField::RamPages => "RAM size in pages",
                    LayoutField::RamEnd => "end of RAM (one past the highest RAM gfn)",
                };
                write!(
                    f,
                    "page-encryption stream is for another RAM layout: source {what} is \
                     {stream:#x}, destination's is {destination:#x}; they must be equal"
                )
            }
            StreamError::BadMsr { value } => write!(
                f,
                "page-encryption stream MSR_KVM_MIGRATION_CONTROL value {value:#x} sets reserved \
                 bits; only 0 and KVM_MIGRATION_READY (0x1) are allowed"
            ),
            StreamError::RecordCountTooLarge { count, max } => write!(
                f,
                "page-encryption stream header announces {count} records but the remaining \
                 bytes hold at most {max}"
            ),
            StreamError::BadVarint { offset, problem } => match problem {
                VarintProblem::Overflow => write!(
                    f,
                    "page-encryption stream varint at byte {offset} exceeds 64 bits"
                ),
                VarintProblem::Overlong => write!(
                    f,
                    "page-encryption stream varint at byte {offset} is not in its shortest form \
                     (ends with a zero group)"
                ),
            },
            StreamError::UnknownRecord { offset, tag } => write!(
                f,
                "page-encryption stream record at byte {offset} has unknown tag {tag:#04x}; \
                 known are 0x01 (range) and 0x02 (bitmap)"
            ),
            StreamError::EmptyRecord { offset, start } => write!(
                f,
                "page-encryption stream record at byte {offset} (gfn {start:#x}) is empty; \
                 lengths and chunk counts must be at least 1"
            ),
            StreamError::Unsorted {
                offset,
                start,
                prev_start,
            } => write!(
                f,
                "page-encryption stream record at byte {offset} starts at gfn {start:#x}, before \
                 the previous record's start {prev_start:#x}; records must be ascending"
            ),
            StreamError::Overlap {
                offset,
                start,
                prev_end,
            } => write!(
                f,
                "page-encryption stream record at byte {offset} starts at gfn {start:#x}, inside \
                 the previous record which ends at {prev_end:#x}; records must not overlap"
            ),
            StreamError::NotMerged { offset, start } => write!(
                f,
                "page-encryption stream record at byte {offset} starts at gfn {start:#x}, where \
                 the previous record of the same kind ends; adjacent records must be merged"
            ),
            StreamError::OutOfRam { offset, start, len } => write!(
                f,
                "page-encryption stream record at byte {offset} marks {len} pages from gfn \
                 {start:#x} shared, which are not all RAM of the destination"
            ),
            StreamError::BitmapUnaligned { offset, start } => write!(
                f,
                "page-encryption stream bitmap record at byte {offset} starts at gfn {start:#x}, \
                 not a multiple of {CHUNK_PAGES:#x} pages"
            ),
            StreamError::EmptyBitmapChunk {
                offset,
                chunk_start,
            } => write!(
                f,
                "page-encryption stream bitmap chunk at byte {offset} (gfn {chunk_start:#x}) has \
                 no shared page; empty chunks must be left out"
            ),
            StreamError::TrailingBytes { offset, count } => write!(
                f,
                "page-encryption stream has {count} bytes after its last record at byte {offset}"
            ),
            StreamError::ChecksumMismatch {
                stored,
                computed,
                len,
            } => write!(
                f,
                "page-encryption stream is damaged: its CRC32C checksum is {stored:#010x} but \
                 its {} bytes before the checksum give {computed:#010x}; they must be equal",
                len.saturating_sub(4)
            ),
            StreamError::LayoutRangeMismatch {
                offset,
                index,
                stream,
                destination,
            } => write!(
                f,
                "page-encryption stream is for another RAM layout: source RAM range {index} \
                 (byte {offset}) is {}, destination's is {}; the RAM ranges must be equal",
                gpa_range(stream),
                gpa_range(destination)
            ),
            StreamError::CountMismatch {
                field,
                header,
                actual,
            } => {
                let what = match field {
                    CountField::SharedPages => "shared pages",
                    CountField::Ranges => "shared ranges",
                };
                write!(
                    f,
                    "page-encryption stream header says {header} {what} but its records hold \
                     {actual}"
                )
            }
        }
    }
}

impl std::error::Error for StreamError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StreamError::Io(e) => Some(e),
            StreamError::Tracker(e) => Some(e),
            _ => None,
        }
    }
}

impl From<TrackerError> for StreamError {
    fn from(e: TrackerError) -> Self {
        StreamError::Tracker(e)
    }
}

impl From<std::io::Error> for StreamError {
    fn from(e: std::io::Error) -> Self {
        StreamError::Io(e)
    }
}
