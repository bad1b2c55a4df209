//! The keyed-mode verifier (`pagenc::transport::Verifier`) against real migrations through the
//! simulated firmware (`SevTransport` over two `SimFirmware`s with different memory keys):
//! - pages sent as the list says pass, and are counted per kind;
//! - every way of getting it wrong is caught and named: a shared page through the firmware, an
//!   encrypted page copied (what zero-page detection would do), a stale classification (the list
//!   changed after the page went), a missed re-send (the page changed after it went);
//! - differentially (proptest): for any list and any way the pages actually went, the
//!   mismatches are exactly the pages whose way differs from the list, plus the pages changed
//!   after they were sent;
//! - bad input is refused with its reason, and equal keys (a check that could not fail) are.
//!
//! These tests are the verifier's negative controls: each wrong migration must be caught, and a
//! verifier that accepted everything (or compared the wrong shapes) fails them.

mod transport_common;

use std::sync::Arc;

use pagenc::transport::sev_abi::policy;
use pagenc::transport::{
    sim_amd_certs, Expected, Found, Memslot, SendParams, SevMode, SevTransport, SimConfig,
    SimFirmware, SimRole, Verifier, VerifyError, SIM_OPT_IN,
};
use proptest::prelude::*;
use transport_common::{fill, Page, PAGE};

const K_SRC: [u8; 32] = [0x51; 32];
const K_DST: [u8; 32] = [0xd7; 32];

/// Guest RAM: two memslots with a hole between them, as below and above 4 GiB.
const SLOTS: [(u64, usize); 2] = [(0x10_0000, 20), (0x1_0000_0000, 12)];

fn gpas() -> Vec<u64> {
    SLOTS
        .iter()
        .flat_map(|&(g, n)| (0..n).map(move |k| g + (k * PAGE) as u64))
        .collect()
}

fn memslots(pages: &[Page]) -> Vec<Memslot> {
    transport_common::memslots(&SLOTS, pages)
}

/// How a page went (or did not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    Firmware,
    Copy,
    /// Not sent at all (what zero-page detection does to a zero page: the destination keeps its
    /// own zeros).
    Skipped,
}

struct Migration {
    // Declared (so dropped) before the RAM their memslots point into.
    tx: (SevTransport, SevTransport),
    _fws: (Arc<SimFirmware>, Arc<SimFirmware>),
    src: Vec<Page>,
    dst: Vec<Page>,
}

impl Migration {
    /// Source RAM filled with `seed`-derived bytes (a zero page where `zero[i]`), session set up.
    fn new(seed: u64, zero: &[bool]) -> Migration {
        let n = gpas().len();
        let mut src = vec![Page([0; PAGE]); n];
        for (i, p) in src.iter_mut().enumerate() {
            if !zero.get(i).copied().unwrap_or(false) {
                fill(seed ^ ((i as u64) << 20), &mut p.0);
            }
        }
        let dst = vec![Page([0; PAGE]); n];
        let cfg = |role, key, id| SimConfig {
            role,
            policy: policy::NODBG,
            memory_key: key,
            platform_id: [id; 32],
        };
        // SAFETY: src and dst are moved into the Migration with the firmwares and never
        // reallocated; their heap pages stay where the memslots say while the firmwares live.
        let sfw = Arc::new(
            unsafe {
                SimFirmware::new(SIM_OPT_IN, cfg(SimRole::Source, K_SRC, 1), &memslots(&src))
            }
            .unwrap(),
        );
        // SAFETY: as above.
        let dfw = Arc::new(
            unsafe {
                SimFirmware::new(
                    SIM_OPT_IN,
                    cfg(SimRole::Destination, K_DST, 2),
                    &memslots(&dst),
                )
            }
            .unwrap(),
        );
        let stx = SevTransport::new(sfw.clone());
        let dtx = SevTransport::new(dfw.clone());
        let record = stx
            .send_start(&SendParams {
                policy: policy::NODBG,
                mode: SevMode::Sev,
                src_pdh: &sfw.pdh_cert(),
                dst_pdh: &dfw.pdh_cert(),
                dst_plat_certs: &dfw.platform_certs(),
                amd_certs: &sim_amd_certs(),
            })
            .unwrap()
            .encode()
            .unwrap();
        dtx.receive_start(&record, SevMode::Sev, policy::NODBG)
            .unwrap();
        Migration {
            tx: (stx, dtx),
            _fws: (sfw, dfw),
            src,
            dst,
        }
    }

    fn send(&mut self, i: usize, way: Way) {
        let gpa = gpas()[i];
        match way {
            Way::Copy => self.dst[i] = self.src[i].clone(),
            Way::Skipped => {}
            Way::Firmware => {
                let mut pk = vec![0u8; self.tx.0.packet_len()];
                // SAFETY: the page belongs to the source's memslots and lives as long as self.
                unsafe {
                    self.tx
                        .0
                        .send_page(gpa, self.src[i].0.as_ptr() as u64, &mut pk)
                }
                .unwrap();
                // SAFETY: as above, for the destination.
                unsafe {
                    self.tx
                        .1
                        .receive_page(gpa, self.dst[i].0.as_ptr() as u64, &pk)
                }
                .unwrap();
            }
        }
    }

