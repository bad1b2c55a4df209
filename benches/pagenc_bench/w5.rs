//! W5: concurrency, updater threads plus one scanning reader.

#![allow(unused_imports)]
use crate::prelude::*;

/// A structure shared by updater threads and one reader.
pub(crate) trait Conc: Sync {
    const NAME: &'static str;
    fn update(&self, gfn: u64, n: u64, shared: bool);
    /// Reader: the state of `gfn` and the end of the run the answer covers (gfn + 1 if the
    /// structure does not say).
    fn reader(&self) -> Box<dyn FnMut(u64) -> (bool, u64) + '_>;
}

impl Conc for Pagenc {
    const NAME: &'static str = "pagenc";
    fn update(&self, gfn: u64, n: u64, shared: bool) {
        self.call(gfn, n, shared);
    }
    fn reader(&self) -> Box<dyn FnMut(u64) -> (bool, u64) + '_> {
        let mut c = CursorState::new();
        Box::new(move |g| {
            let r = c.query(&self.t, g).expect("tracker usable");
            (r.state == PageState::Shared, r.range.end)
        })
    }
}

/// A baseline behind a mutex; the reader locks once per page.
pub(crate) struct Locked<S>(Mutex<S>);

impl<S: Store + Send> Conc for Locked<S> {
    const NAME: &'static str = S::NAME;
    fn update(&self, gfn: u64, n: u64, shared: bool) {
        self.0.lock().expect("no panics").set(gfn, gfn + n, shared);
    }
    fn reader(&self) -> Box<dyn FnMut(u64) -> (bool, u64) + '_> {
        Box::new(move |g| (self.0.lock().expect("no panics").get(g), g + 1))
    }
}

/// The outcome of one W5 run.
pub(crate) struct ConcResult {
    pub(crate) ops_per_s: f64,
    /// Updates per second of the updaters' own CPU time (what contention costs, whatever else
    /// the shared machine runs).
    pub(crate) ops_per_cpu_s: f64,
    pub(crate) reader_pages_per_s: f64,
    pub(crate) reader_cpu_ns_per_page: f64,
    pub(crate) stale: u64,
    pub(crate) torn: u64,
    pub(crate) checked: u64,
}

pub(crate) const BLK: u64 = 16;
pub(crate) const PENDING: u64 = 2;

