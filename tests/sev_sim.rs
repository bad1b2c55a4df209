//! A simulated SEV live migration, end to end, through pagenc's public API only (issue 4, "the
//! proof"). See docs/migration.md for the design this checks.
//!
//! # The model
//! - **Memory.** A VM has `RAM_PAGES` pages of `WORDS` 64-bit words (a model page: big enough to
//!   tell ciphertext from plaintext, small enough to keep the test fast). What is stored is what
//!   the hypervisor sees: a shared page holds plaintext; an encrypted page holds the plaintext
//!   XORed with a keystream derived from (the VM's key, the gfn). The gfn tweak stands in for
//!   SEV's physical-address tweak, so the same plaintext at two pages differs. This is a model
//!   of *where* keys apply, not cryptography.
//! - **Firmware.** `send_update_data` decrypts an encrypted page with the source VM's key and
//!   wraps it under the transport key with a fresh IV and a MAC (SEND_UPDATE_DATA);
//!   `receive` checks the MAC and re-encrypts under the destination VM's key
//!   (RECEIVE_UPDATE_DATA). Shared pages travel as they are. Like the real firmware, it cannot
//!   tell whether the page it was handed is really encrypted: a shared page sent through it comes
//!   out as garbage, and an encrypted page copied as plaintext decrypts to garbage.
//! - **Guest.** vCPU threads own disjoint regions of RAM. They write data (partial or whole
//!   pages), convert ranges with `Tracker::map_gpa_range` (the hypercall path the VMM's exit
//!   handler calls), and toggle MSR_KVM_MIGRATION_CONTROL like a kexec. They follow the guest
//!   rule (docs/migration.md): the content of a page is lost the moment the guest converts it, so
//!   after a conversion the guest writes fresh data. Each vCPU remembers what it last wrote to
//!   every page it owns (`None` while a page is converted but not yet rewritten): that is the
//!   oracle.
//! - **Dirty log.** Every guest write sets the page's bit (KVM's dirty log); the migration loop
//!   takes-and-clears the whole log once per round (the dirty-log sync). The VMM's change
//!   callback sets bits in the same log.
//! - **Migration.** Round 0 sends every page; each later round syncs the log, classifies each
//!   dirty page with the cursor (or the run iterator) and sends it, concurrently with the vCPUs.
//!   Then the vCPUs stop (their threads are joined: a vCPU stops between two instructions, so a
//!   hypercall exit it was in is already handled), the last dirty pages go, and then the list and
//!   MSR value go through the stream codec into the destination's tracker.
//! - **Check.** The destination's map and MSR equal the source's; reading every page of the
//!   destination through the guest's view (decrypting encrypted pages with the destination key)
//!   gives what the guest last wrote. The guest then resumes on the destination (replaying a
//!   hypercall whose exit was pending when it stopped, if the VMM did not complete it) and the
//!   destination is migrated on: A -> B -> A' -> B'.
//!
//! The negative tests break one rule on purpose and assert that the corruption is seen.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use pagenc::kvm::consts::{
    KVM_MAP_GPA_RANGE_ENCRYPTED, KVM_MAP_GPA_RANGE_PAGE_SZ_4K, KVM_MIGRATION_READY,
    MSR_KVM_MIGRATION_CONTROL,
};
use pagenc::tracker::CursorState;
use pagenc::{Layout, PageRange, PageState, RamRange, Tracker};

/// Words per model page.
const WORDS: usize = 8;
type Page = [u64; WORDS];

/// Guest RAM in gfns: two ranges with a hole between them (like RAM below and above the PCI
/// hole), so that conversions crossing the hole exercise the clipping of non-RAM pages.
const RAM: [(u64, u64); 2] = [(0, 200), (256, 568)];
const RAM_PAGES: usize = 200 + 312;
const VCPUS: usize = 2;
const HOPS: usize = 3;
const SEEDS: u64 = 48;
/// Guest steps per vCPU the migration loop lets happen between two rounds (at least).
const STEPS_PER_ROUND: u64 = 40;

const ATTR_ENCRYPTED: u64 =
    KVM_MAP_GPA_RANGE_ENCRYPTED as u64 | KVM_MAP_GPA_RANGE_PAGE_SZ_4K as u64;
const ATTR_DECRYPTED: u64 = KVM_MAP_GPA_RANGE_PAGE_SZ_4K as u64;
const READY: u64 = KVM_MIGRATION_READY as u64;

// ---------------------------------------------------------------------------------------------
// Deterministic PRNG and the keyed mixing function (no crates).

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(mix(seed ^ 0x5eed))
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
    fn page(&mut self) -> Page {
        std::array::from_fn(|_| self.next())
    }
}

/// The keystream word for (key, gfn, nonce, word): the model of "encrypted under this key at
/// this address".
fn keystream(key: u64, gfn: u64, nonce: u64, word: usize) -> u64 {
    mix(mix(key ^ mix(gfn ^ (nonce << 40))) ^ word as u64)
}

fn xor_keystream(data: &Page, key: u64, gfn: u64, nonce: u64) -> Page {
    std::array::from_fn(|w| data[w] ^ keystream(key, gfn, nonce, w))
}

// ---------------------------------------------------------------------------------------------
// RAM layout helpers.

fn layout() -> Layout {
    let ranges: Vec<RamRange> = RAM
        .iter()
        .map(|&(s, e)| RamRange {
            gpa: s << 12,
            size: (e - s) << 12,
        })
        .collect();
    Layout::new(&ranges).expect("the test layout is valid")
}