    /// Runs the verifier over both slots, the way the command does (one range per slot).
    fn verify(&self, shared: &[(u64, u64)]) -> pagenc::transport::Report {
        let mut v = Verifier::new(K_SRC, K_DST, shared).unwrap();
        let mut i = 0;
        for &(gpa, n) in &SLOTS {
            let s: Vec<u8> = self.src[i..i + n].iter().flat_map(|p| p.0).collect();
            let d: Vec<u8> = self.dst[i..i + n].iter().flat_map(|p| p.0).collect();
            v.check(gpa, &s, &d).unwrap();
            i += n;
        }
        v.report().clone()
    }
}

/// The shared ranges of a per-page list (true = shared), coalesced, as query-pagenc gives them.
fn shared_ranges(list: &[bool]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (g, _) in gpas().into_iter().zip(list).filter(|(_, s)| **s) {
        match out.last_mut() {
            Some((start, size)) if *start + *size == g => *size += PAGE as u64,
            _ => out.push((g, PAGE as u64)),
        }
    }
    out
}

fn list_every_third_shared() -> Vec<bool> {
    (0..gpas().len()).map(|i| i % 3 == 1).collect()
}

fn way_of(shared: bool) -> Way {
    if shared {
        Way::Copy
    } else {
        Way::Firmware
    }
}

#[test]
fn a_migration_as_the_list_says_passes() {
    let list = list_every_third_shared();
    let mut m = Migration::new(1, &[]);
    for (i, &s) in list.iter().enumerate() {
        m.send(i, way_of(s));
    }
    let r = m.verify(&shared_ranges(&list));
    assert!(r.ok(), "{r}: {:?}", r.first);
    let n_shared = list.iter().filter(|s| **s).count() as u64;
    assert_eq!(r.shared_ok, n_shared);
    assert_eq!(r.encrypted_ok, list.len() as u64 - n_shared);
    assert_eq!(r.pages(), list.len() as u64);
}

#[test]
fn pages_sent_the_wrong_way_are_caught_and_named() {
    let list = list_every_third_shared();
    let mut m = Migration::new(2, &[]);
    let (shared_i, enc_i) = (1, 0);
    for (i, &s) in list.iter().enumerate() {
        let way = match i {
            _ if i == shared_i => Way::Firmware,
            _ if i == enc_i => Way::Copy,
            _ => way_of(s),
        };
        m.send(i, way);
    }
    let r = m.verify(&shared_ranges(&list));
    assert_eq!(r.mismatches, 2, "{r}");
    let g = gpas();
    let by_gpa = |gpa| r.first.iter().find(|x| x.gpa == gpa).copied().unwrap();
    let a = by_gpa(g[shared_i]);
    assert_eq!(
        (a.expected, a.found),
        (Expected::Shared, Found::AsEncrypted)
    );
    let b = by_gpa(g[enc_i]);
    assert_eq!(
        (b.expected, b.found),
        (Expected::Encrypted, Found::AsShared)
    );
    assert!(b.to_string().contains("sent the ordinary way"), "{b}");
}

#[test]
fn an_encrypted_zero_page_skipped_by_zero_page_detection_is_caught() {
    // The source's RAM of an encrypted page is all zero; the destination's is zero too, but the
    // firmware would have made it zero re-keyed. Zero-page detection must never see encrypted
    // pages.
    let list = list_every_third_shared();
    let zero: Vec<bool> = (0..list.len()).map(|i| i == 3 || i == 4).collect();
    let mut m = Migration::new(3, &zero);
    for (i, &s) in list.iter().enumerate() {
        m.send(i, if zero[i] { Way::Skipped } else { way_of(s) });
    }
    let r = m.verify(&shared_ranges(&list));
    let g = gpas();
    // Page 4 is shared (4 % 3 == 1): skipping a shared zero page is right. Page 3 is encrypted.
    assert_eq!(r.mismatches, 1, "{r}: {:?}", r.first);
    assert_eq!(r.first[0].gpa, g[3]);
    assert_eq!(r.first[0].expected, Expected::Encrypted);
}

#[test]
fn a_stale_classification_is_caught() {
    // The page went through the firmware, then the guest made it shared and the VMM did not
    // send it again: the final list says shared, the destination has the re-keyed old page.
    let mut list = list_every_third_shared();
    let mut m = Migration::new(4, &[]);
    for (i, &s) in list.iter().enumerate() {
        m.send(i, way_of(s));
    }
    list[6] = true;
    let r = m.verify(&shared_ranges(&list));
    assert_eq!(r.mismatches, 1, "{r}");
    let x = r.first[0];
    assert_eq!(
        (x.gpa, x.expected, x.found),
        (gpas()[6], Expected::Shared, Found::AsEncrypted)
    );
    // Re-sent the right way after the conversion: passes.
    m.send(6, Way::Copy);
    assert!(m.verify(&shared_ranges(&list)).ok());
}

