//! The encoder: a map and the MSR value into the stream bytes.

use std::io::Write;

use super::format::{
    checksum, off, put_varint, records_offset, varint_len, CHECKSUM_LEN, CHUNK_BYTES, CHUNK_PAGES,
    CHUNK_SHIFT, HEADER_LEN, MAGIC, TAG_BITMAP, TAG_RANGE, VERSION,
};
use super::StreamError;
use crate::core::PageMap;

/// Consecutive chunks written as one bitmap record: `[start, end)` in gfns, chunk aligned.
#[derive(Debug, Clone, Copy)]
struct Group {
    start: u64,
    end: u64,
}

/// What a shared piece `[start, end)` costs as a range record.
fn range_cost(start: u64, end: u64) -> usize {
    1 + varint_len(start) + varint_len(end - start)
}

/// Which chunks go out as bitmaps: those whose pieces of shared ranges would take more bytes as
/// range records than the chunk's 4 KiB bitmap. Consecutive bitmap chunks form one group.
///
/// Chunks strictly inside a range are wholly shared and cost one piece, so only the first and
/// last chunk of each range are looked at: O(ranges), whatever the ranges' lengths.
fn bitmap_groups(map: &PageMap) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    let mut cur: Option<(u64, usize)> = None;
    let finish = |groups: &mut Vec<Group>, (chunk, cost): (u64, usize)| {
        if cost > CHUNK_BYTES {
            let start = chunk << CHUNK_SHIFT;
            match groups.last_mut() {
                Some(g) if g.end == start => g.end += CHUNK_PAGES,
                _ => groups.push(Group {
                    start,
                    end: start + CHUNK_PAGES,
                }),
            }
        }
    };
    let mut add = |groups: &mut Vec<Group>, chunk: u64, cost: usize| match &mut cur {
        Some((c, total)) if *c == chunk => *total += cost,
        _ => {
            if let Some(done) = cur.replace((chunk, cost)) {
                finish(groups, done);
            }
        }
    };
    for r in map.shared_ranges() {
        let first = r.start >> CHUNK_SHIFT;
        let last = (r.end - 1) >> CHUNK_SHIFT;
        let first_end = r.end.min((first + 1) << CHUNK_SHIFT);
        add(&mut groups, first, range_cost(r.start, first_end));
        if last > first {
            add(&mut groups, last, range_cost(last << CHUNK_SHIFT, r.end));
        }
    }
    if let Some(done) = cur {
        finish(&mut groups, done);
    }
    groups
}

/// Sets bits `[from, to)` of a bitmap (bit `i` is bit `i % 8` of byte `i / 8`).
fn set_bits(bits: &mut [u8], from: u64, to: u64) {
    let (mut i, to) = (from as usize, to as usize);
    while i < to && i % 8 != 0 {
        bits[i / 8] |= 1 << (i % 8);
        i += 1;
    }
    let full_end = to - to % 8;
    if i < full_end {
        bits[i / 8..full_end / 8].fill(0xff);
        i = full_end;
    }
    while i < to {
        bits[i / 8] |= 1 << (i % 8);
        i += 1;
    }
}

/// Encodes `map` and the MSR value into a new vector.
pub fn encode_to_vec(map: &PageMap, msr: u64) -> Vec<u8> {
    encode_into(map, msr, Vec::with_capacity(HEADER_LEN + 64))
}

