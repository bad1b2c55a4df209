#!/usr/bin/env python3
"""Migration time through the simulated SEV firmware against no pagenc, 1 and 4 multifd channels.

    python3 scripts/bench_transport.py [--runs 3] [--mem 256]

Same guest (the payload, dirtying 32 MiB), same run, the rows of issue 14 interleaved run by run
so the shared machine's load drifts over all of them alike:
  (a) no pagenc: QEMU without -object pagenc, every page sent as it is;
  (b) pagenc, every page shared: -object pagenc, the whole RAM made shared and READY, no
      transport (every page goes the ordinary way through pagenc's classifier);
  (c) the simulated transport, keyed mode, the boot list (almost every page encrypted, each
      through SEND_UPDATE_DATA / RECEIVE_UPDATE_DATA).
each over precopy (main channel), multifd with 1 channel and with 4, over a unix socket without
a bandwidth cap, return path on, destination paused.  Printed per row: best and median
total-time and downtime as QEMU reports them, the ratio of the best to (a)'s best with the same
channels, and the pages sent through the firmware.  Needs the patched QEMU
(scripts/build-qemu.sh) and the guest (make -C guest).  Asserts nothing about time; fails only
if a migration fails.  docs/performance.md has the numbers.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests/e2e"))

import keyed  # noqa: E402
import scenario  # noqa: E402
from pagenc_vm import Vm, wait_until  # noqa: E402


def set_plain_capabilities(vm: Vm, channels: int) -> None:
    """return-path, and multifd with `channels` channels when > 0 (rows a and b)."""
    caps = [{"capability": "return-path", "state": True}]
    if channels:
        caps.append({"capability": "multifd", "state": True})
    vm.cmd("migrate-set-capabilities", capabilities=caps)
    if channels:
        vm.cmd("migrate-set-parameters", **{"multifd-channels": channels})


def one(work: Path, mem: int, row: str, channels: int) -> dict:
    vms = []
    plain_obj = ["-object", "pagenc,id=pe0,x-testing=on"]
    src_args = {"a": [], "b": plain_obj, "c": keyed.source_args()}[row]
    dst_args = {"a": [], "b": plain_obj, "c": keyed.destination_args()}[row]
    try:
        src = Vm("src", work, pagenc=False, mem_mb=mem, extra_args=src_args)
        vms.append(src)
        src.launch()
        src.wait_guest_running(2)
        if row == "b":
            # every page of RAM shared (the library clips what is not guest RAM), READY
            src.pagenc_api.map_gpa_range(0, mem * 256, 0)
            scenario.set_ready(src, 1)
        elif row == "c":
            scenario.boot_list(src, [])
        dst = Vm("dst", work, pagenc=False, mem_mb=mem, incoming="defer", paused=True,
                 extra_args=dst_args)
        vms.append(dst)
        dst.launch()
        setcaps = keyed.set_capabilities if row == "c" else set_plain_capabilities
        setcaps(dst, channels)
        sock = work / "mig.sock"
        dst.cmd("migrate-incoming", uri=f"unix:{sock}")
        setcaps(src, channels)
        src.cmd("migrate-set-parameters", **{"max-bandwidth": 8 << 30})
        src.cmd("migrate", uri=f"unix:{sock}")
        info = wait_until(lambda: (s := src.cmd("query-migrate"))["status"] in
                          ("completed", "failed", "cancelled") and s, 300, "migration end")
        if info["status"] != "completed":
            raise SystemExit(f"row {row}: migration {info['status']}: {info.get('error-desc')}")
        fw = keyed.transport_info(src)["send-update-data"] if row == "c" else 0
        return {"total": info["total-time"], "downtime": info.get("downtime", 0),
                "fw_pages": fw}
    finally:
        for vm in vms:
            vm.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mem", type=int, default=256)
    opts = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pagenc-bench-"))
    rows = {"a": "(a) no pagenc", "b": "(b) pagenc, every page shared",
            "c": "(c) simulated transport, boot list"}
    chans = {0: "precopy", 1: "multifd 1", 4: "multifd 4"}
    res: dict = {(r, c): [] for r in rows for c in chans}
    try:
        for i in range(opts.runs):
            for c in chans:
                for r in rows:
                    res[(r, c)].append(one(work, opts.mem, r, c))
                    print(f"run {i + 1}/{opts.runs}: {rows[r]}, {chans[c]}: "
                          f"{res[(r, c)][-1]}", flush=True)
        print(f"\n| row ({opts.mem} MiB guest) | channels | total-time ms best / median "
              f"(of {opts.runs}) | best vs (a) | downtime ms best / median | best vs (a) "
              f"| pages through the firmware |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for c in chans:
            base_t = min(x["total"] for x in res[("a", c)])
            base_d = min(x["downtime"] for x in res[("a", c)])
            for r in rows:
                xs = res[(r, c)]
                bt = min(x["total"] for x in xs)
                bd = min(x["downtime"] for x in xs)
                mt = statistics.median(x["total"] for x in xs)
                md = statistics.median(x["downtime"] for x in xs)
                print(f"| {rows[r]} | {chans[c]} | {bt} / {mt:.0f} | {bt / base_t:.2f}x "
                      f"| {bd} / {md:.0f} | {bd / max(base_d, 1):.2f}x "
                      f"| {max(x['fw_pages'] for x in xs)} |", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