#[test]
fn a_missed_resend_is_caught() {
    let list = list_every_third_shared();
    let mut m = Migration::new(5, &[]);
    for (i, &s) in list.iter().enumerate() {
        m.send(i, way_of(s));
    }
    // The guest writes an encrypted and a shared page after they went, and nothing re-sends.
    m.src[9].0[100] ^= 0xff;
    m.src[10].0[4000] ^= 1;
    let r = m.verify(&shared_ranges(&list));
    assert_eq!(r.mismatches, 2, "{r}");
    assert!(r.first.iter().all(|x| x.found == Found::Neither), "{r:?}");
    m.send(9, Way::Firmware);
    m.send(10, Way::Copy);
    assert!(m.verify(&shared_ranges(&list)).ok());
}

#[test]
fn chunked_checks_equal_one_check() {
    let list = list_every_third_shared();
    let mut m = Migration::new(6, &[]);
    for (i, &s) in list.iter().enumerate() {
        m.send(i, if i == 7 { way_of(!s) } else { way_of(s) });
    }
    let whole = m.verify(&shared_ranges(&list));
    let mut v = Verifier::new(K_SRC, K_DST, &shared_ranges(&list)).unwrap();
    // Page by page, in reverse order.
    for (i, g) in gpas().into_iter().enumerate().rev() {
        v.check(g, &m.src[i].0, &m.dst[i].0).unwrap();
    }
    let r = v.report();
    assert_eq!(
        (r.shared_ok, r.encrypted_ok, r.mismatches),
        (whole.shared_ok, whole.encrypted_ok, whole.mismatches)
    );
    assert_eq!(r.mismatches, 1);
}

#[test]
fn equal_keys_are_refused() {
    let e = Verifier::new([0; 32], [0; 32], &[]).unwrap_err();
    assert_eq!(e, VerifyError::SameKeys);
    assert!(e.to_string().contains("could not fail"), "{e}");
    assert!(Verifier::new([9; 32], [9; 32], &[]).is_err());
    assert!(Verifier::new([0; 32], [9; 32], &[]).is_ok());
}

#[test]
fn bad_shared_ranges_are_refused_with_their_reason() {
    for (ranges, why) in [
        (vec![(0x1000, 0)], "empty"),
        (vec![(0x1001, 0x1000)], "aligned"),
        (vec![(0x1000, 0x800)], "aligned"),
        (vec![(!0xfff_u64, 0x2000)], "wraps"),
        (vec![(0x4000, 0x2000), (0x1000, 0x4000)], "overlaps"),
    ] {
        let e = Verifier::new(K_SRC, K_DST, &ranges)
            .unwrap_err()
            .to_string();
        assert!(e.contains(why), "{ranges:?}: {e}");
    }
    assert!(Verifier::new(K_SRC, K_DST, &[(0x1000, 0x1000), (0x2000, 0x1000)]).is_ok());
}

#[test]
fn bad_dumps_are_refused_with_their_reason() {
    let mut v = Verifier::new(K_SRC, K_DST, &[]).unwrap();
    let p = vec![0u8; PAGE];
    let p2 = vec![0u8; 2 * PAGE];
    for (gpa, s, d, why) in [
        (0x1000, &p[..], &p2[..], "length between"),
        (0x1800, &p[..], &p[..], "whole 4 KiB"),
        (0x1000, &p[..100], &p[..100], "whole 4 KiB"),
        (!0xfff_u64, &p2[..], &p2[..], "wraps"),
    ] {
        let e = v.check(gpa, s, d).unwrap_err().to_string();
        assert!(e.contains(why), "{gpa:#x}: {e}");
    }
    assert_eq!(v.report().pages(), 0, "nothing counted from refused dumps");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// Differential against the obvious model: a page is a mismatch exactly when the way it went
    /// differs from what the list says, or it changed after it went.
    #[test]
    fn mismatches_are_exactly_the_pages_sent_against_the_list(
        seed in any::<u64>(),
        list in proptest::collection::vec(any::<bool>(), 32),
        flip in proptest::collection::vec(proptest::bool::weighted(0.15), 32),
        touched in proptest::collection::vec(proptest::bool::weighted(0.1), 32),
    ) {
        prop_assert_eq!(list.len(), gpas().len());
        let mut m = Migration::new(seed, &[]);
        for i in 0..list.len() {
            m.send(i, way_of(list[i] != flip[i]));
        }
        for (i, t) in touched.iter().enumerate() {
            if *t {
                m.src[i].0[(seed as usize) % PAGE] ^= 0x80;
            }
        }
        let r = m.verify(&shared_ranges(&list));
        let g = gpas();
        let want: Vec<u64> = (0..list.len()).filter(|&i| flip[i] || touched[i]).map(|i| g[i]).collect();
        let got: Vec<u64> = r.first.iter().map(|x| x.gpa).collect();
        prop_assert_eq!(got, want);
        for x in &r.first {
            let i = g.iter().position(|&a| a == x.gpa).unwrap();
            let want_found = if touched[i] {
                Found::Neither
            } else if list[i] {
                Found::AsEncrypted
            } else {
                Found::AsShared
            };
            prop_assert_eq!(x.found, want_found);
        }
    }
}
