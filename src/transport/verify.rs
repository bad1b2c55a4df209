//! The keyed-mode check of a migration through the simulated SEV firmware (issue 14's proof).
//!
//! With a different memory key per side, the simulated firmware leaves a page on the destination
//! in one of two shapes: **equal to the source** (it went the ordinary way: shared), or **equal to
//! the source re-keyed** (it went through SEND/RECEIVE_UPDATE_DATA: decrypted under the source's
//! key, encrypted under the destination's, [`rekey_page`]). Given both sides' guest memory (dumps
//! of guest-physical ranges taken with the destination paused), the final page list (the shared
//! ranges) and the two keys, [`Verifier`] checks every page against the shape the list demands.
//!
//! What that catches: a page sent the wrong way (through the firmware although shared, or copied
//! although encrypted, e.g. by zero-page detection), a missed re-send after a conversion or a
//! write (the destination holds an old version: neither shape), a stale or wrong classification
//! (the list says one thing, the stream did the other), a ROM or VRAM page sent through the
//! firmware if its range is checked as guest RAM by mistake — and the other way round.
//!
//! It cannot work with equal keys (both shapes coincide): [`Verifier::new`] refuses them, so a
//! check that cannot fail is never run by accident. Identity-mode migrations are checked by
//! comparing memory and by the guest's own checks instead.

use std::fmt;

use super::simfw::rekey_page;

const PAGE: u64 = 4096;

/// How many mismatching pages a [`Report`] lists (all are counted).
pub const MISMATCHES_LISTED: usize = 64;

/// What the final page list says a page is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    /// In a shared range: must arrive as it is on the source.
    Shared,
    /// Guest RAM outside every shared range: must arrive re-keyed.
    Encrypted,
}

/// What the destination's page looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// Equal to the source: it went the ordinary way.
    AsShared,
    /// Equal to the source re-keyed: it went through the firmware.
    AsEncrypted,
    /// Neither: a stale version (missed re-send), garbage, or a page nobody sent.
    Neither,
}

/// One page that does not have the shape the list demands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mismatch {
    /// Guest-physical address of the page.
    pub gpa: u64,
    /// What the list says.
    pub expected: Expected,
    /// What the destination holds.
    pub found: Found,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let want = match self.expected {
            Expected::Shared => "shared: must equal the source",
            Expected::Encrypted => "encrypted: must equal the source re-keyed",
        };
        let got = match self.found {
            Found::AsShared => "equals the source (sent the ordinary way)",
            Found::AsEncrypted => "equals the source re-keyed (sent through the firmware)",
            Found::Neither => "is neither (stale, never sent, or damaged)",
        };
        write!(
            f,
            "page {:#x}: the list says {want}; the destination {got}",
            self.gpa
        )
    }
}

/// The outcome of a check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Pages the list calls shared that arrived equal to the source.
    pub shared_ok: u64,
    /// Pages the list calls encrypted that arrived re-keyed.
    pub encrypted_ok: u64,
    /// Pages of the wrong shape (all of them counted).
    pub mismatches: u64,
    /// The first [`MISMATCHES_LISTED`] of them, in the order checked.
    pub first: Vec<Mismatch>,
}

impl Report {
    /// Pages checked.
    pub fn pages(&self) -> u64 {
        self.shared_ok + self.encrypted_ok + self.mismatches
    }

    /// Whether every page had the shape the list demands.
    pub fn ok(&self) -> bool {
        self.mismatches == 0
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pages {} shared-ok {} encrypted-ok {} mismatches {}",
            self.pages(),
            self.shared_ok,
            self.encrypted_ok,
            self.mismatches
        )
    }
}

/// Why a check could not be made (as opposed to a check that found mismatches).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyError {
    /// The two memory keys are equal: both shapes coincide and the check could not fail.
    SameKeys,
    /// A shared range is empty, unaligned, wraps, or overlaps another.
    SharedRange {
        /// Its index in the list given.
        index: usize,
        /// Start.
        gpa: u64,
        /// Length in bytes.
        size: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// A dumped range is unaligned, wraps, or its two sides differ in length.
    Dump {
        /// Its guest-physical start.
        gpa: u64,
        /// The source's length.
        src_len: usize,
        /// The destination's length.
        dst_len: usize,
        /// What is wrong.
        reason: &'static str,
    },
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VerifyError::SameKeys => write!(
                f,
                "the source and destination memory keys are equal: shared and encrypted pages \
                 would look the same, so the check could not fail; give two different keys"
            ),
            VerifyError::SharedRange {
                index,
                gpa,
                size,
                reason,
            } => write!(
                f,
                "shared range {index} (gpa {gpa:#x}, size {size:#x}) {reason}; ranges must be \
                 non-empty, 4 KiB aligned and disjoint"
            ),
            VerifyError::Dump {
                gpa,
                src_len,
                dst_len,
                reason,
            } => write!(
                f,
                "dumped range at gpa {gpa:#x} (source {src_len} bytes, destination {dst_len} \
                 bytes) {reason}; dumps must start on a 4 KiB page and be whole pages, the same \
                 length on both sides"
            ),
        }
    }
}

