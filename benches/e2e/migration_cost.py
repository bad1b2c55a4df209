#!/usr/bin/env python3
"""What a live migration costs the user, end to end, with the patched QEMU (issue 12).

The same guest (guest/build/payload.elf dirtying memory, as in `make demo`) is
migrated between two QEMUs over a unix socket, several times per configuration,
the configurations interleaved (a, b, c, d, a, b, ...) so that the shared
machine's load drifts over all of them alike. Per run it records what
query-migrate reports on the source: total time, downtime, transferred bytes.
Printed: best and median per configuration, and each one's ratio to row (a),
the same guest without -object pagenc.

Rows (ROWS below):
  (a) no pagenc           QEMU without -object pagenc
  (b) pagenc, boot list   -object pagenc, the Linux SEV boot list of the demo
                          (tests/e2e/sev_sequence.py), READY
  (c) pagenc, hostile     -object pagenc, every other guest page shared, READY
  (d) transport, keyed    the encrypted-page transport (issue 12 item 3): -object
                          pagenc with the simulated SEV firmware and a different
                          memory key per side (tests/e2e/keyed.py), the boot list of
                          (b), capabilities x-encrypted-pages and return-path on both
                          sides, precopy; the pages the list calls encrypted go
                          through SEND/RECEIVE_UPDATE_DATA. The destination stays
                          paused (keyed RAM cannot run); checked: equal lists, and
                          the firmware's page counts > 0 and equal on both sides.
                          (The page-by-page keyed proof, tests/e2e/
                          test_transport_proof.py, is not repeated here: it needs the
                          verifier's build and two RAM dumps per run.)

Adding a row is a Row(...) appended to ROWS: a key, a title, whether the row has
pagenc (its destination's list is then compared with its source's), a setup
function that runs on the booted source before the migration (it returns a
short description of what it did), and optionally: extra QEMU arguments for
both sides; side_args, each side's own arguments (its own -object pagenc, in
place of the harness's plain one); set_caps, run on each side before the
migration (on the destination before migrate-incoming: it then starts with
-incoming defer); check, run after the migration (returns a description, raises
HarnessError on failure). Every row is migrated with the same guest, memory
size and migration parameters; rows are compared with (a).

Usage: python3 benches/e2e/migration_cost.py [--runs 5] [--mem 256] [--dirty-mb 32]
                                             [--rows a,b,c,d]
       (make bench-e2e; needs scripts/build-qemu.sh and make -C guest)
Writes target/bench/e2e.json and prints a markdown table. Exit status 1 if a
migration fails, a destination's list differs from its source's or a row's
check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests/e2e"))

from pagenc_vm import (  # noqa: E402
    MiB, PAGE, ATTR_DECRYPTED, HarnessError, PagencApi, Vm, migrate,
)
import keyed  # noqa: E402
import scenario  # noqa: E402

T0 = time.monotonic()


def say(msg: str):
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", flush=True)


def pipelined_map(vm: Vm, calls: list[tuple[int, int, int]], batch: int = 512) -> None:
    """x-pagenc-map-gpa-range for many calls, pipelined on the VM's second QMP socket.

    One call per QMP round trip takes minutes for 32,768 calls on a loaded machine; the
    monitor answers commands in order, so a batch is sent and then its answers are read.
    Every answer must be a success with ret 0.
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(120)
    s.connect(str(vm.qmp_extra_paths[0]))
    f = s.makefile("rwb")

    def answer() -> dict:
        while True:
            line = f.readline()
            if not line:
                raise HarnessError(f"{vm.name}: QMP closed during the list")
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    answer()  # greeting
    f.write(b'{"execute": "qmp_capabilities"}\n')
    f.flush()
    answer()
    for i in range(0, len(calls), batch):
        chunk = calls[i:i + batch]
        for gpa, npages, attrs in chunk:
            f.write(json.dumps({"execute": PagencApi.MAP, "arguments":
                                {"gpa": gpa, "npages": npages, "attrs": attrs}}).encode() + b"\n")
        f.flush()
        for gpa, npages, attrs in chunk:
            msg = answer()
            ret = msg.get("return")
            if isinstance(ret, dict):
                ret = ret.get("ret", 0)
            if "error" in msg or int(ret or 0) != 0:
                raise HarnessError(f"{vm.name}: map_gpa_range({gpa:#x}, {npages}, {attrs:#x}): {msg}")
    s.close()


# ------------------------------------------------------------------------------------- rows