/// Encodes `map` and the MSR value into `out` (cleared first) and returns it. Given a vector
/// of capacity [`map_encoded_len`], it never reallocates: a caller that already knows the
/// length (`pagenc_save`) pays for one buffer, not for the doublings of a growing one.
pub fn encode_into(map: &PageMap, msr: u64, mut out: Vec<u8>) -> Vec<u8> {
    out.clear();
    let groups = bitmap_groups(map);
    let layout = map.layout();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&layout.pages().to_be_bytes());
    let ram_end = layout.ranges().last().map_or(0, |r| r.end);
    out.extend_from_slice(&ram_end.to_be_bytes());
    out.extend_from_slice(&msr.to_be_bytes());
    out.extend_from_slice(&map.shared_pages().to_be_bytes());
    // Range and record counts are patched in once known.
    out.extend_from_slice(&[0; 16]);
    debug_assert_eq!(out.len(), HEADER_LEN);
    // The source's RAM ranges, so that the destination can refuse any other layout (two
    // layouts can agree on size and end and still differ). A layout has at most
    // MAX_RAM_RANGES (4096) ranges, so the count fits its u32.
    out.extend_from_slice(&(layout.ranges().len() as u32).to_be_bytes());
    for r in layout.ranges() {
        out.extend_from_slice(&r.start.to_be_bytes());
        out.extend_from_slice(&r.end.to_be_bytes());
    }
    debug_assert_eq!(out.len(), records_offset(layout.ranges().len()));

    let (mut ranges, mut records) = (0u64, 0u64);
    let mut next_group = 0;
    // The bitmap record being filled: its gfn span and the offset of its first bit in `out`.
    let mut open: Option<(Group, usize)> = None;
    for r in map.shared_ranges() {
        ranges += 1;
        let mut pos = r.start;
        while pos < r.end {
            if let Some((g, bits)) = open {
                if pos < g.end {
                    let end = r.end.min(g.end);
                    set_bits(&mut out[bits..], pos - g.start, end - g.start);
                    pos = end;
                    continue;
                }
                open = None;
            }
            if let Some(&g) = groups.get(next_group) {
                // Every group holds shared pages and range pieces stop at its start, so the
                // first piece to reach it starts inside it.
                if g.start <= pos {
                    debug_assert!(pos < g.end, "piece at {pos:#x} skipped group {g:?}");
                    out.push(TAG_BITMAP);
                    put_varint(&mut out, g.start);
                    put_varint(&mut out, (g.end - g.start) >> CHUNK_SHIFT);
                    let bits = out.len();
                    out.resize(bits + ((g.end - g.start) / 8) as usize, 0);
                    open = Some((g, bits));
                    next_group += 1;
                    records += 1;
                    continue;
                }
            }
            let end = groups.get(next_group).map_or(r.end, |g| r.end.min(g.start));
            out.push(TAG_RANGE);
            put_varint(&mut out, pos);
            put_varint(&mut out, end - pos);
            records += 1;
            pos = end;
        }
    }
    debug_assert_eq!(next_group, groups.len());
    out[off::RANGE_COUNT..off::RANGE_COUNT + 8].copy_from_slice(&ranges.to_be_bytes());
    out[off::RECORD_COUNT..off::RECORD_COUNT + 8].copy_from_slice(&records.to_be_bytes());
    // The checksum covers every byte before it, so it is computed last.
    let crc = checksum(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

/// Encodes `map` and the MSR value into `out`; returns the bytes written.
pub fn encode(map: &PageMap, msr: u64, out: &mut impl Write) -> Result<usize, StreamError> {
    let bytes = encode_to_vec(map, msr);
    out.write_all(&bytes)?;
    Ok(bytes.len())
}

/// The exact length [`encode`] produces for `map`.
pub fn map_encoded_len(map: &PageMap) -> usize {
    let groups = bitmap_groups(map);
    let mut len = records_offset(map.layout().ranges().len()) + CHECKSUM_LEN;
    for g in &groups {
        len += 1 + varint_len(g.start) + varint_len((g.end - g.start) >> CHUNK_SHIFT);
        len += ((g.end - g.start) / 8) as usize;
    }
    let mut next_group = 0;
    for r in map.shared_ranges() {
        // The parts of `r` outside bitmap groups each take one range record.
        let mut pos = r.start;
        while pos < r.end {
            while groups.get(next_group).is_some_and(|g| g.end <= pos) {
                next_group += 1;
            }
            match groups.get(next_group) {
                Some(g) if g.start <= pos => pos = r.end.min(g.end),
                g => {
                    let end = g.map_or(r.end, |g| r.end.min(g.start));
                    len += range_cost(pos, end);
                    pos = end;
                }
            }
        }
    }
    len
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::PageRange;

    #[test]
    fn set_bits_fills_exactly() {
        for (from, to) in [(0, 1), (3, 5), (7, 9), (8, 16), (5, 30), (0, 64), (13, 13)] {
            let mut b = [0u8; 8];
            set_bits(&mut b, from, to);
            let v = u64::from_le_bytes(b);
            let want = if to == from {
                0
            } else {
                (u64::MAX >> (64 - (to - from))) << from
            };
            assert_eq!(v, want, "[{from}, {to})");
        }
    }

    #[test]
    fn groups_cover_only_costly_chunks() {
        let layout = crate::core::Layout::new(&[crate::core::RamRange {
            gpa: 0,
            size: (4 * CHUNK_PAGES) << 12,
        }])
        .unwrap();
        let mut b = crate::core::PageMapBuilder::new(layout);
        // Chunk 1: every other page; chunk 2: one range.
        for i in 0..CHUNK_PAGES / 2 {
            let s = CHUNK_PAGES + 2 * i;
            b.push(PageRange {
                start: s,
                end: s + 1,
            })
            .unwrap();
        }
        b.push(PageRange {
            start: 2 * CHUNK_PAGES + 5,
            end: 2 * CHUNK_PAGES + 9,
        })
        .unwrap();
        let g = bitmap_groups(&b.finish());
        assert_eq!(g.len(), 1);
        assert_eq!((g[0].start, g[0].end), (CHUNK_PAGES, 2 * CHUNK_PAGES));
    }
}