/// `k` updaters toggling whole 16-page blocks for `dur`, plus one reader scanning all RAM
/// page by page. With `disjoint`, updater i owns RAM slot i of 64 and publishes every block's
/// state in `seq` (seq << 2 | pending << 1 | state) around each update, so the reader can tell
/// a stale answer (the block was stable across the query and the answer differs) from a
/// legitimate old-or-new one. Each slot's first block is shared and never touched (a sentinel).
/// For pagenc, a run end the reader gets that is not on a block boundary is a torn view.
pub(crate) fn conc_run<C: Conc>(
    c: &C,
    layout: &Layout,
    k: usize,
    disjoint: bool,
    dur: Duration,
    with_reader: bool,
) -> ConcResult {
    let pages = layout.pages();
    let slot = pages / 64 / BLK * BLK;
    let top = layout.ranges().last().expect("RAM").end;
    let seq: Vec<AtomicU64> = (0..top / BLK).map(|_| AtomicU64::new(0)).collect();
    for i in 0..64 {
        // Start from a known state: the slot encrypted but for its sentinel block.
        let g = ram_gfn(layout, i * slot);
        let slot_range = PageRange {
            start: g,
            end: ram_gfn(layout, (i + 1) * slot - 1) + 1,
        };
        for piece in layout.clip(slot_range) {
            c.update(piece.start, piece.len(), false);
        }
        c.update(g, BLK, true);
        seq[(g / BLK) as usize].store(1, Ordering::SeqCst);
    }
    let stop = AtomicBool::new(false);
    let total_ops = AtomicU64::new(0);
    let total_cpu_ns = AtomicU64::new(0);
    let (mut rp, mut rcpu, mut stale, mut torn, mut checked) = (0.0, 0.0, 0, 0, 0);
    std::thread::scope(|s| {
        for i in 0..k {
            let (stop, total_ops, total_cpu_ns, seq) = (&stop, &total_ops, &total_cpu_ns, &seq);
            s.spawn(move || {
                let cpu0 = (cpu_time() * 1e9) as u64;
                let mut rng = Rng(1000 + i as u64);
                let mut n = 0u64;
                let blocks = slot / BLK - 1;
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..64 {
                        let sl = if disjoint { i as u64 } else { rng.below(64) };
                        let g = ram_gfn(layout, sl * slot + (1 + rng.below(blocks)) * BLK);
                        let shared = rng.next() & 1 == 0;
                        if disjoint {
                            let cell = &seq[(g / BLK) as usize];
                            let v = cell.load(Ordering::Relaxed);
                            let next = ((v >> 2) + 1) << 2;
                            cell.store(next | PENDING | shared as u64, Ordering::SeqCst);
                            c.update(g, BLK, shared);
                            cell.store((next + 4) | shared as u64, Ordering::SeqCst);
                        } else {
                            c.update(g, BLK, shared);
                        }
                    }
                    n += 64;
                }
                total_ops.fetch_add(n, Ordering::Relaxed);
                total_cpu_ns.fetch_add((cpu_time() * 1e9) as u64 - cpu0, Ordering::Relaxed);
            });
        }
        if with_reader {
            let t0 = Instant::now();
            let c0 = cpu_time();
            let mut q = c.reader();
            let mut n = 0u64;
            'outer: loop {
                for r in layout.ranges() {
                    let mut g = r.start;
                    while g < r.end {
                        let check = disjoint && g % BLK == 0;
                        let a = if check {
                            seq[(g / BLK) as usize].load(Ordering::SeqCst)
                        } else {
                            0
                        };
                        let (shared, end) = q(g);
                        if g % BLK == 0 {
                            checked += 1;
                            if end != g + 1 && end % BLK != 0 {
                                torn += 1;
                            }
                        }
                        if check {
                            let b = seq[(g / BLK) as usize].load(Ordering::SeqCst);
                            if a == b && a & PENDING == 0 && (a & 1 == 1) != shared {
                                stale += 1;
                            }
                        }
                        g += 1;
                        n += 1;
                        if n % 65536 == 0 && t0.elapsed() >= dur {
                            break 'outer;
                        }
                    }
                }
            }
            let secs = t0.elapsed().as_secs_f64();
            rp = n as f64 / secs;
            rcpu = (cpu_time() - c0) * 1e9 / n as f64;
        } else {
            std::thread::sleep(dur);
        }
        stop.store(true, Ordering::Relaxed);
    });
    ConcResult {
        ops_per_s: total_ops.load(Ordering::Relaxed) as f64 / dur.as_secs_f64(),
        ops_per_cpu_s: total_ops.load(Ordering::Relaxed) as f64
            / (total_cpu_ns.load(Ordering::Relaxed).max(1) as f64 * 1e-9),
        reader_pages_per_s: rp,
        reader_cpu_ns_per_page: rcpu,
        stale,
        torn,
        checked,
    }
}

/// One structure's W5 curves: name, (updaters, M updates/s), (updaters, reader slowdown).
pub(crate) type W5Series = (String, Vec<(f64, f64)>, Vec<(f64, f64)>);

