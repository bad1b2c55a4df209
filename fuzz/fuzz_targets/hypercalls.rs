//! Hypercall and MSR sequences against a per-page model.
//!
//! The input is a sequence of operations, each an opcode byte and its arguments (big-endian):
//!
//! | op % 8 | arguments | operation |
//! |---|---|---|
//! | 0 | gfn u16, npages u16, attrs u8 | MAP_GPA_RANGE inside the model's span, attrs from a list; npages modulo 1024 unless bit 3 of the opcode is set |
//! | 1 | gpa u64, npages u64, attrs u8 | MAP_GPA_RANGE with any gpa and npages (huge, unaligned) |
//! | 2 | nr u8, gpa u64, npages u64, attrs u64 | any hypercall with raw arguments |
//! | 3 | gfn u16, step u8, count u16, attrs u8 | up to 4095 one-page calls at a stride (fragmentation) |
//! | 4 | index u8, value u8 | MSR write (MSR_KVM_MIGRATION_CONTROL or another index) |
//! | 5 | | guest reset |
//! | 6 | gfn u16, offset u8 | state and cursor queries |
//! | 7 | back u16, npages u16, attrs u8 | MAP_GPA_RANGE ending near the 52-bit limit |
//!
//! The model is a `Vec<bool>` over the first `LIMIT` gfns, which hold all of RAM; calls beyond it
//! are clipped arithmetically, so huge npages reach the tracker while the model stays small.
//! Checked after every operation: return values and rejection reasons, the change and readiness
//! callbacks, statistics, and (every few operations and at the end) the whole map, its
//! invariants, and that pagenc's heap stays within a bound derived from RAM. At the end the map
//! goes through the migration stream into a second tracker and must come out the same.

#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use pagenc::core::{Layout, PageRange, PageState, RamRange, MAX_GFN, PAGE_SHIFT};
use pagenc::kvm::consts::{KVM_HC_MAP_GPA_RANGE, MSR_KVM_MIGRATION_CONTROL};
use pagenc::tracker::{CursorState, TrackerError};
use pagenc::{RejectReason, Tracker};
use pagenc_fuzz::{measure_start, peak_since, Counting, Input};

#[global_allocator]
static ALLOC: Counting = Counting;

const CHUNK: u64 = 1 << 15;
/// The model covers gfns `[0, LIMIT)`; all RAM is below.
const LIMIT: u64 = 2 * CHUNK + 4096;
/// Guest RAM: a small range, one that crosses a chunk border, and one with a ragged end.
const RAM: [(u64, u64); 3] = [
    (16, 200),
    (512, CHUNK + 1000),
    (CHUNK + 4096, 2 * CHUNK + 100),
];
const ATTRS: [u64; 12] = [0, 0x10, 1, 2, 0x11, 0x12, 3, 0x13, 0xf, 0x20, 1 << 63, 0x1f];
const EINVAL: u64 = (-22i64) as u64;
const ENOSYS: u64 = (-1000i64) as u64;

struct Model {
    ram: Vec<bool>,
    shared: Vec<bool>,
    layout: Layout,
    msr: u64,
    accepted: u64,
    rejected: [u64; RejectReason::COUNT],
    clipped: u64,
    flipped: u64,
    msr_writes: u64,
    /// Shared pages, kept up to date (a scan per operation would dominate the run time).
    shared_count: u64,
}

/// The spec of KVM_HC_MAP_GPA_RANGE validation, written independently of pagenc's, in the
/// order the reasons are documented: hypercall number, reserved attribute bits, page-size hint,
/// alignment, length, range.
fn validate(nr: u64, gpa: u64, npages: u64, attrs: u64) -> Result<(u64, u64, bool), RejectReason> {
    if nr != KVM_HC_MAP_GPA_RANGE as u64 {
        return Err(RejectReason::UnknownHypercall);
    }
    if attrs >> 5 != 0 {
        return Err(RejectReason::ReservedAttrs);
    }
    if attrs & 0xf > 2 {
        return Err(RejectReason::BadPageSizeHint);
    }
    if gpa & 0xfff != 0 {
        return Err(RejectReason::Unaligned);
    }
    if npages == 0 {
        return Err(RejectReason::ZeroLength);
    }
    let gfn = gpa >> PAGE_SHIFT;
    match gfn.checked_add(npages) {
        Some(end) if end <= MAX_GFN => Ok((gfn, end, attrs & 0x10 == 0)),
        _ => Err(RejectReason::OutOfRange),
    }
}

