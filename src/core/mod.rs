//! The page map: which guest pages are shared (plaintext) and which are encrypted.
//!
//! Pure data structure: no FFI, no KVM, no locking, and no `unsafe` outside slot.rs (the
//! directory entry that packs a chunk into 16 bytes). Addresses are guest frame numbers (gfn,
//! 4 KiB pages); conversion from byte addresses happens at the edges.
//!
//! Every page of guest RAM starts encrypted; the map stores the shared ones as coalesced,
//! half-open ranges. Pages outside guest RAM are never stored (see [`Layout`]).

#![deny(unsafe_code)]

mod chunk;
mod layout;
mod map;
mod slot;

pub use chunk::BITMAP_WORDS;
pub use layout::{Layout, LayoutError, RamRange, MAX_RAM_RANGES};
pub use map::{BuildError, PageMap, PageMapBuilder, SharedRanges, UpdateSummary};

/// log2 of the page size the map tracks (4 KiB, the unit of KVM_HC_MAP_GPA_RANGE).
pub const PAGE_SHIFT: u32 = 12;
/// The page size in bytes.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// One past the highest gfn a guest can name: x86-64 guest physical addresses have at most 52
/// bits, so gfns are below 2^40.
pub const MAX_GFN: u64 = 1 << (52 - PAGE_SHIFT);

/// The encryption state of a guest page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageState {
    /// Private to the guest: encrypted with the guest's key (the default).
    Encrypted,
    /// Shared with the host: plaintext (C-bit clear).
    Shared,
}

impl PageState {
    /// True for [`PageState::Encrypted`].
    pub fn is_encrypted(self) -> bool {
        self == PageState::Encrypted
    }
}

/// A half-open range of guest frame numbers, `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageRange {
    /// First gfn in the range.
    pub start: u64,
    /// One past the last gfn.
    pub end: u64,
}

impl PageRange {
    /// The range `[start, end)`; `None` if it is empty or reversed.
    pub fn new(start: u64, end: u64) -> Option<PageRange> {
        (start < end).then_some(PageRange { start, end })
    }

    /// Number of pages.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// True if the range has no pages (never for ranges the map hands out).
    pub fn is_empty(&self) -> bool {
        self.start >= self.end
    }

    /// True if `gfn` lies in the range.
    pub fn contains(&self, gfn: u64) -> bool {
        self.start <= gfn && gfn < self.end
    }

    /// The overlap of two ranges, if any.
    pub fn intersect(&self, other: &PageRange) -> Option<PageRange> {
        PageRange::new(self.start.max(other.start), self.end.min(other.end))
    }
}

/// A maximal run of pages in one state, as the iterator and the cursor report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// The pages.
    pub range: PageRange,
    /// Their state.
    pub state: PageState,
}