fn gfn_of(slot: usize) -> u64 {
    let mut slot = slot as u64;
    for (s, e) in RAM {
        if slot < e - s {
            return s + slot;
        }
        slot -= e - s;
    }
    panic!("slot {slot} is past RAM")
}

fn slot_of(gfn: u64) -> Option<usize> {
    let mut base = 0;
    for (s, e) in RAM {
        if (s..e).contains(&gfn) {
            return Some((base + gfn - s) as usize);
        }
        base += e - s;
    }
    None
}

// ---------------------------------------------------------------------------------------------
// The dirty log.

struct DirtyLog {
    bits: Vec<AtomicU64>,
}

impl DirtyLog {
    fn new() -> DirtyLog {
        DirtyLog {
            bits: (0..RAM_PAGES.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }
    fn mark(&self, slot: usize) {
        self.bits[slot / 64].fetch_or(1 << (slot % 64), Ordering::AcqRel);
    }
    fn mark_gfns(&self, r: PageRange) {
        for gfn in r.start..r.end {
            if let Some(slot) = slot_of(gfn) {
                self.mark(slot);
            }
        }
    }
    /// The dirty-log sync: take and clear, ascending.
    fn take(&self) -> Vec<usize> {
        let mut out = Vec::new();
        for (i, word) in self.bits.iter().enumerate() {
            let mut w = word.swap(0, Ordering::AcqRel);
            while w != 0 {
                out.push(i * 64 + w.trailing_zeros() as usize);
                w &= w - 1;
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// A VM: memory as the hypervisor sees it, its dirty log and its pagenc tracker.

struct Vm {
    key: u64,
    mem: Vec<Mutex<Page>>,
    dirty: Arc<DirtyLog>,
    tracker: Tracker,
    /// What the destination's readiness callback heard: (ready, value).
    readiness: Arc<Mutex<Vec<(bool, u64)>>>,
}

impl Vm {
    fn new(key: u64) -> Vm {
        let vm = Vm {
            key,
            mem: (0..RAM_PAGES).map(|_| Mutex::new([0; WORDS])).collect(),
            dirty: Arc::new(DirtyLog::new()),
            tracker: Tracker::new(layout()),
            readiness: Arc::new(Mutex::new(Vec::new())),
        };
        let heard = Arc::clone(&vm.readiness);
        vm.tracker
            .set_readiness_callback(Some(Box::new(move |ready, value| {
                heard.lock().unwrap().push((ready, value));
            })))
            .unwrap();
        vm
    }

    /// A guest store of `words` of its plaintext `pt` into `slot`, through the guest's view of
    /// the page: ciphertext under this VM's key if the guest maps it encrypted. The dirty bit is
    /// set with the store, as KVM's write-protection fault does.
    fn guest_store(&self, slot: usize, pt: &Page, words: &[usize], encrypted: bool) {
        let gfn = gfn_of(slot);
        let mut page = self.mem[slot].lock().unwrap();
        for &w in words {
            page[w] = if encrypted {
                pt[w] ^ keystream(self.key, gfn, 0, w)
            } else {
                pt[w]
            };
        }
        self.dirty.mark(slot);
    }

    /// What the guest reads from `slot` through its view.
    fn guest_load(&self, slot: usize, encrypted: bool) -> Page {
        let page = *self.mem[slot].lock().unwrap();
        if encrypted {
            xor_keystream(&page, self.key, gfn_of(slot), 0)
        } else {
            page
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The firmware and the wire.

#[derive(Debug, Clone)]
enum Packet {
    /// A page sent as shared: the bytes as they are.
    Plain { slot: usize, data: Page },
    /// A page sent through SEND_UPDATE_DATA.
    Encrypted {
        slot: usize,
        iv: u64,
        data: Page,
        mac: u64,
    },
}

fn mac(tek: u64, gfn: u64, iv: u64, pt: &Page) -> u64 {
    pt.iter()
        .fold(mix(tek ^ gfn ^ iv.rotate_left(17)), |h, &w| mix(h ^ w))
}

/// SEND_UPDATE_DATA: the page's ciphertext under the source key, re-wrapped for transport.
fn send_update_data(src: &Vm, tek: u64, slot: usize, iv: u64) -> Packet {
    let gfn = gfn_of(slot);
    let pt = xor_keystream(&src.mem[slot].lock().unwrap(), src.key, gfn, 0);
    Packet::Encrypted {
        slot,
        iv,
        data: xor_keystream(&pt, tek, gfn, iv),
        mac: mac(tek, gfn, iv, &pt),
    }
}

/// RECEIVE_UPDATE_DATA and the plain copy on the destination.
fn receive(dst: &Vm, tek: u64, p: &Packet) {
    match *p {
        Packet::Plain { slot, data } => *dst.mem[slot].lock().unwrap() = data,
        Packet::Encrypted {
            slot,
            iv,
            data,
            mac: m,
        } => {
            let gfn = gfn_of(slot);
            let pt = xor_keystream(&data, tek, gfn, iv);
            assert_eq!(
                mac(tek, gfn, iv, &pt),
                m,
                "RECEIVE_UPDATE_DATA: MAC mismatch for gfn {gfn:#x}"
            );
            *dst.mem[slot].lock().unwrap() = xor_keystream(&pt, dst.key, gfn, 0);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The guest.

#[derive(Debug, Clone)]
struct GuestPage {
    /// The guest's own page tables: is the page mapped encrypted (C-bit set)?
    encrypted: bool,
    /// What the guest last wrote, or `None` while its content is lost (converted, not rewritten).
    last: Option<Page>,
}

/// How far a MAP_GPA_RANGE got when its vCPU stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallState {
    /// The VMM handled the exit (the list is updated) but KVM has not advanced RIP: if the vCPU
    /// is saved now, the destination re-executes the VMMCALL.
    Handled,
    /// The VMM also completed the exit (KVM_RUN with immediate_exit) before saving the vCPU.
    Completed,
}

/// A MAP_GPA_RANGE the vCPU was in when it stopped.
#[derive(Debug, Clone, Copy)]
struct Pending {
    gpa: u64,
    npages: u64,
    attrs: u64,
    state: CallState,
    /// First slot and number of slots the call covers.
    slots: (usize, usize),
}

#[derive(Debug, Clone)]
struct Vcpu {
    /// The slots this vCPU owns.
    region: (usize, usize),
    rng: Rng,
    pending: Option<Pending>,
    /// Guest steps done (a count of work, reported).
    ops: u64,
}

fn call_for(first: usize, n: usize, encrypted: bool) -> (u64, u64, u64) {
    let start = gfn_of(first);
    let end = gfn_of(first + n - 1) + 1;
    let attrs = if encrypted {
        ATTR_ENCRYPTED
    } else {
        ATTR_DECRYPTED
    };
    (start << 12, end - start, attrs)
}

/// Writes fresh whole pages `first..first + n` (after a conversion, or to a lost page).
fn fill(vm: &Vm, rng: &mut Rng, pages: &mut [GuestPage], base: usize, first: usize, n: usize) {
    for slot in first..first + n {
        let gp = &mut pages[slot - base];
        let pt = rng.page();
        vm.guest_store(slot, &pt, &[0, 1, 2, 3, 4, 5, 6, 7], gp.encrypted);
        gp.last = Some(pt);
    }
}

/// Resumes a vCPU after a migration: finishes the instruction it was stopped in.
fn resume(vm: &Vm, cpu: &mut Vcpu, pages: &mut [GuestPage]) {
    let Some(p) = cpu.pending.take() else { return };
    if p.state == CallState::Handled {
        // The VMMCALL runs again. The source already handled it: same range, same state, and
        // the destination's list already has it. Nothing may flip.
        let out = vm
            .tracker
            .map_gpa_range(p.gpa, p.npages, p.attrs)
            .expect("the guest's own MAP_GPA_RANGE is valid");
        assert_eq!(
            out.summary.flipped, 0,
            "replayed MAP_GPA_RANGE {p:?} flipped pages on the destination"
        );
    }
    // Past the hypercall, the guest writes the converted pages (the rule).
    let (first, n) = p.slots;
    fill(vm, &mut cpu.rng, pages, cpu.region.0, first, n);
}

/// One guest step. Returns after the step or when stopped in the middle of a conversion.
/// `kicked`: the stop request reached this vCPU while it was in a MAP_GPA_RANGE exit.
fn guest_step(vm: &Vm, cpu: &mut Vcpu, pages: &mut [GuestPage], stop: &AtomicBool, kicked: bool) {
    let (base, len) = cpu.region;
    let rng = &mut cpu.rng;
    cpu.ops += 1;
    let op = if kicked { 60 } else { rng.below(100) };
    match op {
        0..=59 => {
            let slot = base + rng.below(len as u64) as usize;
            match pages[slot - base].last {
                None => fill(vm, rng, pages, base, slot, 1),
                Some(mut pt) => {
                    let k = 1 + rng.below(WORDS as u64) as usize;
                    let words: Vec<usize> =
                        (0..k).map(|_| rng.below(WORDS as u64) as usize).collect();
                    for &w in &words {
                        pt[w] = rng.next();
                    }
                    let gp = &mut pages[slot - base];
                    vm.guest_store(slot, &pt, &words, gp.encrypted);
                    gp.last = Some(pt);
                }
            }
        }
        60..=97 => {
            let first = base + rng.below(len as u64) as usize;
            let n = (1 + rng.below(6) as usize).min(base + len - first);
            let to_encrypted = !pages[first - base].encrypted;
            // Page tables first (the C-bit), then the hypercall; from here the content is lost.
            for gp in &mut pages[first - base..first - base + n] {
                gp.encrypted = to_encrypted;
                gp.last = None;
            }
            let (gpa, npages, attrs) = call_for(first, n, to_encrypted);
            vm.tracker
                .map_gpa_range(gpa, npages, attrs)
                .expect("the guest's own MAP_GPA_RANGE is valid");
            if kicked || (stop.load(Ordering::Acquire) && rng.chance(1, 2)) {
                // Stopped right after the exit was handled, before KVM advanced RIP.
                cpu.pending = Some(Pending {
                    gpa,
                    npages,
                    attrs,
                    state: CallState::Handled,
                    slots: (first, n),
                });
                return;
            }
            fill(vm, rng, pages, base, first, n);
        }
        _ => {
            // kexec-like: the old kernel says "not ready", the new one "ready" again.
            vm.tracker.wrmsr(MSR_KVM_MIGRATION_CONTROL, 0).unwrap();
            if stop.load(Ordering::Acquire) && rng.chance(1, 2) {
                return;
            }
            vm.tracker.wrmsr(MSR_KVM_MIGRATION_CONTROL, READY).unwrap();
        }
    }
}

struct Guest {
    pages: Vec<GuestPage>,
    vcpus: Vec<Vcpu>,
}

impl Guest {
    /// Boots on `vm`: every page written encrypted, some ranges made shared (swiotlb, per-CPU
    /// pages), then READY.
    fn boot(vm: &Vm, seed: u64) -> Guest {
        let mut rng = Rng::new(seed);
        let mut pages = vec![
            GuestPage {
                encrypted: true,
                last: None,
            };
            RAM_PAGES
        ];
        let per = RAM_PAGES / VCPUS;
        let vcpus: Vec<Vcpu> = (0..VCPUS)
            .map(|i| Vcpu {
                region: (
                    i * per,
                    if i + 1 == VCPUS {
                        RAM_PAGES - i * per
                    } else {
                        per
                    },
                ),
                rng: Rng::new(seed.wrapping_mul(31).wrapping_add(i as u64 + 1)),
                pending: None,
                ops: 0,
            })
            .collect();
        fill(vm, &mut rng, &mut pages, 0, 0, RAM_PAGES);
        for _ in 0..8 {
            let first = rng.below(RAM_PAGES as u64) as usize;
            let n = (1 + rng.below(16) as usize).min(RAM_PAGES - first);
            for gp in &mut pages[first..first + n] {
                gp.encrypted = false;
            }
            let (gpa, npages, attrs) = call_for(first, n, false);
            vm.tracker.map_gpa_range(gpa, npages, attrs).unwrap();
            fill(vm, &mut rng, &mut pages, 0, first, n);
        }
        vm.tracker.wrmsr(MSR_KVM_MIGRATION_CONTROL, READY).unwrap();
        Guest { pages, vcpus }
    }
}

// ---------------------------------------------------------------------------------------------
// The migration (the VMM's side).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Classify {
    /// `CursorState::query` per page (the RAM loop's per-page decision), one cursor for the
    /// whole migration: it must notice that the map changed between rounds (the generation).
    Cursor,
    /// The run iterator, one run fetched after each round's sync and used for the pages in it.
    Runs,
    /// Broken on purpose: the list as it was when migration started.
    StaleSnapshot,
}

#[derive(Debug, Clone, Copy)]
struct Opts {
    classify: Classify,
    /// Install the change callback that marks flipped pages dirty (off: broken on purpose).
    change_callback: bool,
    /// Pre-copy rounds after round 0.
    rounds: usize,
    /// The VMM completes a pending hypercall exit (KVM_RUN with immediate_exit) before saving
    /// vCPU state; otherwise the destination replays the VMMCALL.
    complete_exits: bool,
    tek: u64,
}

type RoundHook<'a> = Box<dyn FnMut(usize, &Vm) + 'a>;
type ClassifyHook<'a> = Box<dyn FnMut(usize, usize, PageState, &Vm) + 'a>;
type StopHook<'a> = Box<dyn FnMut(&Vm) + 'a>;

/// Test hooks: deterministic guest actions at chosen points of the loop. Each gets the round.
#[derive(Default)]
struct Hooks<'a> {
    /// Before the dirty-log sync of a round: (round, source VM).
    before_sync: Option<RoundHook<'a>>,
    /// After a page was classified, before its bytes are read: (round, slot, state, source).
    after_classify: Option<ClassifyHook<'a>>,
    /// After the vCPUs stopped, before the final sync.
    at_stop: Option<StopHook<'a>>,
}

#[derive(Debug, Default)]
struct Report {
    pages_sent: usize,
    /// Pages whose state had changed by the time their bytes were read: sent the wrong way,
    /// to be repaired by a later round.
    raced: usize,
    guest_ops: u64,
    pending_at_stop: usize,
}

impl Report {
    fn add(&mut self, r: &Report) {
        self.pages_sent += r.pages_sent;
        self.raced += r.raced;
        self.guest_ops += r.guest_ops;
        self.pending_at_stop += r.pending_at_stop;
    }
}

/// The sending side of one migration: what persists from round to round.
struct Sender<'v> {
    src: &'v Vm,
    dst: &'v Vm,
    opts: Opts,
    /// The list when migration started (only the broken `StaleSnapshot` classifier uses it).
    snapshot: Vec<PageRange>,
    /// One cursor for the whole migration.
    cursor: CursorState,
    /// The slot the next round starts from.
    resume_at: usize,
    iv: u64,
    report: Report,
}

/// Classifies and sends `slots` (ascending).
fn send_round(tx: &mut Sender<'_>, slots: &[usize], round: usize, hooks: &mut Hooks<'_>) {
    let Sender {
        src,
        dst,
        opts,
        snapshot,
        cursor,
        resume_at,
        iv,
        report,
    } = tx;
    let (src, dst) = (*src, *dst);
    let span = PageRange {
        start: 0,
        end: RAM[RAM.len() - 1].1,
    };
    // Like QEMU's RAM loop, a round goes on from where the previous one stopped and wraps
    // around, so a long-lived cursor meets pages of its cached run again in the next round.
    let split = slots.partition_point(|&s| s < *resume_at);
    let order = slots[split..].iter().chain(&slots[..split]);
    let mut runs = src.tracker.runs(span, false);
    let mut run: Option<pagenc::Run> = None;
    for &slot in order {
        let gfn = gfn_of(slot);
        *resume_at = slot + 1;
        let state = match opts.classify {
            Classify::Cursor => cursor.query(&src.tracker, gfn).unwrap().state,
            Classify::Runs => {
                if run.is_some_and(|r| gfn < r.range.start) {
                    // Wrapped around: a new pass of the iterator.
                    runs = src.tracker.runs(span, false);
                    run = None;
                }
                while !run.is_some_and(|r| r.range.contains(gfn)) {
                    run = Some(runs.next().expect("runs cover RAM").unwrap());
                }
                run.unwrap().state
            }
            Classify::StaleSnapshot => {
                if snapshot.iter().any(|r| r.contains(gfn)) {
                    PageState::Shared
                } else {
                    PageState::Encrypted
                }
            }
        };
        if let Some(h) = hooks.after_classify.as_mut() {
            h(round, slot, state, src);
        }
        let packet = match state {
            PageState::Encrypted => {
                *iv += 1;
                send_update_data(src, opts.tek, slot, *iv)
            }
            PageState::Shared => Packet::Plain {
                slot,
                data: *src.mem[slot].lock().unwrap(),
            },
        };
        if src.tracker.state(gfn << 12).unwrap() != state {
            report.raced += 1;
        }
        receive(dst, opts.tek, &packet);
    }
    report.pages_sent += slots.len();
}

/// The list and MSR value through the stream codec. A damaged copy is offered first: it must be
/// refused and leave the destination exactly as it was (no change, no readiness callback).
fn send_list(src: &Tracker, dst: &Vm) {
    let bytes = pagenc::stream::save_to_vec(src).expect("saving the source's list");
    let before = (
        dst.tracker.shared_ranges().unwrap(),
        dst.tracker.rdmsr(MSR_KVM_MIGRATION_CONTROL).unwrap(),
        dst.readiness.lock().unwrap().len(),
    );
    let damaged = &bytes[..bytes.len() - 1];
    assert!(pagenc::stream::load(&dst.tracker, damaged).is_err());
    let after = (
        dst.tracker.shared_ranges().unwrap(),
        dst.tracker.rdmsr(MSR_KVM_MIGRATION_CONTROL).unwrap(),
        dst.readiness.lock().unwrap().len(),
    );
    assert_eq!(after, before, "a refused load changed the destination");
    pagenc::stream::load(&dst.tracker, &bytes).expect("loading the list on the destination");
}

/// Migrates the guest from `src` to `dst`, its vCPUs running on `src` during pre-copy.
fn migrate(src: &Vm, dst: &Vm, guest: &mut Guest, opts: Opts, mut hooks: Hooks<'_>) -> Report {
    if opts.change_callback {
        let log = Arc::clone(&src.dirty);
        src.tracker
            .set_change_callback(Some(Box::new(move |r, _| log.mark_gfns(r))))
            .unwrap();
    } else {
        src.tracker.set_change_callback(None).unwrap();
    }
    let mut tx = Sender {
        src,
        dst,
        opts,
        snapshot: src.tracker.shared_ranges().unwrap(),
        cursor: CursorState::new(),
        resume_at: 0,
        iv: 0,
        report: Report::default(),
    };
    // Start dirty logging: from here every write is in the log. Round 0 sends everything.
    src.dirty.take();
    let all: Vec<usize> = (0..RAM_PAGES).collect();
    let stop = AtomicBool::new(false);
    let progress = AtomicU64::new(0);
    let Guest { pages, vcpus } = guest;
    thread::scope(|s| {
        let mut handles = Vec::new();
        let mut rest: &mut [GuestPage] = pages;
        for cpu in vcpus.iter_mut() {
            let (mine, tail) = rest.split_at_mut(cpu.region.1);
            rest = tail;
            let (stop, progress) = (&stop, &progress);
            handles.push(s.spawn(move || {
                resume(src, cpu, mine);
                loop {
                    if stop.load(Ordering::Acquire) {
                        // The stop request lands at an arbitrary instruction; half the time it
                        // is a VMMCALL whose exit the VMM is handling.
                        if cpu.rng.chance(1, 2) {
                            guest_step(src, cpu, mine, stop, true);
                        }
                        break;
                    }
                    guest_step(src, cpu, mine, stop, false);
                    progress.fetch_add(1, Ordering::Release);
                    if cpu.pending.is_some() {
                        break;
                    }
                    thread::yield_now();
                }
            }));
        }
        let mut seen = 0;
        for round in 0..=opts.rounds {
            // Let the guest make progress between rounds (a count of steps, not a time), so
            // that every round races with conversions. A vCPU that died ends the wait.
            let want = seen + STEPS_PER_ROUND * handles.len() as u64;
            while progress.load(Ordering::Acquire) < want
                && !handles.iter().any(|h| h.is_finished())
            {
                thread::yield_now();
            }
            seen = progress.load(Ordering::Acquire);
            if let Some(h) = hooks.before_sync.as_mut() {
                h(round, src);
            }
            let slots = if round == 0 {
                all.clone()
            } else {
                src.dirty.take()
            };
            send_round(&mut tx, &slots, round, &mut hooks);
            thread::yield_now();
        }
        // Stop the vCPUs. A vCPU stops between instructions: an exit it was in has been handled.
        stop.store(true, Ordering::Release);
        for h in handles {
            h.join().expect("a vCPU thread panicked");
        }
    });
    tx.report.guest_ops = vcpus.iter().map(|c| c.ops).sum();
    for p in vcpus.iter_mut().filter_map(|c| c.pending.as_mut()) {
        tx.report.pending_at_stop += 1;
        if opts.complete_exits && p.state == CallState::Handled {
            p.state = CallState::Completed;
        }
    }
    if let Some(h) = hooks.at_stop.as_mut() {
        h(src);
    }
    // Stop-and-copy: the last dirty pages, then the list.
    let last = src.dirty.take();
    send_round(&mut tx, &last, opts.rounds + 1, &mut hooks);
    send_list(&src.tracker, dst);
    src.tracker.set_change_callback(None).unwrap();
    tx.report
}

/// Compares `vm` with what the guest knows. Returns the corrupted slots (content differs from
/// what the guest last wrote); a map that disagrees with the guest's page tables panics.
fn corrupted_pages(vm: &Vm, pages: &[GuestPage]) -> Vec<usize> {
    let mut bad = Vec::new();
    for (slot, gp) in pages.iter().enumerate() {
        let gfn = gfn_of(slot);
        let state = vm.tracker.state(gfn << 12).unwrap();
        assert_eq!(
            state.is_encrypted(),
            gp.encrypted,
            "gfn {gfn:#x}: the tracker says {state:?}, the guest's page tables say encrypted={}",
            gp.encrypted
        );
        if let Some(pt) = gp.last {
            if vm.guest_load(slot, gp.encrypted) != pt {
                bad.push(slot);
            }
        }
    }
    bad
}

fn assert_same_list(src: &Vm, dst: &Vm) {
    assert_eq!(
        dst.tracker.shared_ranges().unwrap(),
        src.tracker.shared_ranges().unwrap(),
        "the destination's map differs from the source's"
    );
    let msr = src.tracker.rdmsr(MSR_KVM_MIGRATION_CONTROL).unwrap();
    assert_eq!(dst.tracker.rdmsr(MSR_KVM_MIGRATION_CONTROL).unwrap(), msr);
    // The destination's readiness callback re-creates the blocker state: it has heard READY
    // iff the source was ready (a fresh tracker starts at 0, so it hears only a change to 1).
    let heard = dst.readiness.lock().unwrap().last().copied();
    let expect = (msr & READY != 0).then_some((true, READY));
    assert_eq!(heard, expect, "destination readiness callback");
}

fn key_for(seed: u64, hop: usize) -> u64 {
    mix(seed.wrapping_mul(0x1000) ^ hop as u64 ^ 0x006b_6579)
}

/// One seed: boot on A, migrate A -> B -> A' -> B', checking after every hop.
fn run_seed(seed: u64) -> Report {
    let mut rng = Rng::new(seed ^ 0xabc);
    let mut total = Report::default();
    let mut src = Vm::new(key_for(seed, 0));
    let mut guest = Guest::boot(&src, seed);
    for hop in 1..=HOPS {
        let dst = Vm::new(key_for(seed, hop));
        let opts = Opts {
            classify: if rng.chance(1, 2) {
                Classify::Cursor
            } else {
                Classify::Runs
            },
            change_callback: true,
            rounds: 2 + rng.below(4) as usize,
            complete_exits: rng.chance(1, 2),
            tek: rng.next(),
        };
        let r = migrate(&src, &dst, &mut guest, opts, Hooks::default());
        assert_same_list(&src, &dst);
        let bad = corrupted_pages(&dst, &guest.pages);
        assert!(
            bad.is_empty(),
            "seed {seed} hop {hop} ({opts:?}): {} corrupted pages, gfns {:?}",
            bad.len(),
            bad.iter().map(|&s| gfn_of(s)).collect::<Vec<_>>()
        );
        total.add(&r);
        src = dst;
    }
    // The guest resumes on the last destination: pending exits finish (replayed or not) and the
    // pages are whole again.
    let Guest { pages, vcpus } = &mut guest;
    let mut rest: &mut [GuestPage] = pages;
    for cpu in vcpus.iter_mut() {
        let (mine, tail) = rest.split_at_mut(cpu.region.1);
        rest = tail;
        resume(&src, cpu, mine);
    }
    let bad = corrupted_pages(&src, &guest.pages);
    assert!(
        bad.is_empty(),
        "seed {seed}: corrupted after the final resume: {bad:?}"
    );
    total
}

#[test]
fn sev_migration_keeps_every_page_across_hops() {
    let mut total = Report::default();
    for seed in 0..SEEDS {
        total.add(&run_seed(seed));
    }
    // The simulation must have exercised what it claims to (not timing: counts of work done).
    assert!(total.guest_ops > 0, "the guest never ran during pre-copy");
    // Every stop kicks each vCPU inside a MAP_GPA_RANGE exit with probability 1/2 (seeded).
    assert!(
        total.pending_at_stop > 0,
        "no vCPU was stopped inside an exit"
    );
    eprintln!(
        "sev_sim: {SEEDS} seeds x {HOPS} hops: {} pages sent ({} of them the wrong way because \
         the page flipped while it was sent, repaired later), {} guest steps during pre-copy, \
         {} vCPUs stopped inside a MAP_GPA_RANGE exit",
        total.pages_sent, total.raced, total.guest_ops, total.pending_at_stop
    );
}

// ---------------------------------------------------------------------------------------------
// Deterministic scenarios: no vCPU threads; the hooks play the guest at chosen points of the
// RAM loop, so each race happens every time.

const OPTS: Opts = Opts {
    classify: Classify::Cursor,
    change_callback: true,
    rounds: 3,
    complete_exits: true,
    tek: 0x7e4b,
};

/// A booted guest's pages (its vCPUs are driven by the hooks, not by threads) and an
/// encrypted page to play with.
fn quiet_guest(vm: &Vm) -> (RefCell<Vec<GuestPage>>, usize) {
    let pages = Guest::boot(vm, 1000).pages;
    let target = (RAM_PAGES / 3..RAM_PAGES)
        .find(|&s| pages[s].encrypted)
        .expect("boot leaves most pages encrypted");
    (RefCell::new(pages), target)
}

/// migrate() with no vCPU threads.
fn migrate_quiet(src: &Vm, dst: &Vm, opts: Opts, hooks: Hooks<'_>) -> Report {
    let mut nobody = Guest {
        pages: Vec::new(),
        vcpus: Vec::new(),
    };
    migrate(src, dst, &mut nobody, opts, hooks)
}

/// The guest converts `slot` by the rule: page tables, hypercall, then fresh data.
fn convert_by_the_rule(vm: &Vm, pages: &mut [GuestPage], slot: usize, rng: &mut Rng) {
    let to_encrypted = !pages[slot].encrypted;
    pages[slot].encrypted = to_encrypted;
    pages[slot].last = None;
    let (gpa, n, attrs) = call_for(slot, 1, to_encrypted);
    vm.tracker.map_gpa_range(gpa, n, attrs).unwrap();
    fill(vm, rng, pages, 0, slot, 1);
}

/// The first half of an in-place conversion (Linux's `early_set_memory_enc_dec`: the content
/// is re-encrypted or decrypted in place, then the hypercall is made): the page's plaintext is
/// rewritten under its new C-bit and the guest expects to keep it. Returns the hypercall the
/// guest has still to make.
fn convert_in_place_write(vm: &Vm, pages: &mut [GuestPage], slot: usize) -> (u64, u64, u64) {
    let pt = pages[slot].last.expect("the page holds data");
    let to_encrypted = !pages[slot].encrypted;
    vm.guest_store(slot, &pt, &[0, 1, 2, 3, 4, 5, 6, 7], to_encrypted);
    pages[slot].encrypted = to_encrypted;
    call_for(slot, 1, to_encrypted)
}

/// A guest that follows the rule and converts a page right after the RAM loop classified it
/// (hypercall, then fresh data) is migrated correctly, and it is the dirty log that re-sends
/// the page: the fresh data is written after the round's sync, so the page is dirty again,
/// and the re-send is classified after the flip. This holds with the change callback ignored
/// too; the callback is not what protects this case (see the in-place tests below).
#[test]
fn conversion_by_the_rule_after_classification_is_resent_by_the_dirty_log() {
    for change_callback in [true, false] {
        let (a, b) = (Vm::new(1), Vm::new(2));
        let (pages, target) = quiet_guest(&a);
        let mut rng = Rng::new(7);
        let hooks = Hooks {
            // Round 1 must visit the target: the guest writes it before round 1's sync.
            before_sync: Some(Box::new(|round, vm: &Vm| {
                if round == 1 {
                    let pt = pages.borrow()[target].last.unwrap();
                    vm.guest_store(target, &pt, &[0], true);
                }
            })),
            after_classify: Some(Box::new(|round, slot, state, vm: &Vm| {
                if round == 1 && slot == target {
                    assert_eq!(state, PageState::Encrypted);
                    convert_by_the_rule(vm, &mut pages.borrow_mut(), slot, &mut rng);
                }
            })),
            ..Hooks::default()
        };
        let r = migrate_quiet(
            &a,
            &b,
            Opts {
                change_callback,
                ..OPTS
            },
            hooks,
        );
        assert_eq!(r.raced, 1, "the target went out the wrong way once");
        assert_same_list(&a, &b);
        assert_eq!(corrupted_pages(&b, &pages.borrow()), Vec::<usize>::new());
    }
}

/// Runs the in-place race: the guest rewrites `target` in place before round 1's sync (the
/// sync takes that dirty bit), the RAM loop classifies the target by its old state, and only
/// then does the guest's hypercall arrive. The bytes read are the new ones, sent the old way.
/// Returns the corrupted slots on the destination.
fn in_place_race(opts: Opts) -> (Vec<usize>, usize) {
    let (a, b) = (Vm::new(11), Vm::new(12));
    let (pages, target) = quiet_guest(&a);
    let call = Cell::new(None);
    let hooks = Hooks {
        before_sync: Some(Box::new(|round, vm: &Vm| {
            if round == 1 {
                call.set(Some(convert_in_place_write(
                    vm,
                    &mut pages.borrow_mut(),
                    target,
                )));
            }
        })),
        after_classify: Some(Box::new(|round, slot, state, vm: &Vm| {
            if round == 1 && slot == target {
                assert_eq!(state, PageState::Encrypted, "classified before the flip");
                let (gpa, n, attrs) = call.take().unwrap();
                let out = vm.tracker.map_gpa_range(gpa, n, attrs).unwrap();
                assert_eq!(out.summary.flipped, 1);
            }
        })),
        ..Hooks::default()
    };
    let r = migrate_quiet(&a, &b, opts, hooks);
    assert_eq!(r.raced, 1, "the target went out the wrong way once");
    assert_same_list(&a, &b);
    let bad = corrupted_pages(&b, &pages.borrow());
    (bad, target)
}

/// The change callback repairs a page whose new content was written before its hypercall
/// reached the VMM (an in-place conversion): the flip marks the page dirty after it was sent.
#[test]
fn in_place_conversion_during_precopy_is_resent_by_the_change_callback() {
    let (bad, _) = in_place_race(OPTS);
    assert_eq!(bad, Vec::<usize>::new());
}

/// Negative (a): the same race with the change callback ignored. The page went out as
/// encrypted while it held plaintext, and nothing sends it again: it must be caught corrupted.
#[test]
fn negative_change_callback_ignored_corrupts_a_page() {
    let (bad, target) = in_place_race(Opts {
        change_callback: false,
        ..OPTS
    });
    assert_eq!(
        bad,
        vec![target],
        "with the change callback ignored the target page must arrive corrupted, and only it"
    );
}

/// Negative (b): classifying from a snapshot of the list taken when migration started. The
/// guest converts a page by the rule before round 1's sync; the sync takes its dirty bit (and
/// the callback's), round 1 sends the new plaintext classified by the stale snapshot, and
/// nothing dirties the page again. The callback cannot help a stale classifier (Sean's race #2).
#[test]
fn negative_stale_snapshot_corrupts_a_converted_page() {
    let (a, b) = (Vm::new(21), Vm::new(22));
    let (pages, target) = quiet_guest(&a);
    let mut rng = Rng::new(9);
    let hooks = Hooks {
        before_sync: Some(Box::new(|round, vm: &Vm| {
            if round == 1 {
                convert_by_the_rule(vm, &mut pages.borrow_mut(), target, &mut rng);
            }
        })),
        ..Hooks::default()
    };
    migrate_quiet(
        &a,
        &b,
        Opts {
            classify: Classify::StaleSnapshot,
            ..OPTS
        },
        hooks,
    );
    assert_same_list(&a, &b);
    assert_eq!(corrupted_pages(&b, &pages.borrow()), vec![target]);
}

/// Why the guest rule exists (Sean's race #1): an in-place conversion cut by the stop, after
/// the guest wrote the new content and before its hypercall reached the VMM. The final list
/// still has the old state, so the page goes out the old way; on the destination the guest
/// makes its hypercall and reads garbage. No host-side mechanism can fix this, the change
/// callback included: the host has not been told yet.
#[test]
fn negative_in_place_conversion_cut_by_the_stop_is_lost() {
    let (a, b) = (Vm::new(31), Vm::new(32));
    let (pages, target) = quiet_guest(&a);
    let call = Cell::new(None);
    let hooks = Hooks {
        at_stop: Some(Box::new(|vm: &Vm| {
            call.set(Some(convert_in_place_write(
                vm,
                &mut pages.borrow_mut(),
                target,
            )));
        })),
        ..Hooks::default()
    };
    migrate_quiet(&a, &b, OPTS, hooks);
    assert_same_list(&a, &b);
    assert_eq!(
        b.tracker.state(gfn_of(target) << 12).unwrap(),
        PageState::Encrypted,
        "the list was sent before the guest's hypercall"
    );
    // The vCPU resumes on the destination and makes its hypercall there.
    let (gpa, n, attrs) = call.take().unwrap();
    b.tracker.map_gpa_range(gpa, n, attrs).unwrap();
    assert_eq!(corrupted_pages(&b, &pages.borrow()), vec![target]);
}

/// A vCPU stopped inside a MAP_GPA_RANGE exit that the VMM handled: whether the VMM completes
/// the exit before saving the vCPU (no replay) or not (the destination re-executes VMMCALL),
/// the destination's list and the guest's pages come out right, and a replay flips nothing.
#[test]
fn hypercall_exit_pending_at_stop_is_harmless_with_or_without_completion() {
    for complete_exits in [true, false] {
        let (a, b) = (Vm::new(41), Vm::new(42));
        let (pages, target) = quiet_guest(&a);
        let mut cpu = Vcpu {
            region: (0, RAM_PAGES),
            rng: Rng::new(3),
            pending: None,
            ops: 0,
        };
        let hooks = Hooks {
            at_stop: Some(Box::new(|vm: &Vm| {
                // The guest changed its page tables and made the call; the VMM handled the
                // exit (the list flipped, the change callback ran); then the vCPU was stopped.
                let mut p = pages.borrow_mut();
                p[target].encrypted = false;
                p[target].last = None;
                let (gpa, npages, attrs) = call_for(target, 1, false);
                vm.tracker.map_gpa_range(gpa, npages, attrs).unwrap();
                cpu.pending = Some(Pending {
                    gpa,
                    npages,
                    attrs,
                    state: CallState::Handled,
                    slots: (target, 1),
                });
            })),
            ..Hooks::default()
        };
        let mut guest = Guest {
            pages: Vec::new(),
            vcpus: Vec::new(),
        };
        migrate(&a, &b, &mut guest, OPTS, hooks);
        // What migrate() does with the vCPUs it stops, for this one.
        let p = cpu.pending.as_mut().unwrap();
        if complete_exits {
            p.state = CallState::Completed;
        }
        assert_same_list(&a, &b);
        assert_eq!(
            b.tracker.state(gfn_of(target) << 12).unwrap(),
            PageState::Shared
        );
        let before = b.tracker.stats().unwrap();
        resume(&b, &mut cpu, &mut pages.borrow_mut());
        let after = b.tracker.stats().unwrap();
        assert_eq!(
            after.hypercalls - before.hypercalls,
            u64::from(!complete_exits),
            "a replay happens exactly when the exit was not completed"
        );
        assert_eq!(after.pages_flipped, before.pages_flipped);
        assert_eq!(corrupted_pages(&b, &pages.borrow()), Vec::<usize>::new());
    }
}