impl Model {
    fn new(layout: Layout) -> Model {
        let mut ram = vec![false; LIMIT as usize];
        for r in layout.ranges() {
            ram[r.start as usize..r.end as usize].fill(true);
        }
        Model {
            ram,
            shared: vec![false; LIMIT as usize],
            layout,
            msr: 0,
            accepted: 0,
            rejected: [0; RejectReason::COUNT],
            clipped: 0,
            flipped: 0,
            msr_writes: 0,
            shared_count: 0,
        }
    }

    /// Applies `[start, end)` -> shared/encrypted; returns the flipped maximal ranges.
    fn set(&mut self, start: u64, end: u64, shared: bool) -> Vec<PageRange> {
        let in_ram: u64 = self
            .layout
            .clip(PageRange { start, end })
            .map(|r| r.len())
            .sum();
        self.clipped += (end - start) - in_ram;
        let mut flips: Vec<PageRange> = vec![];
        let hi = end.min(LIMIT);
        for g in start.min(hi)..hi {
            let i = g as usize;
            if self.ram[i] && self.shared[i] != shared {
                self.shared[i] = shared;
                self.flipped += 1;
                if shared {
                    self.shared_count += 1;
                } else {
                    self.shared_count -= 1;
                }
                match flips.last_mut() {
                    Some(r) if r.end == g => r.end += 1,
                    _ => flips.push(PageRange {
                        start: g,
                        end: g + 1,
                    }),
                }
            }
        }
        flips
    }

    fn ranges(&self) -> Vec<PageRange> {
        let mut out: Vec<PageRange> = vec![];
        for (g, &s) in self.shared.iter().enumerate() {
            if s {
                let g = g as u64;
                match out.last_mut() {
                    Some(r) if r.end == g => r.end += 1,
                    _ => out.push(PageRange {
                        start: g,
                        end: g + 1,
                    }),
                }
            }
        }
        out
    }

    /// The run from `gfn`: its state and where it ends (MAX_GFN for the encrypted tail).
    fn run(&self, gfn: u64) -> (bool, u64) {
        let at = |g: u64| g < LIMIT && self.shared[g as usize];
        let s = at(gfn);
        if gfn >= LIMIT {
            return (false, MAX_GFN);
        }
        let mut e = gfn + 1;
        while e < LIMIT && at(e) == s {
            e += 1;
        }
        if e == LIMIT && !s {
            e = MAX_GFN;
        }
        (s, e)
    }
}

type Log = Arc<Mutex<Vec<(PageRange, PageState)>>>;
type ReadyLog = Arc<Mutex<Vec<(bool, u64)>>>;

struct Harness {
    t: Tracker,
    m: Model,
    flips: Log,
    ready: ReadyLog,
    cursor: CursorState,
}

impl Harness {
    fn hypercall(&mut self, nr: u64, gpa: u64, npages: u64, attrs: u64) {
        let got = self.t.handle_hypercall(nr, [gpa, npages, attrs]);
        let flips = std::mem::take(&mut *self.flips.lock().unwrap());
        match validate(nr, gpa, npages, attrs) {
            Ok((start, end, shared)) => {
                let out = match got {
                    Ok(o) => o,
                    Err(e) => {
                        panic!("valid call ({nr}, {gpa:#x}, {npages:#x}, {attrs:#x}) refused: {e}")
                    }
                };
                self.m.accepted += 1;
                let clipped_before = self.m.clipped;
                let want = self.m.set(start, end, shared);
                let state = if shared {
                    PageState::Shared
                } else {
                    PageState::Encrypted
                };
                let want: Vec<_> = want.into_iter().map(|r| (r, state)).collect();
                assert_eq!(
                    flips, want,
                    "change callback for [{start:#x}, {end:#x}) -> {state:?}"
                );
                assert_eq!(
                    out.summary.flipped,
                    want.iter().map(|(r, _)| r.len()).sum::<u64>()
                );
                assert_eq!(out.summary.clipped, self.m.clipped - clipped_before);
            }
            Err(reason) => {
                let e = match got {
                    Err(TrackerError::Guest(e)) => e,
                    other => panic!("call ({nr}, {gpa:#x}, {npages:#x}, {attrs:#x}) should be refused for {reason:?}, got {other:?}"),
                };
                assert_eq!(e.reason, reason);
                let ret = if reason == RejectReason::UnknownHypercall {
                    ENOSYS
                } else {
                    EINVAL
                };
                assert_eq!(e.kvm_ret(), ret);
                assert!(flips.is_empty());
                self.m.rejected[reason as usize] += 1;
            }
        }
    }

