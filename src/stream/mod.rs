//! The migration-stream encoding of the page-encryption list and the MSR readiness value.
//!
//! The format is documented field by field in `docs/stream-format.md`. In short: a 56-byte
//! big-endian header (magic `PGEL`, version, flags, the source's RAM layout summary, the MSR
//! value, shared pages, range and record counts), the source's RAM ranges, then records in
//! ascending gfn order, then a CRC32C of everything before it: a range record (varint start gfn
//! and length, 64-bit page numbers) for each shared range, or a bitmap record for runs of
//! 2^15-page chunks whose ranges would take more bytes than the chunk's 4 KiB bitmap. So an
//! ordinary map costs a few bytes per range, and a hostile, fragmented one never much more than
//! a bitmap of guest RAM.
//!
//! Loading checks the checksum first, then everything against the destination's layout (its
//! ranges, not only its size) and the remaining bytes before using it, builds the new map aside
//! and swaps it in only when the whole stream was good: a failed [`load`] leaves the tracker
//! exactly as it was.

mod decode;
mod encode;
mod error;
pub mod format;

pub use decode::decode;
pub use encode::{encode, encode_into, encode_to_vec, map_encoded_len};
pub use error::{
    CountField, LayoutField, StreamError, StreamErrorKind, StreamProblem, VarintProblem,
};

use crate::tracker::Tracker;

/// The exact number of bytes [`save`] would write for the tracker's current map (computed from
/// a snapshot, without encoding, after the lock is released).
pub fn encoded_len(t: &Tracker) -> Result<usize, StreamError> {
    let (map, _) = t.snapshot()?;
    Ok(map_encoded_len(&map))
}

/// The tracker's map and MSR value as a stream, in a new vector: one encode of a snapshot
/// taken under the lock in O(chunks), done after the lock is released.
pub fn save_to_vec(t: &Tracker) -> Result<Vec<u8>, StreamError> {
    let (map, msr) = t.snapshot()?;
    Ok(encode_to_vec(&map, msr))
}

/// Writes the tracker's map and MSR value to `out`; returns the bytes written.
///
/// The stream is encoded from a snapshot (taken under the tracker's lock in O(chunks): the
/// chunks are shared copy-on-write) after the lock is released, and written after that, so
/// neither the encoding nor a writer that blocks (a socket) holds up the vCPUs, and a writer
/// that calls back into the tracker does not deadlock.
pub fn save(t: &Tracker, out: &mut impl std::io::Write) -> Result<usize, StreamError> {
    let bytes = save_to_vec(t)?;
    out.write_all(&bytes)?;
    Ok(bytes.len())
}

/// Replaces the tracker's map and MSR value with the stream's, all or nothing: on any error the
/// tracker is left exactly as it was (no callback is called).
///
/// The stream is decoded against the tracker's current layout; if the VMM changes the layout
/// ([`Tracker::set_layout`]) while a load runs, the swap is refused
/// (`TrackerError::LayoutMismatch`) and the tracker keeps its old map.
pub fn load(t: &Tracker, bytes: &[u8]) -> Result<(), StreamError> {
    let layout = t.layout()?;
    let (map, msr) = decode(&layout, bytes)?;
    t.replace(map, msr)?;
    Ok(())
}
