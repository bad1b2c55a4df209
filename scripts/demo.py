#!/usr/bin/env python3
"""pagenc demo: live-migrate a guest with a page-encryption list between two QEMUs.

Run by `make demo` after scripts/install-deps.sh, scripts/build-qemu.sh and
`make -C guest`. Stages:

  1. boot the payload in a source QEMU with -object pagenc (KVM where
     /dev/kvm works, TCG otherwise);
  2. the hypercalls a booting Linux SEV guest issues before READY (E820
     re-encryption, .bss..decrypted), through x-pagenc-map-gpa-range, the
     function the KVM_EXIT_HYPERCALL handler calls (guest VMMCALL never exits
     on this host); migration is refused while the guest is not READY;
  3. READY: under KVM the payload's own WRMSR 0x4b564d08 = 1 (a real MSR
     exit into QEMU's filter), under TCG x-pagenc-set-migration-control;
  4. the rest of the boot: per-CPU pages, swiotlb, DMA pools, coherent
     allocations, .bss..decrypted tail;
  5. a destination QEMU with -incoming unix:..., then live migration while a
     thread keeps converting pages (coherent alloc/free churn) and the payload
     keeps dirtying 32 MiB; progress from query-migrate and query-pagenc;
  6. comparison: the shared ranges on both sides and against a model of every
     call made, shared bytes, sha256 of all guest RAM (pmemsave on the paused
     source and the not-yet-started destination);
  7. the destination resumes and the payload carries on there;
  8-11. an encrypted-page migration through the simulated SEV firmware, a memory key
     per side: firmware calls and pages each way, every page checked by the library's
     verifier (scripts/demo_transport.py; --no-transport skips it).

Exit status 0 only if lists and memory match. QEMUs are always killed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests/e2e"))

from pagenc_vm import (  # noqa: E402
    MiB, PAGE, HarnessError, PagencApi, QmpError, Vm, QEMU_BIN, wait_until,
)
import sev_sequence as seq  # noqa: E402
import scenario  # noqa: E402

T0 = time.monotonic()


def say(msg: str = ""):
    print(f"[{time.monotonic() - T0:6.2f}s] {msg}", flush=True)


def stage(n: int, title: str):
    print(flush=True)
    say(f"=== {n}. {title}")


def fmt_bytes(n: int) -> str:
    if n >= MiB:
        return f"{n / MiB:.1f} MiB"
    return f"{n / 1024:.0f} KiB"


def fmt_ranges(ranges, limit=6) -> str:
    parts = [f"{s:#x}-{e - 1:#x}" for s, e in ranges[:limit]]
    more = f" ... (+{len(ranges) - limit})" if len(ranges) > limit else ""
    return ", ".join(parts) + more


def report_stage(key: str, cs: list):
    pages = sum(c.npages for c in cs)
    lo = min(c.gpa for c in cs)
    hi = max(c.gpa + c.npages * PAGE for c in cs)
    sizes = sorted({c.npages for c in cs})
    what = "encrypt" if cs[0].encrypted else "decrypt"
    say(f"  {key:<22} {len(cs):4d} calls {what:7s} {pages:6d} pages "
        f"[{lo:#010x}..{hi:#010x}) npages/call {sizes if len(sizes) < 4 else sizes[:3] + ['...']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mem", type=int, default=256, help="guest RAM in MiB (default 256)")
    ap.add_argument("--dirty-mb", type=int, default=32, help="MiB the payload keeps dirtying")
    ap.add_argument("--min-conversions", type=int, default=300,
                    help="conversions to see during migration before letting it converge")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--no-transport", action="store_true",
                    help="skip the encrypted-page migration (stages 8-11)")
    ap.add_argument("--channels", type=int, default=0,
                    help="multifd channels for the encrypted-page migration (0: precopy)")
    opts = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pagenc-demo-"))
    vms: list[Vm] = []
    ok = False
    try:
        ok = demo(opts, work, vms)
        if ok and not opts.no_transport:
            import demo_transport
            ok = demo_transport.run(opts, work, vms, say, stage)
    except (HarnessError, QmpError) as e:
        say(f"DEMO FAILED: {e}")
        for vm in vms:
            tail = vm.stderr_text().strip().splitlines()[-8:]
            if tail:
                say(f"  {vm.name} stderr: " + "\n    ".join(tail))
    finally:
        for vm in vms:
            vm.kill()
        say(f"QEMU processes stopped; work directory {work}"
            + (" kept" if opts.keep else " removed"))
        if not opts.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    say("RESULT: " + ("migrations succeeded, lists and memory match" if ok else "FAILED"))
    return 0 if ok else 1


def demo(opts, work: Path, vms: list) -> bool:
    mem = opts.mem * MiB
    append = f"serial mb={opts.dirty_mb}"

    stage(1, "boot the source QEMU with -object pagenc,id=pe0,x-testing=on")
    # The source logs every page the RAM loop sends and every list change (QEMU trace,
    # log backend) so stage 6 can show that pages converted mid-migration went out again.
    trace = work / "source-trace.log"
    src = Vm("source", work, pagenc=True, mem_mb=opts.mem, append=append,
             extra_args=["-D", str(trace), *scenario.TRACE_ARGS])
    vms.append(src)
    src.launch()
    kvm = src.kvm_enabled()
    v = src.cmd("query-version")["qemu"]
    say(f"QEMU      {QEMU_BIN} (version {v['major']}.{v['minor']}.{v['micro']}, pagenc series)")
    why = ("forced by PAGENC_ACCEL" if os.environ.get("PAGENC_ACCEL")
           else "/dev/kvm works" if kvm else "/dev/kvm not usable here")
    say(f"accel     {'KVM' if kvm else 'TCG'} ({why})")
    say(f"guest     guest/build/payload.elf, {opts.mem} MiB RAM, dirtying {opts.dirty_mb} MiB "
        f"from 16 MiB, -append '{append}'")
    src.wait_guest_running(passes=2)
    say(f"guest up: {src.debugcon_text().splitlines()[0]}")
    api = src.pagenc_api
    info = api.query()
    say(f"query-pagenc: ready={PagencApi.ready(info)} ranges={len(PagencApi.ranges(info))} "
        f"shared={fmt_bytes(PagencApi.shared_bytes(info))}")

    stage(2, "Linux SEV boot, before READY: E820 re-encryption and .bss..decrypted")
    before, after = seq.boot_sequence(mem)
    made: list = []
    scenario.issue(api, before, made, report_stage)
    try:
        src.cmd("migrate", uri=f"unix:{work}/nowhere.sock")
        say("migration before READY was NOT refused")
        return False
    except QmpError as e:
        say(f"migration before READY refused, as it must be: {e.desc}")

    stage(3, "READY (MSR_KVM_MIGRATION_CONTROL = 1)")
    if kvm:
        say("the guest writes it itself: payload WRMSR 0x4b564d08 <- 1 (KVM_EXIT_X86_WRMSR -> "
            "QEMU's MSR filter -> pagenc)")
    else:
        say("TCG has no MSR exits: x-pagenc-set-migration-control value=1 (the handler the "
            "KVM MSR exit calls)")
    scenario.set_ready(src, 1)
    if kvm:
        line = [ln for ln in src.debugcon_text().splitlines() if "wrmsr" in ln][-1]
        say(f"guest says: {line}")
    say(f"query-pagenc: ready={PagencApi.ready(api.query())}")

    stage(4, "Linux SEV boot, after READY: per-CPU, swiotlb, DMA pools, coherent, bss tail")
    scenario.issue(api, after, made, report_stage)
    info = api.query()
    ranges = PagencApi.ranges(info)
    say(f"{len(made)} calls; list: {len(ranges)} shared ranges, "
        f"{fmt_bytes(PagencApi.shared_bytes(info))} shared: {fmt_ranges(ranges)}")
    if ranges != seq.expected_shared(made):
        say("query-pagenc ranges differ from the model of the calls made")
        return False
    say("query-pagenc ranges == model of the calls made")
    hmp = src.hmp("info pagenc").strip().splitlines()
    say("info pagenc (first lines):")
    for ln in hmp[:8]:
        print(f"           | {ln}")

    stage(5, "destination QEMU (-incoming unix:..., -S), live migration with conversions")
    sock = work / "migrate.sock"
    dst = Vm("destination", work, pagenc=True, mem_mb=opts.mem, append=append,
             incoming=f"unix:{sock}", paused=True)
    vms.append(dst)
    dst.launch()
    say(f"destination up, status {dst.status()}")
    print(f"           {'status':<15} {'sync':>4} {'sent MiB':>9} {'remain MiB':>10} "
          f"{'dirty pg/s':>10} {'conv':>5} {'pagenc sent enc/shared':>24}", flush=True)
    last = [0.0]

    def on_poll(lm, mi, pi):
        now = time.monotonic()
        status = mi.get("status")
        if now - last[0] < 0.5 and status == "active":
            return
        last[0] = now
        ram = mi.get("ram", {})
        print(f"           {status:<15} {ram.get('dirty-sync-count', 0):>4} "
              f"{ram.get('transferred', 0) / MiB:>9.1f} {ram.get('remaining', 0) / MiB:>10.1f} "
              f"{ram.get('dirty-pages-rate', 0):>10} {len(lm.during):>5} {pagenc_sent(pi):>24}",
              flush=True)

    lm = scenario.LiveMigration(src, f"unix:{sock}", min_conversions=opts.min_conversions,
                                on_poll=on_poll, on_event=say)
    mi = lm.run()
    ram = mi["ram"]
    say(f"migration completed: total {mi.get('total-time')} ms, downtime {mi.get('downtime')} ms, "
        f"{ram['transferred'] / MiB:.1f} MiB transferred, {ram.get('dirty-sync-count')} dirty syncs, "
        f"{len(lm.during)} conversions during migration ({len(lm.made)} by the converter)")
    made += lm.made

    stage(6, "compare source and destination")
    dst.wait_status("paused", 30)
    say(f"source {src.status()}, destination {dst.status()} (started with -S, not yet resumed)")
    si, di = api.query(), dst.pagenc_api.query()
    sr, dr = PagencApi.ranges(si), PagencApi.ranges(di)
    model = seq.expected_shared(made)
    say(f"source      : ready={PagencApi.ready(si)} {len(sr)} ranges, "
        f"{PagencApi.shared_bytes(si)} bytes shared, sent {pagenc_sent(si)}")
    say(f"destination : ready={PagencApi.ready(di)} {len(dr)} ranges, "
        f"{PagencApi.shared_bytes(di)} bytes shared")
    say(f"model       : {len(model)} ranges from {len(made)} calls")
    lists_ok = sr == dr == model and PagencApi.shared_bytes(si) == PagencApi.shared_bytes(di)
    say(f"ranges: source == destination == model: {lists_ok}")
    if not lists_ok:
        only_s = sorted(set(sr) - set(dr))
        only_d = sorted(set(dr) - set(sr))
        say(f"  only on source: {fmt_ranges(only_s)}; only on destination: {fmt_ranges(only_d)}")
    sent, changed, n_sent = scenario.read_trace(trace)
    missing, wrong = scenario.resend_violations(sent, changed)
    resend_ok = not missing and not wrong and n_sent == int(si["pages-sent-encrypted"]) + int(
        si["pages-sent-shared"])
    say(f"trace: {n_sent} page sends; {len(changed)} pages flipped during the migration, "
        f"{len(changed) - len(missing)} of them sent again after their last flip, "
        f"{len(wrong)} with a stale classification: {'OK' if resend_ok else 'WRONG'}")
    hs = src.memory_sha256(work / "source.ram")
    hd = dst.memory_sha256(work / "destination.ram")
    mem_ok = hs == hd
    say(f"guest RAM 0..{opts.mem} MiB sha256: source {hs[:16]}  destination {hd[:16]}  "
        f"match: {mem_ok}")
    (work / "source.ram").unlink(missing_ok=True)
    (work / "destination.ram").unlink(missing_ok=True)

    stage(7, "resume the destination")
    p0 = dst.pass_count()
    dst.cmd("cont")
    wait_until(lambda: dst.pass_count() >= p0 + 3, 60, "the payload to run on the destination")
    say(f"destination running: payload pass {p0:#x} -> {dst.pass_count():#x}; "
        f"ready={PagencApi.ready(dst.pagenc_api.query())}")
    return lists_ok and mem_ok and resend_ok


def pagenc_sent(info: dict) -> str:
    """The 'pages sent encrypted/shared in the current migration' counters of query-pagenc."""
    mig = info.get("migration", info)
    enc = mig.get("pages-sent-encrypted", mig.get("sent-encrypted"))
    sh = mig.get("pages-sent-shared", mig.get("sent-shared"))
    if enc is None and sh is None:
        return "n/a"
    return f"{enc}/{sh}"


if __name__ == "__main__":
    sys.exit(main())
