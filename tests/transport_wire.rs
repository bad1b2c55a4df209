//! The transport's wire format against hostile input (proptest): the session record and the
//! page packet decode arbitrary bytes without panicking, refuse every truncation and every
//! trailing byte, cap every length before allocating, and round-trip what the encoder writes.

use pagenc::transport::wire::{
    Packet, PacketPrefix, SessionRecord, WireError, PACKET_MAX_LEN, PACKET_PREFIX_LEN,
    SESSION_FIXED_LEN, SESSION_MAX_LEN,
};
use proptest::prelude::*;

fn record() -> impl Strategy<Value = SessionRecord> {
    (
        any::<u32>(),
        1u32..=16384,
        prop::collection::vec(any::<u8>(), 1..200),
        prop::collection::vec(any::<u8>(), 1..200),
    )
        .prop_map(|(policy, hdr_len, pdh, session)| SessionRecord {
            policy,
            hdr_len,
            pdh,
            session,
        })
}

fn packet_bytes() -> impl Strategy<Value = (PacketPrefix, Vec<u8>)> {
    (0u64..(1 << 40), 1u32..=128, 1u32..=4096).prop_flat_map(|(pfn, hdr_len, trans_len)| {
        let prefix = PacketPrefix {
            gpa: pfn << 12,
            hdr_len,
            trans_len,
        };
        prop::collection::vec(any::<u8>(), (hdr_len + trans_len) as usize).prop_map(move |body| {
            let mut b = vec![0u8; PACKET_PREFIX_LEN];
            prefix.write(&mut b);
            b.extend_from_slice(&body);
            (prefix, b)
        })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(b in prop::collection::vec(any::<u8>(), 0..600)) {
        if let Ok(r) = SessionRecord::decode(&b) {
            prop_assert_eq!(r.encode().unwrap(), b.clone());
        }
        if let Ok(p) = Packet::decode(&b) {
            prop_assert_eq!(p.prefix.packet_len(), b.len());
        }
        let _ = PacketPrefix::decode(&b);
    }

    #[test]
    fn session_records_round_trip_and_every_cut_is_refused(r in record()) {
        let b = r.encode().unwrap();
        prop_assert!(b.len() <= SESSION_MAX_LEN);
        prop_assert_eq!(SessionRecord::decode(&b).unwrap(), r);
        for cut in 0..b.len() {
            let is_truncated = matches!(
                SessionRecord::decode(&b[..cut]),
                Err(WireError::Truncated { .. })
            );
            prop_assert!(is_truncated, "cut at {}", cut);
        }
        let mut long = b.clone();
        long.push(0);
        let is_trailing = matches!(
            SessionRecord::decode(&long),
            Err(WireError::Trailing { .. })
        );
        prop_assert!(is_trailing);
    }

    #[test]
    fn a_mutated_session_record_decodes_to_itself_or_an_error(
        r in record(), at in any::<prop::sample::Index>(), bit in 0u8..8
    ) {
        let mut b = r.encode().unwrap();
        let i = at.index(b.len());
        b[i] ^= 1 << bit;
        match SessionRecord::decode(&b) {
            // Only the policy, the header length and the blobs' contents may change silently:
            // the firmware's tag over the session catches a changed policy or blob, and the
            // destination refuses packets whose header length differs (tests/transport.rs).
            Ok(d) => {
                prop_assert!(i >= 8 && !(16..SESSION_FIXED_LEN).contains(&i), "byte {}", i);
                prop_assert_eq!(d.encode().unwrap(), b);
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn packets_round_trip_and_every_cut_is_refused((prefix, b) in packet_bytes()) {
        prop_assert!(b.len() <= PACKET_MAX_LEN);
        let p = Packet::decode(&b).unwrap();
        prop_assert_eq!(p.prefix, prefix);
        prop_assert_eq!(p.hdr.len(), prefix.hdr_len as usize);
        prop_assert_eq!(p.trans.len(), prefix.trans_len as usize);
        for cut in (0..b.len()).step_by(97) {
            let is_truncated = matches!(Packet::decode(&b[..cut]), Err(WireError::Truncated { .. }));
            prop_assert!(is_truncated, "cut at {}", cut);
        }
        let mut long = b.clone();
        long.push(0);
        let is_trailing = matches!(Packet::decode(&long), Err(WireError::Trailing { .. }));
        prop_assert!(is_trailing);
    }

    #[test]
    fn hostile_lengths_are_refused_naming_value_and_limit(
        hdr_len in any::<u32>(), trans_len in any::<u32>(), gpa in any::<u64>()
    ) {
        let mut b = [0u8; PACKET_PREFIX_LEN];
        PacketPrefix { gpa, hdr_len, trans_len }.write(&mut b);
        match PacketPrefix::decode(&b) {
            Ok(p) => {
                prop_assert!((1..=16384).contains(&p.hdr_len));
                prop_assert!((1..=4096).contains(&p.trans_len));
                prop_assert!(p.gpa % 4096 == 0 && p.gpa < 1 << 52);
            }
            Err(WireError::Length { field, value, max, .. }) => {
                let msg = WireError::Length { field, value, min: 1, max }.to_string();
                prop_assert!(msg.contains(&value.to_string()) && msg.contains(&max.to_string()));
                prop_assert!(value == 0 || value > max);
            }
            Err(WireError::Gpa { gpa: g }) => {
                prop_assert!(g % 4096 != 0 || g >= 1 << 52);
            }
            Err(e) => prop_assert!(false, "unexpected {}", e),
        }
    }
}

#[test]
fn refusal_messages() {
    let r = SessionRecord {
        policy: 1,
        hdr_len: 32,
        pdh: vec![1; 40],
        session: vec![2; 72],
    };
    let b = r.encode().unwrap();
    let mut v = b.clone();
    v[5] = 2;
    assert_eq!(
        SessionRecord::decode(&v).unwrap_err().to_string(),
        "session record version 2 is not supported; this library reads version 1"
    );
    let mut m = b.clone();
    m[0] = b'X';
    assert!(SessionRecord::decode(&m)
        .unwrap_err()
        .to_string()
        .contains("not a pagenc transport session record"));
    let mut f = b.clone();
    f[7] = 1;
    assert_eq!(
        SessionRecord::decode(&f).unwrap_err().to_string(),
        "session record flags is 0x1; it must be 0"
    );
    let mut s = b.clone();
    s[20..24].copy_from_slice(&0x0010_0000u32.to_be_bytes());
    assert_eq!(
        SessionRecord::decode(&s).unwrap_err().to_string(),
        "session record session_len is 1048576; it must be between 1 and 16384"
    );
    let mut t = b;
    t.push(0);
    assert_eq!(
        SessionRecord::decode(&t).unwrap_err().to_string(),
        "session record is 137 bytes but its fields add up to 136: 1 bytes too many"
    );
    let mut p = [0u8; PACKET_PREFIX_LEN];
    PacketPrefix {
        gpa: 0x1000,
        hdr_len: 32,
        trans_len: 4097,
    }
    .write(&mut p);
    assert_eq!(
        PacketPrefix::decode(&p).unwrap_err().to_string(),
        "page packet trans_len is 4097; it must be between 1 and 4096"
    );
    PacketPrefix {
        gpa: 0x1001,
        hdr_len: 32,
        trans_len: 4096,
    }
    .write(&mut p);
    assert!(PacketPrefix::decode(&p)
        .unwrap_err()
        .to_string()
        .contains("0x1001"));
}