impl std::error::Error for VerifyError {}

/// Checks dumped guest memory page by page against the final page list (see the module
/// documentation). Feed it any number of ranges with [`Verifier::check`], in any order and in
/// pieces of any page-multiple size, then read [`Verifier::report`].
#[derive(Clone)]
pub struct Verifier {
    src_key: [u8; 32],
    dst_key: [u8; 32],
    /// Sorted, disjoint, half-open [start, end).
    shared: Vec<(u64, u64)>,
    report: Report,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keys stay out of logs, as in SimConfig.
        f.debug_struct("Verifier")
            .field("shared_ranges", &self.shared.len())
            .field("report", &self.report)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier for a migration from a source with memory key `src_key` to a destination with
    /// `dst_key`, whose final list has the shared ranges `shared` as (gpa, size in bytes).
    pub fn new(
        src_key: [u8; 32],
        dst_key: [u8; 32],
        shared: &[(u64, u64)],
    ) -> Result<Verifier, VerifyError> {
        if src_key == dst_key {
            return Err(VerifyError::SameKeys);
        }
        let mut ranges = Vec::with_capacity(shared.len());
        for (index, &(gpa, size)) in shared.iter().enumerate() {
            let bad = |reason| {
                Err(VerifyError::SharedRange {
                    index,
                    gpa,
                    size,
                    reason,
                })
            };
            if size == 0 {
                return bad("is empty");
            }
            if gpa % PAGE != 0 || size % PAGE != 0 {
                return bad("is not 4 KiB aligned");
            }
            let Some(end) = gpa.checked_add(size) else {
                return bad("wraps around the address space");
            };
            ranges.push((gpa, end, index));
        }
        ranges.sort_unstable();
        for w in ranges.windows(2) {
            if w[0].1 > w[1].0 {
                let (gpa, end, index) = w[1];
                return Err(VerifyError::SharedRange {
                    index,
                    gpa,
                    size: end - gpa,
                    reason: "overlaps another shared range",
                });
            }
        }
        Ok(Verifier {
            src_key,
            dst_key,
            shared: ranges.into_iter().map(|(s, e, _)| (s, e)).collect(),
            report: Report::default(),
        })
    }

    /// What the list says of the page at `gpa`.
    pub fn expected(&self, gpa: u64) -> Expected {
        let i = self.shared.partition_point(|&(start, _)| start <= gpa);
        match i.checked_sub(1).map(|i| self.shared[i]) {
            Some((_, end)) if gpa < end => Expected::Shared,
            _ => Expected::Encrypted,
        }
    }

    /// Checks the guest-physical range starting at `gpa`: `src` is the source's memory there,
    /// `dst` the destination's (whole pages, the same length). Every page in it is guest RAM
    /// classified by the list; do not pass ranges that are not guest RAM (ROM, VRAM, MMIO).
    pub fn check(&mut self, gpa: u64, src: &[u8], dst: &[u8]) -> Result<(), VerifyError> {
        let bad = |reason| {
            Err(VerifyError::Dump {
                gpa,
                src_len: src.len(),
                dst_len: dst.len(),
                reason,
            })
        };
        if src.len() != dst.len() {
            return bad("differs in length between the sides");
        }
        if gpa % PAGE != 0 || src.len() as u64 % PAGE != 0 {
            return bad("is not whole 4 KiB pages");
        }
        if gpa.checked_add(src.len() as u64).is_none() {
            return bad("wraps around the address space");
        }
        let mut rekeyed = [0u8; PAGE as usize];
        for (k, (s, d)) in src
            .chunks_exact(PAGE as usize)
            .zip(dst.chunks_exact(PAGE as usize))
            .enumerate()
        {
            let page_gpa = gpa + k as u64 * PAGE;
            let found = if s == d {
                Found::AsShared
            } else {
                rekeyed.copy_from_slice(s);
                rekey_page(&self.src_key, &self.dst_key, page_gpa, &mut rekeyed);
                if rekeyed.as_slice() == d {
                    Found::AsEncrypted
                } else {
                    Found::Neither
                }
            };
            let expected = self.expected(page_gpa);
            let r = &mut self.report;
            match (expected, found) {
                (Expected::Shared, Found::AsShared) => r.shared_ok += 1,
                (Expected::Encrypted, Found::AsEncrypted) => r.encrypted_ok += 1,
                _ => {
                    r.mismatches += 1;
                    if r.first.len() < MISMATCHES_LISTED {
                        r.first.push(Mismatch {
                            gpa: page_gpa,
                            expected,
                            found,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// The outcome so far.
    pub fn report(&self) -> &Report {
        &self.report
    }
}
