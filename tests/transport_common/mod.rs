//! Shared by tests/transport*.rs: page-aligned guest RAM, its memslots for the simulated
//! firmware, and deterministic page contents.

#![allow(dead_code)]

use pagenc::transport::Memslot;

pub const PAGE: usize = 4096;

/// One guest page, page-aligned as the firmware's memslots require.
#[repr(C, align(4096))]
#[derive(Clone)]
pub struct Page(pub [u8; PAGE]);

/// The memslots of RAM laid out as `slots` ((gpa of the first page, number of pages) each),
/// whose pages are consecutive in `pages`.
pub fn memslots(slots: &[(u64, usize)], pages: &[Page]) -> Vec<Memslot> {
    let mut i = 0;
    slots
        .iter()
        .map(|&(gpa, n)| {
            let m = Memslot {
                gpa,
                size: (n * PAGE) as u64,
                host: pages[i].0.as_ptr() as u64,
            };
            i += n;
            m
        })
        .collect()
}

/// A deterministic byte generator (splitmix64).
pub fn fill(seed: u64, buf: &mut [u8]) {
    let mut x = seed;
    for chunk in buf.chunks_mut(8) {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
    }
}
