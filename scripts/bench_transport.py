#!/usr/bin/env python3
"""Migration time through the simulated SEV firmware with 1 and 4 multifd channels.

    python3 scripts/bench_transport.py [--runs 3] [--mem 256]

Same guest (the payload, dirtying 32 MiB, with the boot list: almost every page encrypted),
same process, keyed mode: for each configuration, the best of --runs migrations over a unix
socket without a bandwidth cap, as QEMU reports them (total-time, downtime), and the pages sent
through the firmware.  Configurations: precopy (main channel), multifd with 1 channel, multifd
with 4.  Needs the patched QEMU (scripts/build-qemu.sh) and the guest (make -C guest).  Asserts
nothing about time; fails only if a migration fails.  docs/performance.md has the numbers.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests/e2e"))

import keyed  # noqa: E402
import scenario  # noqa: E402
from pagenc_vm import Vm, wait_until  # noqa: E402


def one(work: Path, mem: int, channels: int) -> dict:
    vms = []
    try:
        src = Vm("src", work, pagenc=False, mem_mb=mem, extra_args=keyed.source_args())
        vms.append(src)
        src.launch()
        src.wait_guest_running(2)
        scenario.boot_list(src, [])
        dst = Vm("dst", work, pagenc=False, mem_mb=mem, incoming="defer", paused=True,
                 extra_args=keyed.destination_args())
        vms.append(dst)
        dst.launch()
        keyed.set_capabilities(dst, channels)
        sock = work / "mig.sock"
        dst.cmd("migrate-incoming", uri=f"unix:{sock}")
        keyed.set_capabilities(src, channels)
        src.cmd("migrate-set-parameters", **{"max-bandwidth": 8 << 30})
        src.cmd("migrate", uri=f"unix:{sock}")
        info = wait_until(lambda: (s := src.cmd("query-migrate"))["status"] in
                          ("completed", "failed", "cancelled") and s, 300, "migration end")
        if info["status"] != "completed":
            raise SystemExit(f"migration {info['status']}: {info.get('error-desc')}")
        t = keyed.transport_info(src)
        return {"total": info["total-time"], "downtime": info.get("downtime", 0),
                "fw_pages": t["send-update-data"]}
    finally:
        for vm in vms:
            vm.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mem", type=int, default=256)
    opts = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pagenc-bench-"))
    try:
        print(f"| configuration ({opts.mem} MiB guest, keyed) | total-time ms (best of "
              f"{opts.runs}) | downtime ms | pages through the firmware |")
        print("|---|---:|---:|---:|")
        for name, channels in (("precopy, main channel", 0), ("multifd, 1 channel", 1),
                               ("multifd, 4 channels", 4)):
            runs = [one(work, opts.mem, channels) for _ in range(opts.runs)]
            best = min(runs, key=lambda r: r["total"])
            print(f"| {name} | {best['total']} | {best['downtime']} | {best['fw_pages']} |",
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
