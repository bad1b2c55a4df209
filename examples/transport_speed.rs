//! The encrypted-page transport's throughput against the simulated firmware's own (run with
//! `--release`): `cargo run --release --example transport_speed`. Best of 5 runs each, same
//! process, keyed mode (a different memory key per side), 16 MiB of pages:
//!
//! - **firmware alone**: raw `SEND_UPDATE_DATA` then `RECEIVE_UPDATE_DATA` per page through the
//!   `MemoryEncryptOp` entry point, argument structures prepared once (no marshalling);
//! - **transport, 1 thread**: `SevTransport::send_page` + `receive_page` per page (argument
//!   structures, packet prefix, checks), the ratio to the firmware alone is its overhead;
//! - **transport, 4 threads**: the same pages split over four threads, as multifd channels call
//!   it. The firmware is one queue (one lock, as the PSP's one command mutex), so this shows what
//!   parallel callers can and cannot gain.
//!
//! Asserts nothing about time (machines differ), only that every page arrived re-keyed.

use std::sync::Arc;
use std::thread;
use std::time::Instant;

use pagenc::transport::sev_abi::{
    cmd, kvm_sev_cmd, kvm_sev_receive_update_data, kvm_sev_send_update_data, policy,
};
use pagenc::transport::simfw::SIM_HDR_LEN;
use pagenc::transport::{
    rekey_page, sim_amd_certs, MemoryEncryptOp, Memslot, SendParams, SevMode, SevTransport,
    SimConfig, SimFirmware, SimRole, SIM_OPT_IN,
};

const PAGE: usize = 4096;
const PAGES: usize = 4096;
const GPA: u64 = 0x10_0000;
const K_SRC: [u8; 32] = [0x5a; 32];
const K_DST: [u8; 32] = [0xc3; 32];

#[repr(C, align(4096))]
#[derive(Clone)]
struct Page([u8; PAGE]);

struct Side {
    ram: Vec<Page>,
    fw: Arc<SimFirmware>,
    tx: Arc<SevTransport>,
}

fn side(role: SimRole, key: [u8; 32], id: u8) -> Side {
    let mut ram = vec![Page([0; PAGE]); PAGES];
    for (i, p) in ram.iter_mut().enumerate() {
        p.0.fill(i as u8);
    }
    let slot = Memslot {
        gpa: GPA,
        size: (PAGES * PAGE) as u64,
        host: ram.as_ptr() as u64,
    };
    let cfg = SimConfig {
        role,
        policy: policy::NODBG,
        memory_key: key,
        platform_id: [id; 32],
    };
    // SAFETY: `ram` is moved into the Side with the firmware and never reallocated.
    let fw = Arc::new(unsafe { SimFirmware::new(SIM_OPT_IN, cfg, &[slot]) }.expect("simfw"));
    let tx = Arc::new(SevTransport::new(fw.clone()));
    Side { ram, fw, tx }
}

fn host(s: &Side, i: usize) -> u64 {
    s.ram[i].0.as_ptr() as u64
}

/// A fresh source and destination with a session between them.
fn pair() -> (Side, Side) {
    let (src, dst) = (
        side(SimRole::Source, K_SRC, 1),
        side(SimRole::Destination, K_DST, 2),
    );
    let record = src
        .tx
        .send_start(&SendParams {
            policy: policy::NODBG,
            mode: SevMode::Sev,
            src_pdh: &src.fw.pdh_cert(),
            dst_pdh: &dst.fw.pdh_cert(),
            dst_plat_certs: &dst.fw.platform_certs(),
            amd_certs: &sim_amd_certs(),
        })
        .expect("send_start")
        .encode()
        .expect("encode");
    dst.tx
        .receive_start(&record, SevMode::Sev, policy::NODBG)
        .expect("receive_start");
    (src, dst)
}

fn check(src: &Side, dst: &Side) {
    for i in 0..PAGES {
        let mut want = src.ram[i].0;
        rekey_page(&K_SRC, &K_DST, GPA + (i * PAGE) as u64, &mut want);
        assert!(dst.ram[i].0 == want, "page {i} did not arrive re-keyed");
    }
}

fn issue<T>(fw: &dyn MemoryEncryptOp, id: u32, arg: &mut T) {
    let mut c = kvm_sev_cmd {
        id,
        data: arg as *mut T as u64,
        ..Default::default()
    };
    // SAFETY: `arg` is the structure of `id`, its addresses name live buffers of their lengths
    // and guest pages inside the firmware's memslot.
    unsafe { fw.memory_encrypt_op(&mut c) }.expect("firmware command");
}

fn firmware_alone(src: &Side, dst: &Side) -> f64 {
    let mut hdr = vec![0u8; SIM_HDR_LEN as usize];
    let mut trans = vec![0u8; PAGE];
    let t0 = Instant::now();
    for i in 0..PAGES {
        let mut s = kvm_sev_send_update_data {
            hdr_uaddr: hdr.as_mut_ptr() as u64,
            hdr_len: SIM_HDR_LEN,
            guest_uaddr: host(src, i),
            guest_len: PAGE as u32,
            trans_uaddr: trans.as_mut_ptr() as u64,
            trans_len: PAGE as u32,
            ..Default::default()
        };
        issue(&*src.fw, cmd::SEND_UPDATE_DATA, &mut s);
        let mut r = kvm_sev_receive_update_data {
            hdr_uaddr: hdr.as_mut_ptr() as u64,
            hdr_len: SIM_HDR_LEN,
            guest_uaddr: host(dst, i),
            guest_len: PAGE as u32,
            trans_uaddr: trans.as_mut_ptr() as u64,
            trans_len: PAGE as u32,
            ..Default::default()
        };
        issue(&*dst.fw, cmd::RECEIVE_UPDATE_DATA, &mut r);
    }
    t0.elapsed().as_secs_f64()
}

fn transport(src: &Side, dst: &Side, threads: usize) -> f64 {
    let t0 = Instant::now();
    thread::scope(|sc| {
        for t in 0..threads {
            sc.spawn(move || {
                let mut pk = vec![0u8; src.tx.packet_len()];
                for i in (t..PAGES).step_by(threads) {
                    let gpa = GPA + (i * PAGE) as u64;
                    // SAFETY: the page is inside the source's memslot, alive for the run.
                    let n = unsafe { src.tx.send_page(gpa, host(src, i), &mut pk) }.expect("send");
                    // SAFETY: as above, destination.
                    unsafe { dst.tx.receive_page(gpa, host(dst, i), &pk[..n]) }.expect("recv");
                }
            });
        }
    });
    t0.elapsed().as_secs_f64()
}

fn best(f: impl Fn() -> f64) -> f64 {
    (0..5).map(|_| f()).fold(f64::MAX, f64::min)
}

fn main() {
    let mib = (PAGES * PAGE) as f64 / (1 << 20) as f64;
    let (src, dst) = pair();
    let base = best(|| firmware_alone(&src, &dst));
    check(&src, &dst);
    println!(
        "simulated firmware alone (SEND+RECEIVE_UPDATE_DATA): {:.0} MiB/s ({:.2} us/page)",
        mib / base,
        base * 1e6 / PAGES as f64
    );
    for threads in [1, 4] {
        let (src, dst) = pair();
        let t = best(|| transport(&src, &dst, threads));
        check(&src, &dst);
        println!(
            "transport, {threads} thread(s): {:.0} MiB/s ({:.2} us/page), {:.2}x the firmware \
             alone's time",
            mib / t,
            t * 1e6 / PAGES as f64,
            t / base
        );
    }
}