    fn wrmsr(&mut self, index: u32, value: u64) {
        let got = self.t.wrmsr(index, value);
        let calls = std::mem::take(&mut *self.ready.lock().unwrap());
        if index != MSR_KVM_MIGRATION_CONTROL {
            assert!(matches!(got, Err(TrackerError::NotOurMsr { index: i }) if i == index));
            assert!(calls.is_empty());
        } else if value & !1 != 0 {
            assert!(
                matches!(got, Err(TrackerError::Guest(ref e)) if e.reason == RejectReason::ReservedMsrBits),
                "{got:?}"
            );
            self.m.rejected[RejectReason::ReservedMsrBits as usize] += 1;
            assert!(calls.is_empty());
        } else {
            got.unwrap();
            self.m.msr_writes += 1;
            let want = if value != self.m.msr {
                vec![(value == 1, value)]
            } else {
                vec![]
            };
            assert_eq!(calls, want);
            self.m.msr = value;
        }
        assert_eq!(self.t.rdmsr(MSR_KVM_MIGRATION_CONTROL).unwrap(), self.m.msr);
        assert_eq!(self.t.is_ready(), self.m.msr == 1);
    }

    fn reset(&mut self) {
        let want: Vec<_> = self
            .m
            .ranges()
            .into_iter()
            .map(|r| (r, PageState::Encrypted))
            .collect();
        self.t.reset().unwrap();
        let flips = std::mem::take(&mut *self.flips.lock().unwrap());
        let calls = std::mem::take(&mut *self.ready.lock().unwrap());
        assert_eq!(flips, want);
        assert_eq!(
            calls,
            if self.m.msr != 0 {
                vec![(false, 0)]
            } else {
                vec![]
            }
        );
        self.m.shared.fill(false);
        self.m.shared_count = 0;
        self.m.msr = 0;
    }

    fn query(&mut self, gfn: u64, offset: u64) {
        let (s, end) = self.m.run(gfn);
        let want = if s {
            PageState::Shared
        } else {
            PageState::Encrypted
        };
        assert_eq!(
            self.t.state((gfn << PAGE_SHIFT) | offset).unwrap(),
            want,
            "gfn {gfn:#x}"
        );
        let run = self.cursor.query(&self.t, gfn).unwrap();
        assert_eq!(
            (run.range.start, run.range.end, run.state),
            (gfn, end, want),
            "cursor at {gfn:#x}"
        );
    }

    fn check_stats(&self) {
        let s = self.t.stats().unwrap();
        let m = &self.m;
        let rejected_calls: u64 = m.rejected[..RejectReason::ReservedMsrBits as usize]
            .iter()
            .sum();
        assert_eq!(s.hypercalls, m.accepted + rejected_calls);
        assert_eq!(s.rejected, m.rejected);
        assert_eq!(s.clipped_pages, m.clipped);
        assert_eq!(s.pages_flipped, m.flipped);
        assert_eq!(s.shared_pages, m.shared_count);
        assert_eq!(s.msr_value, m.msr);
        assert_eq!(s.msr_writes, m.msr_writes);
        assert_eq!(s.ram_pages, m.layout.pages());
        // The map never needs more than about a bitmap per chunk of RAM.
        let chunks = LIMIT.div_ceil(CHUNK) as usize;
        assert!(
            s.heap_bytes as usize <= chunks * 8192 + 65536,
            "map uses {} heap bytes for {chunks} chunks of RAM",
            s.heap_bytes
        );
    }

    fn check_map(&self) {
        let want = self.m.ranges();
        assert_eq!(self.t.shared_ranges().unwrap(), want);
        assert_eq!(
            self.m.shared_count,
            self.m.shared.iter().filter(|&&s| s).count() as u64
        );
        assert_eq!(self.t.stats().unwrap().shared_ranges, want.len() as u64);
        self.t
            .with_map(|map, _| map.check_invariants())
            .unwrap()
            .unwrap();
        self.check_stats();
    }
}