/// Updaters 1..64 for pagenc, Mutex<B0> and Mutex<B1>. Returns the scaling series
/// (structure, [(k, Mops/s)]) for the plot.
pub(crate) fn w5(rep: &mut Report) -> Vec<W5Series> {
    let pages = if rep.quick { GIB } else { 16 * GIB };
    let layout = layout_for(pages);
    let dur = Duration::from_millis(if rep.quick { 100 } else { 500 });
    let ks: &[usize] = if rep.quick {
        &[1, 4]
    } else {
        &[1, 2, 4, 8, 16, 32, 64]
    };
    let mut rows = Vec::new();
    let mut series = Vec::new();
    fn one<C: Conc>(
        rep: &mut Report,
        rows: &mut Vec<Vec<String>>,
        c: &C,
        layout: &Layout,
        ks: &[usize],
        dur: Duration,
    ) -> W5Series {
        let mut tput = Vec::new();
        let mut slow = Vec::new();
        for &k in ks {
            for disjoint in [true, false] {
                // The machine is shared and its load drifts, so each point gets its own
                // baselines measured right before it: the reader alone and one updater.
                let alone = conc_run(c, layout, 0, true, dur, true);
                let one = conc_run(c, layout, 1, disjoint, dur, false);
                // Throughput without the reader (the updaters' own scaling), then with it.
                let u = conc_run(c, layout, k, disjoint, dur, false);
                let r = conc_run(c, layout, k, disjoint, dur, true);
                let base = one.ops_per_s;
                let cpu_ratio = u.ops_per_cpu_s / one.ops_per_cpu_s;
                let slowdown = alone.reader_pages_per_s / r.reader_pages_per_s;
                let cpu_slowdown = r.reader_cpu_ns_per_page / alone.reader_cpu_ns_per_page;
                if disjoint {
                    tput.push((k as f64, u.ops_per_s / 1e6));
                    slow.push((k as f64, slowdown));
                }
                rep.check(r.stale == 0 && r.torn == 0, || {
                    format!(
                        "W5 {} k={k} disjoint={disjoint}: {} stale and {} torn answers out of {} checked",
                        C::NAME,
                        r.stale,
                        r.torn,
                        r.checked
                    )
                });
                rows.push(vec![
                    C::NAME.to_string(),
                    k.to_string(),
                    if disjoint { "disjoint" } else { "overlap" }.to_string(),
                    f(u.ops_per_s / 1e6),
                    f(u.ops_per_s / base),
                    f(cpu_ratio),
                    f(r.ops_per_s / 1e6),
                    f(1e9 / alone.reader_pages_per_s),
                    f(1e9 / r.reader_pages_per_s),
                    f(slowdown),
                    f(cpu_slowdown),
                    r.checked.to_string(),
                    (r.stale + r.torn).to_string(),
                ]);
                if C::NAME == "pagenc" && k == *ks.last().expect("non-empty") {
                    let windows = if disjoint { "disjoint" } else { "overlapping" };
                    rep.goal(
                        "W5",
                        &format!("throughput at {k} updaters / 1 updater, {windows} windows"),
                        u.ops_per_s / base,
                        0.5,
                        true,
                    );
                    rep.goal(
                        "W5",
                        &format!(
                            "updates per CPU-second at {k} updaters / 1 updater, {windows} windows"
                        ),
                        cpu_ratio,
                        0.5,
                        true,
                    );
                    rep.goal(
                        "W5",
                        &format!("reader slowdown with {k} updaters, {windows} (wall, 2 cores)"),
                        slowdown,
                        2.0,
                        false,
                    );
                    rep.goal(
                        "W5",
                        &format!("reader slowdown with {k} updaters, {windows} (reader CPU time)"),
                        cpu_slowdown,
                        2.0,
                        false,
                    );
                }
            }
        }
        (C::NAME.to_string(), tput, slow)
    }
    series.push(one(
        rep,
        &mut rows,
        &Pagenc::new(layout.clone()),
        &layout,
        ks,
        dur,
    ));
    series.push(one(
        rep,
        &mut rows,
        &Locked(Mutex::new(B0::new(&layout))),
        &layout,
        ks,
        dur,
    ));
    series.push(one(
        rep,
        &mut rows,
        &Locked(Mutex::new(B1::default())),
        &layout,
        ks,
        dur,
    ));
    rep.table(
        "w5",
        &format!(
            "W5 concurrency on a {} guest, {} cores: updaters toggle 16-page blocks; one reader scans all RAM page by page (ns/page)",
            fmt_gib(pages),
            std::thread::available_parallelism().map_or(0, |n| n.get())
        ),
        &[
            "structure", "updaters", "windows", "Mops/s", "vs_1", "vs_1_cpu", "Mops/s+reader", "reader_alone",
            "reader", "slowdown", "cpu_slowdown", "checked", "stale+torn",
        ],
        &rows,
    );
    let torn: u64 = rows
        .iter()
        .filter(|r| r[0] == "pagenc")
        .map(|r| r[12].parse::<u64>().unwrap_or(1))
        .sum();
    rep.goal(
        "W5",
        "torn or stale reader answers (pagenc)",
        torn as f64,
        0.0,
        false,
    );
    series
}
