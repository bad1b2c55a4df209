//! The guest's RAM layout: which gfns are RAM and therefore tracked.

use std::fmt;

use super::{PageRange, MAX_GFN, PAGE_SHIFT, PAGE_SIZE};

/// At most this many RAM ranges. QEMU hands over one entry per RAM section (below and above the
/// PCI hole, hotplugged DIMMs); the cap keeps a broken caller from making the layout itself the
/// unbounded part of the map.
pub const MAX_RAM_RANGES: usize = 4096;

/// One range of guest RAM in bytes, as the VMM describes it (`struct pagenc_ram_range`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRange {
    /// Guest physical address of the first byte; must be 4 KiB aligned.
    pub gpa: u64,
    /// Size in bytes; must be a non-zero multiple of 4 KiB.
    pub size: u64,
}

/// Why a RAM layout was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayoutError {
    /// More than [`MAX_RAM_RANGES`] ranges.
    TooManyRanges {
        /// How many were given.
        count: usize,
    },
    /// A range's address or size is not a multiple of 4 KiB.
    Unaligned {
        /// Index of the range in the caller's array.
        index: usize,
        /// The range.
        range: RamRange,
    },
    /// A range has size 0.
    Empty {
        /// Index of the range in the caller's array.
        index: usize,
        /// Its address.
        gpa: u64,
    },
    /// A range ends past the 52-bit guest physical address space.
    OutOfRange {
        /// Index of the range in the caller's array.
        index: usize,
        /// The range.
        range: RamRange,
    },
    /// Two ranges overlap.
    Overlap {
        /// The first range.
        a: RamRange,
        /// The second range.
        b: RamRange,
    },
}

impl fmt::Display for LayoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LayoutError::TooManyRanges { count } => write!(
                f,
                "RAM layout has {count} ranges; at most {MAX_RAM_RANGES} are allowed"
            ),
            LayoutError::Unaligned { index, range } => write!(
                f,
                "RAM range {index} (gpa {:#x}, size {:#x}) is not 4 KiB aligned; address and \
                 size must be multiples of 0x1000",
                range.gpa, range.size
            ),
            LayoutError::Empty { index, gpa } => write!(
                f,
                "RAM range {index} at gpa {gpa:#x} has size 0; sizes must be at least 0x1000"
            ),
            LayoutError::OutOfRange { index, range } => write!(
                f,
                "RAM range {index} (gpa {:#x}, size {:#x}) ends past the 52-bit guest physical \
                 address limit {:#x}",
                range.gpa,
                range.size,
                MAX_GFN << PAGE_SHIFT
            ),
            LayoutError::Overlap { a, b } => write!(
                f,
                "RAM ranges overlap: gpa {:#x}+{:#x} and gpa {:#x}+{:#x}; ranges must be disjoint",
                a.gpa, a.size, b.gpa, b.size
            ),
        }
    }
}

impl std::error::Error for LayoutError {}

/// A validated RAM layout: sorted, disjoint gfn ranges. Adjacent ranges are merged, since the
/// map does not care where one RAM section ends and the next begins.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    ranges: Vec<PageRange>,
    pages: u64,
}

impl Layout {
    /// Validates the VMM's description of guest RAM. The ranges may come in any order.
    pub fn new(ram: &[RamRange]) -> Result<Layout, LayoutError> {
        if ram.len() > MAX_RAM_RANGES {
            return Err(LayoutError::TooManyRanges { count: ram.len() });
        }
        let mut ranges: Vec<PageRange> = Vec::with_capacity(ram.len());
        let mut sorted: Vec<(PageRange, RamRange)> = Vec::with_capacity(ram.len());
        for (index, r) in ram.iter().enumerate() {
            if r.gpa % PAGE_SIZE != 0 || r.size % PAGE_SIZE != 0 {
                return Err(LayoutError::Unaligned { index, range: *r });
            }
            if r.size == 0 {
                return Err(LayoutError::Empty { index, gpa: r.gpa });
            }
            let start = r.gpa >> PAGE_SHIFT;
            match start.checked_add(r.size >> PAGE_SHIFT) {
                Some(end) if end <= MAX_GFN => sorted.push((PageRange { start, end }, *r)),
                _ => return Err(LayoutError::OutOfRange { index, range: *r }),
            }
        }
        sorted.sort_by_key(|(p, _)| p.start);
        for w in sorted.windows(2) {
            if w[1].0.start < w[0].0.end {
                return Err(LayoutError::Overlap {
                    a: w[0].1,
                    b: w[1].1,
                });
            }
        }
        let mut pages = 0;
        for (p, _) in sorted {
            pages += p.len();
            match ranges.last_mut() {
                Some(last) if last.end == p.start => last.end = p.end,
                _ => ranges.push(p),
            }
        }
        Ok(Layout { ranges, pages })
    }

    /// The RAM ranges, sorted and coalesced.
    pub fn ranges(&self) -> &[PageRange] {
        &self.ranges
    }

    /// Total pages of RAM.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// True if `gfn` is RAM.
    pub fn contains(&self, gfn: u64) -> bool {
        let i = self.ranges.partition_point(|r| r.end <= gfn);
        self.ranges.get(i).is_some_and(|r| r.contains(gfn))
    }

    /// The parts of `range` that are RAM, in ascending order.
    pub fn clip(&self, range: PageRange) -> impl Iterator<Item = PageRange> + '_ {
        let first = self.ranges.partition_point(|r| r.end <= range.start);
        self.ranges[first..]
            .iter()
            .take_while(move |r| r.start < range.end)
            .filter_map(move |r| r.intersect(&range))
    }

    /// The lowest RAM gfn at or after `gfn`, if any.
    pub fn next_ram(&self, gfn: u64) -> Option<u64> {
        let i = self.ranges.partition_point(|r| r.end <= gfn);
        self.ranges.get(i).map(|r| r.start.max(gfn))
    }
}
