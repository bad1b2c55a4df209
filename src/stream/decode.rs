//! The decoder: stream bytes into a map over the destination's layout, hostile-input safe.
//!
//! Nothing is allocated from a count in the stream: counts are checked against the remaining
//! bytes, and every range is checked against the destination's RAM before the builder stores
//! it, so the map that is built is bounded by a bitmap of the destination's RAM.

use super::error::{CountField, LayoutField, VarintProblem};
use super::format::{
    checksum, off, CHECKSUM_LEN, CHUNK_BYTES, CHUNK_PAGES, HEADER_LEN, KNOWN_VERSIONS,
    LAYOUT_COUNT_LEN, LAYOUT_ENTRY_LEN, MAGIC, MAX_VARINT_LEN, MIN_RECORD_LEN, TAG_BITMAP,
    TAG_RANGE,
};
use super::StreamError;
use crate::core::{BuildError, Layout, PageMap, PageMapBuilder, PageRange};
use crate::hypercall;
use crate::kvm::consts::MSR_KVM_MIGRATION_CONTROL;

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], StreamError> {
        if n > self.remaining() {
            return Err(StreamError::Truncated {
                what,
                offset: self.pos,
                needed: n as u64,
                available: self.remaining(),
            });
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn byte(&mut self, what: &'static str) -> Result<u8, StreamError> {
        Ok(self.take(1, what)?[0])
    }

    fn varint(&mut self, what: &'static str) -> Result<u64, StreamError> {
        let start = self.pos;
        let mut v = 0u64;
        for i in 0..MAX_VARINT_LEN {
            let Some(&b) = self.bytes.get(self.pos) else {
                return Err(StreamError::Truncated {
                    what,
                    offset: start,
                    needed: (i + 1) as u64,
                    available: i,
                });
            };
            self.pos += 1;
            let group = (b & 0x7f) as u64;
            if i == MAX_VARINT_LEN - 1 && b > 1 {
                return Err(StreamError::BadVarint {
                    offset: start,
                    problem: VarintProblem::Overflow,
                });
            }
            v |= group << (7 * i);
            if b & 0x80 == 0 {
                if b == 0 && i > 0 {
                    return Err(StreamError::BadVarint {
                        offset: start,
                        problem: VarintProblem::Overlong,
                    });
                }
                return Ok(v);
            }
        }
        Err(StreamError::BadVarint {
            offset: start,
            problem: VarintProblem::Overflow,
        })
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Reads the layout block (the source's RAM ranges) and compares it with the destination's
/// layout range by range: the same size and end are not enough (RAM [0,3G)+[4G,9G) and
/// [0,2G)+[3G,9G) agree on both).
fn check_layout(r: &mut Reader<'_>, layout: &Layout) -> Result<(), StreamError> {
    let count = be32(r.take(LAYOUT_COUNT_LEN, "layout range count")?, 0) as usize;
    // Bounded by the bytes there are before anything is read or compared.
    if count > r.remaining() / LAYOUT_ENTRY_LEN {
        return Err(StreamError::Truncated {
            what: "layout ranges",
            offset: r.pos,
            needed: count as u64 * LAYOUT_ENTRY_LEN as u64,
            available: r.remaining(),
        });
    }
    let at = r.pos;
    let block = r.take(count * LAYOUT_ENTRY_LEN, "layout ranges")?;
    let dest = layout.ranges();
    for index in 0..count.max(dest.len()) {
        let stream = (index < count).then(|| PageRange {
            start: be64(block, index * LAYOUT_ENTRY_LEN),
            end: be64(block, index * LAYOUT_ENTRY_LEN + 8),
        });
        let destination = dest.get(index).copied();
        if stream != destination {
            return Err(StreamError::LayoutRangeMismatch {
                offset: at + index * LAYOUT_ENTRY_LEN,
                index,
                stream,
                destination,
            });
        }
    }
    Ok(())
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Range,
    Bitmap,
}

/// Running state of the record checks and of the counts the header is checked against.
struct Body {
    builder: PageMapBuilder,
    /// The previous record: kind and gfn span.
    prev: Option<(Kind, u64, u64)>,
    shared_pages: u64,
    ranges: u64,
    /// End of the last shared range pushed, to count maximal ranges across records.
    last_end: Option<u64>,
}

impl Body {
    fn order(&self, offset: usize, kind: Kind, start: u64) -> Result<(), StreamError> {
        if let Some((pk, ps, pe)) = self.prev {
            if start < ps {
                return Err(StreamError::Unsorted {
                    offset,
                    start,
                    prev_start: ps,
                });
            }
            if start < pe {
                return Err(StreamError::Overlap {
                    offset,
                    start,
                    prev_end: pe,
                });
            }
            if start == pe && kind == pk {
                return Err(StreamError::NotMerged { offset, start });
            }
        }
        Ok(())
    }

    fn push(&mut self, offset: usize, range: PageRange) -> Result<(), StreamError> {
        self.builder.push(range).map_err(|e| match e {
            BuildError::NotRam { range } => StreamError::OutOfRam {
                offset,
                start: range.start,
                len: range.len(),
            },
            // The record order checks come first, so this means the runs of one bitmap were
            // out of order, which cannot happen; report it as an overlap rather than panic.
            BuildError::Unsorted { range, prev_end } => StreamError::Overlap {
                offset,
                start: range.start,
                prev_end,
            },
        })?;
        self.shared_pages += range.len();
        if self.last_end != Some(range.start) {
            self.ranges += 1;
        }
        self.last_end = Some(range.end);
        Ok(())
    }

    fn range(&mut self, r: &mut Reader<'_>, offset: usize) -> Result<(), StreamError> {
        let start = r.varint("range start")?;
        let len = r.varint("range length")?;
        if len == 0 {
            return Err(StreamError::EmptyRecord { offset, start });
        }
        let Some(end) = start.checked_add(len) else {
            return Err(StreamError::OutOfRam { offset, start, len });
        };
        self.order(offset, Kind::Range, start)?;
        self.push(offset, PageRange { start, end })?;
        self.prev = Some((Kind::Range, start, end));
        Ok(())
    }

    fn bitmap(&mut self, r: &mut Reader<'_>, offset: usize) -> Result<(), StreamError> {
        let start = r.varint("bitmap start")?;
        let chunks = r.varint("bitmap chunk count")?;
        if chunks == 0 {
            return Err(StreamError::EmptyRecord { offset, start });
        }
        if start % CHUNK_PAGES != 0 {
            return Err(StreamError::BitmapUnaligned { offset, start });
        }
        let len = chunks.saturating_mul(CHUNK_PAGES);
        let Some(end) = start.checked_add(len) else {
            return Err(StreamError::OutOfRam { offset, start, len });
        };
        if chunks > (r.remaining() / CHUNK_BYTES) as u64 {
            return Err(StreamError::Truncated {
                what: "bitmap",
                offset: r.pos,
                needed: chunks.saturating_mul(CHUNK_BYTES as u64),
                available: r.remaining(),
            });
        }
        self.order(offset, Kind::Bitmap, start)?;
        let bits = r.take(chunks as usize * CHUNK_BYTES, "bitmap")?;
        let bits_offset = r.pos - bits.len();
        // The shared run being collected, carried across words and chunks.
        let mut run: Option<u64> = None;
        for (c, chunk) in bits.chunks_exact(CHUNK_BYTES).enumerate() {
            let base = start + c as u64 * CHUNK_PAGES;
            let chunk_offset = bits_offset + c * CHUNK_BYTES;
            if chunk.iter().all(|&b| b == 0) {
                return Err(StreamError::EmptyBitmapChunk {
                    offset: chunk_offset,
                    chunk_start: base,
                });
            }
            for (w, word) in chunk.chunks_exact(8).enumerate() {
                let mut a = [0u8; 8];
                a.copy_from_slice(word);
                let word = u64::from_le_bytes(a);
                let wbase = base + 64 * w as u64;
                let mut bit = 0u32;
                // Walk the word's transitions: at most 64 of them, usually none.
                while bit < 64 {
                    let rest = word >> bit;
                    match run {
                        None => {
                            if rest == 0 {
                                break;
                            }
                            bit += rest.trailing_zeros();
                            run = Some(wbase + bit as u64);
                        }
                        Some(s) => {
                            let ones = (!rest).trailing_zeros();
                            if ones >= 64 - bit {
                                break;
                            }
                            bit += ones;
                            self.push(
                                chunk_offset,
                                PageRange {
                                    start: s,
                                    end: wbase + bit as u64,
                                },
                            )?;
                            run = None;
                        }
                    }
                }
            }
            if let Some(s) = run {
                // A run that reaches the end of the record's last chunk ends there.
                if c + 1 == chunks as usize {
                    self.push(chunk_offset, PageRange { start: s, end })?;
                    run = None;
                }
            }
        }
        debug_assert!(run.is_none());
        self.prev = Some((Kind::Bitmap, start, end));
        Ok(())
    }
}

/// Decodes a stream against the destination's `layout`: the map and the MSR value, or the
/// first thing wrong with the stream.
///
/// Order: magic, version (so that a newer stream is named as such whatever its shape), then the
/// CRC32C trailer over all the bytes before it, before any other field is believed; then the
/// header against the destination's layout, then the records.
pub fn decode(layout: &Layout, bytes: &[u8]) -> Result<(PageMap, u64), StreamError> {
    let mut r = Reader { bytes, pos: 0 };
    let magic = r.take(MAGIC.len(), "magic")?;
    if magic != MAGIC {
        let mut found = [0; 4];
        found.copy_from_slice(magic);
        return Err(StreamError::BadMagic { found });
    }
    // The version decides the header's shape, so it is checked before the rest is read.
    let version = be16(r.take(2, "version")?, 0);
    if !KNOWN_VERSIONS.contains(&version) {
        return Err(StreamError::UnsupportedVersion { found: version });
    }
    let min = HEADER_LEN + LAYOUT_COUNT_LEN + CHECKSUM_LEN;
    if bytes.len() < min {
        return Err(StreamError::Truncated {
            what: "header and checksum",
            offset: r.pos,
            needed: (min - r.pos) as u64,
            available: r.remaining(),
        });
    }
    let (covered, trailer) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
    let stored = be32(trailer, 0);
    let computed = checksum(covered);
    if stored != computed {
        return Err(StreamError::ChecksumMismatch {
            stored,
            computed,
            len: bytes.len(),
        });
    }
    // From here on the records end where the checksum starts.
    let mut r = Reader {
        bytes: covered,
        pos: r.pos,
    };
    let rest = r.take(HEADER_LEN - off::FLAGS, "header")?;
    let h = |at: usize| at - off::FLAGS;
    let flags = be16(rest, h(off::FLAGS));
    if flags != 0 {
        return Err(StreamError::ReservedFlags { flags });
    }
    let ram_pages = be64(rest, h(off::RAM_PAGES));
    if ram_pages != layout.pages() {
        return Err(StreamError::LayoutMismatch {
            field: LayoutField::RamPages,
            stream: ram_pages,
            destination: layout.pages(),
        });
    }
    let ram_end = be64(rest, h(off::RAM_END));
    let dest_end = layout.ranges().last().map_or(0, |r| r.end);
    if ram_end != dest_end {
        return Err(StreamError::LayoutMismatch {
            field: LayoutField::RamEnd,
            stream: ram_end,
            destination: dest_end,
        });
    }
    check_layout(&mut r, layout)?;
    let msr = be64(rest, h(off::MSR));
    if hypercall::validate_migration_control(MSR_KVM_MIGRATION_CONTROL, msr).is_err() {
        return Err(StreamError::BadMsr { value: msr });
    }
    let shared_pages = be64(rest, h(off::SHARED_PAGES));
    let range_count = be64(rest, h(off::RANGE_COUNT));
    let records = be64(rest, h(off::RECORD_COUNT));
    let max = (r.remaining() / MIN_RECORD_LEN) as u64;
    if records > max {
        return Err(StreamError::RecordCountTooLarge {
            count: records,
            max,
        });
    }

    let mut body = Body {
        builder: PageMapBuilder::new(layout.clone()),
        prev: None,
        shared_pages: 0,
        ranges: 0,
        last_end: None,
    };
    for _ in 0..records {
        let offset = r.pos;
        match r.byte("record tag")? {
            TAG_RANGE => body.range(&mut r, offset)?,
            TAG_BITMAP => body.bitmap(&mut r, offset)?,
            tag => return Err(StreamError::UnknownRecord { offset, tag }),
        }
    }
    if r.remaining() > 0 {
        return Err(StreamError::TrailingBytes {
            offset: r.pos,
            count: r.remaining(),
        });
    }
    if body.shared_pages != shared_pages {
        return Err(StreamError::CountMismatch {
            field: CountField::SharedPages,
            header: shared_pages,
            actual: body.shared_pages,
        });
    }
    if body.ranges != range_count {
        return Err(StreamError::CountMismatch {
            field: CountField::Ranges,
            header: range_count,
            actual: body.ranges,
        });
    }
    Ok((body.builder.finish(), msr))
}