fuzz_target!(|data: &[u8]| {
    let ram: Vec<RamRange> = RAM
        .iter()
        .map(|&(s, e)| RamRange {
            gpa: s << PAGE_SHIFT,
            size: (e - s) << PAGE_SHIFT,
        })
        .collect();
    let layout = Layout::new(&ram).unwrap();
    let base = measure_start();
    let t = Tracker::new(layout.clone());
    let flips: Log = Default::default();
    let ready: ReadyLog = Default::default();
    let f = flips.clone();
    t.set_change_callback(Some(Box::new(move |r, s| f.lock().unwrap().push((r, s)))))
        .unwrap();
    let rd = ready.clone();
    t.set_readiness_callback(Some(Box::new(move |r, v| rd.lock().unwrap().push((r, v)))))
        .unwrap();
    let mut h = Harness {
        t,
        m: Model::new(layout),
        flips,
        ready,
        cursor: CursorState::new(),
    };

    let mut input = Input::new(data);
    let mut ops = 0u32;
    while !input.done() {
        let op = input.u8();
        match op % 8 {
            0 => {
                let gfn = input.u16() as u64 % LIMIT;
                // Mostly short calls, as guests make them; bit 3 of the opcode for long ones.
                let n = input.u16() as u64;
                let n = if op & 8 != 0 { n + 1 } else { n % 1024 + 1 };
                let a = ATTRS[input.u8() as usize % ATTRS.len()];
                h.hypercall(KVM_HC_MAP_GPA_RANGE as u64, gfn << PAGE_SHIFT, n, a);
            }
            1 => {
                let (gpa, n) = (input.u64(), input.u64());
                let a = ATTRS[input.u8() as usize % ATTRS.len()];
                h.hypercall(KVM_HC_MAP_GPA_RANGE as u64, gpa, n, a);
            }
            2 => {
                let b = input.u8();
                let nr = if b & 1 == 0 {
                    KVM_HC_MAP_GPA_RANGE as u64
                } else {
                    (b >> 1) as u64
                };
                let (gpa, n, a) = (input.u64(), input.u64(), input.u64());
                h.hypercall(nr, gpa, n, a);
            }
            3 => {
                let gfn = input.u16() as u64 % LIMIT;
                let step = 1 + input.u8() as u64 % 8;
                let count = input.u16() as u64 % 4096;
                let a = if input.u8() & 1 == 0 { 0 } else { 0x10 };
                for k in 0..count {
                    h.hypercall(
                        KVM_HC_MAP_GPA_RANGE as u64,
                        (gfn + k * step) << PAGE_SHIFT,
                        1,
                        a,
                    );
                }
            }
            4 => {
                let idx = input.u8();
                let v = input.u8();
                let index = if idx & 1 == 0 {
                    MSR_KVM_MIGRATION_CONTROL
                } else {
                    MSR_KVM_MIGRATION_CONTROL ^ idx as u32
                };
                let value = match v % 5 {
                    0 => 0,
                    1 => 1,
                    2 => 2,
                    3 => 1 << 63 | 1,
                    _ => v as u64,
                };
                h.wrmsr(index, value);
            }
            5 => h.reset(),
            6 => {
                let gfn = input.u16() as u64 % (LIMIT + 64);
                let off = input.u8() as u64 * 16;
                h.query(gfn, off);
            }
            _ => {
                let back = input.u16() as u64;
                let n = input.u16() as u64;
                let a = ATTRS[input.u8() as usize % ATTRS.len()];
                let gfn = MAX_GFN.saturating_sub(back);
                h.hypercall(KVM_HC_MAP_GPA_RANGE as u64, gfn << PAGE_SHIFT, n, a);
            }
        }
        h.check_stats();
        ops += 1;
        if ops.is_multiple_of(64) {
            h.check_map();
        }
    }
    h.check_map();
    // Whatever the guest did, the map survives a migration stream exactly.
    let bytes = pagenc::stream::save_to_vec(&h.t).unwrap();
    let dst = Tracker::new(h.m.layout.clone());
    pagenc::stream::load(&dst, &bytes).unwrap();
    assert_eq!(dst.shared_ranges().unwrap(), h.m.ranges());
    assert_eq!(dst.rdmsr(MSR_KVM_MIGRATION_CONTROL).unwrap(), h.m.msr);
    drop(dst);
    // Model (2 x LIMIT bytes) + map (about a bitmap of RAM, x2 for a transient copy) + slack.
    let bound = 2 * LIMIT as usize + 2 * (LIMIT / 8) as usize + (1 << 20);
    let peak = peak_since(base);
    assert!(peak <= bound, "peak heap {peak} bytes > bound {bound}");
});