def setup_none(vm: Vm) -> str:
    return "nothing"


def setup_boot_list(vm: Vm) -> str:
    made: list = []
    scenario.boot_list(vm, made)
    n = len(PagencApi.ranges(vm.pagenc_api.query()))
    return f"{len(made)} boot calls, {n} shared ranges, READY"


def setup_hostile(vm: Vm) -> str:
    scenario.set_ready(vm, 1)
    # q35 with at most 2 GiB: all RAM is below the PCI hole, gpa 0 .. mem.
    calls = [(g * PAGE, 1, ATTR_DECRYPTED) for g in range(0, vm.mem_mb * MiB // PAGE, 2)]
    pipelined_map(vm, calls)
    n = len(PagencApi.ranges(vm.pagenc_api.query()))
    return f"{len(calls)} one-page calls, {n} shared ranges, READY"


def check_transport(src: Vm, dst: Vm) -> str:
    """Row (d): the encrypted pages went through the firmware, as many received as sent.

    The counts are query-pagenc's (keyed.transport_info); a migration that sent nothing
    through the firmware (capability lost, everything classified shared) fails here.
    """
    st, dt = keyed.transport_info(src), keyed.transport_info(dst)
    sent, received = st.get("send-update-data", 0), dt.get("receive-update-data", 0)
    if not (sent > 0 and sent == received and st.get("send-finish") == 1
            and dt.get("receive-finish") == 1):
        raise HarnessError(f"transport counts: source {st}, destination {dt}: expected "
                           "send-update-data > 0 equal to receive-update-data, one "
                           "SEND_FINISH and one RECEIVE_FINISH")
    return f"{sent} pages through the firmware each side"


@dataclass
class Row:
    key: str
    title: str
    pagenc: bool
    setup: Callable[[Vm], str]
    extra_args: list[str] = field(default_factory=list)
    # (source, destination) arguments with the side's own -object pagenc: the harness's
    # plain one is then left out.
    side_args: Optional[tuple[list[str], list[str]]] = None
    # Sets migration capabilities on one side; run on each before the migration (row (d):
    # x-encrypted-pages and return-path, keyed.set_capabilities).
    set_caps: Optional[Callable[[Vm], None]] = None
    check: Optional[Callable[[Vm, Vm], str]] = None


ROWS = [
    Row("a", "no pagenc", False, setup_none),
    Row("b", "pagenc, boot list", True, setup_boot_list),
    Row("c", "pagenc, hostile every-other-page list", True, setup_hostile),
    Row("d", "transport, keyed, boot list", True, setup_boot_list,
        side_args=(keyed.source_args(), keyed.destination_args()),
        set_caps=keyed.set_capabilities, check=check_transport),
]


# ------------------------------------------------------------------------------------- runs

def one_run(row: Row, i: int, opts, work: Path) -> dict:
    append = f"serial mb={opts.dirty_mb}"
    # With side_args the row brings its own -object pagenc.
    harness_pagenc = row.pagenc and row.side_args is None
    src_args, dst_args = row.side_args or ([], [])
    vms: list[Vm] = []
    try:
        src = Vm(f"src-{row.key}{i}", work, pagenc=harness_pagenc, mem_mb=opts.mem,
                 append=append, extra_args=row.extra_args + src_args)
        vms.append(src)
        src.launch()
        src.wait_guest_running(passes=2)
        did = row.setup(src)
        sock = work / f"mig-{row.key}{i}.sock"
        # Capabilities must be set on the destination before its incoming migration
        # starts: -incoming defer, set them, then migrate-incoming.
        dst = Vm(f"dst-{row.key}{i}", work, pagenc=harness_pagenc, mem_mb=opts.mem,
                 append=append, incoming="defer" if row.set_caps else f"unix:{sock}",
                 paused=True, extra_args=row.extra_args + dst_args)
        vms.append(dst)
        dst.launch()
        if row.set_caps:
            row.set_caps(dst)
            dst.cmd("migrate-incoming", uri=f"unix:{sock}")
            row.set_caps(src)
        # The same parameters for every row: no bandwidth cap worth the name, 300 ms downtime.
        src.cmd("migrate-set-parameters", **{"max-bandwidth": 4 << 30, "downtime-limit": 300})
        mi = migrate(src, f"unix:{sock}", timeout=opts.timeout)
        ram = mi["ram"]
        ok = True
        if row.pagenc:
            dst.wait_status("paused", 30)
            sr = PagencApi.ranges(src.pagenc_api.query())
            dr = PagencApi.ranges(dst.pagenc_api.query())
            ok = sr == dr
        checked = row.check(src, dst) if row.check else ""
        return {
            "row": row.key, "run": i, "accel": src.accel, "setup": did, "check": checked,
            "total_ms": mi.get("total-time"), "downtime_ms": mi.get("downtime"),
            "setup_ms": mi.get("setup-time"), "transferred": ram.get("transferred"),
            "dirty_syncs": ram.get("dirty-sync-count"), "lists_equal": ok,
        }
    finally:
        for vm in vms:
            vm.kill()


def summary(runs: list[dict], rows: list[Row]) -> tuple[list[dict], str]:
    out = []
    base = None
    for row in rows:
        rs = [r for r in runs if r["row"] == row.key]
        if not rs:
            continue
        s = {"row": row.key, "title": row.title, "runs": len(rs), "setup": rs[0]["setup"]}
        for k in ("total_ms", "downtime_ms", "transferred"):
            v = [r[k] for r in rs if r[k] is not None]
            s[k + "_best"] = min(v)
            s[k + "_median"] = statistics.median(v)
            s[k + "_max"] = max(v)
        if base is None:
            base = s
        for k in ("total_ms", "downtime_ms", "transferred"):
            for w in ("best", "median"):
                b = base[f"{k}_{w}"]
                s[f"{k}_{w}_vs_a"] = s[f"{k}_{w}"] / b if b else float("nan")
        out.append(s)
    lines = [
        "| row | runs | time best / median ms | x (a) best / median | downtime best / median ms "
        "| x (a) best / median | transferred best / median MiB | x (a) best / median |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in out:
        lines.append(
            f"| ({s['row']}) {s['title']} | {s['runs']} "
            f"| {s['total_ms_best']} / {s['total_ms_median']:g} "
            f"| {s['total_ms_best_vs_a']:.3f} / {s['total_ms_median_vs_a']:.3f} "
            f"| {s['downtime_ms_best']} / {s['downtime_ms_median']:g} "
            f"| {s['downtime_ms_best_vs_a']:.3f} / {s['downtime_ms_median_vs_a']:.3f} "
            f"| {s['transferred_best'] / MiB:.1f} / {s['transferred_median'] / MiB:.1f} "
            f"| {s['transferred_best_vs_a']:.3f} / {s['transferred_median_vs_a']:.3f} |")
    return out, "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="migrations per row (default 5)")
    ap.add_argument("--mem", type=int, default=256, help="guest RAM in MiB (default 256)")
    ap.add_argument("--dirty-mb", type=int, default=32, help="MiB the payload keeps dirtying")
    ap.add_argument("--timeout", type=float, default=180, help="seconds per migration")
    ap.add_argument("--rows", default="", help="only these rows, e.g. a,c")
    opts = ap.parse_args()
    rows = [r for r in ROWS if not opts.rows or r.key in opts.rows.split(",")]
    work = Path(tempfile.mkdtemp(prefix="pagenc-e2e-cost-"))
    runs: list[dict] = []
    failed = False
    load0 = os.getloadavg()
    try:
        for i in range(opts.runs):
            for row in rows:
                try:
                    r = one_run(row, i, opts, work)
                except HarnessError as e:
                    say(f"({row.key}) run {i}: FAILED: {e}")
                    failed = True
                    continue
                runs.append(r)
                failed |= not r["lists_equal"]
                say(f"({row.key}) run {i} [{r['accel']}]: total {r['total_ms']} ms, downtime "
                    f"{r['downtime_ms']} ms, {r['transferred'] / MiB:.1f} MiB, "
                    f"{r['dirty_syncs']} syncs; {r['setup']}"
                    + (f"; {r['check']}" if r["check"] else "")
                    + ("" if r["lists_equal"] else "; LISTS DIFFER"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load1 = os.getloadavg()
    summ, table = summary(runs, rows)
    print()
    print(f"guest: payload.elf, {opts.mem} MiB, dirtying {opts.dirty_mb} MiB; "
          f"load average {load0[0]:.1f} at start, {load1[0]:.1f} at end")
    print(table)
    out = ROOT / "target/bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "e2e.json").write_text(json.dumps(
        {"mem_mb": opts.mem, "dirty_mb": opts.dirty_mb, "load_start": load0, "load_end": load1,
         "runs": runs, "summary": summ}, indent=1) + "\n")
    say(f"wrote {out / 'e2e.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
