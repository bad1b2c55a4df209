"""Encrypted-page migrations through the simulated SEV firmware, and their keyed-mode check.

Shared by tests/e2e/test_transport_proof.py and scripts/demo.py, so the demo shows what the
tests check.  A VM here is pagenc_vm.Vm with the pagenc object given a simulated firmware
(x-sev-simulated-firmware, x-sev-sim-*: test-only properties of the QEMU series) and a
memory key; the x-encrypted-pages migration capability sends the pages the list calls
encrypted through it.

The check is the library's (pagenc::transport::Verifier, run as
`target/release/examples/verify_keyed`): with a different memory key per side, every
guest-RAM page on the paused destination must equal the source where the final list says
shared and the source re-keyed where it says encrypted.  The keystream is not re-implemented
here.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Optional

from pagenc_vm import MiB, ROOT, PagencApi, Vm, wait_until

# Simulated memory keys (64 hex digits) and platform identities.  An all-zero key is the
# identity: RAM holds plaintext, the destination guest can run.
K_SRC = "5a" * 32
K_DST = "c3" * 32
K_IDENTITY = "00" * 32
SRC_ID = "a1" * 32
DST_ID = "b2" * 32

VERIFIER = ROOT / "target/release/examples/verify_keyed"
# pmemsave reads through the flat view: the VGA window (0xa0000-0xbffff) and the PAM area
# (0xc0000-0xfffff, BIOS shadow that may read as ROM) show what is mapped there, not the
# RAM below.  Everything else below the top of RAM is guest RAM on q35 with -m <= 2 GiB.
LOW_RAM_END = 0xA0000
HIGH_RAM_START = 0x100000


def build_verifier() -> Path:
    """Builds the verifier command (cargo caches it); returns its path."""
    subprocess.run(["cargo", "build", "--release", "--quiet", "--example", "verify_keyed"],
                   cwd=ROOT, check=True)
    return VERIFIER


def transport_args(key: str, own_id: str, peer_id: str, extra: str = "") -> list[str]:
    """-object pagenc with the simulated firmware and memory key `key`."""
    return ["-object",
            "pagenc,id=pe0,x-testing=on,x-sev-simulated-firmware=on,"
            f"x-sev-sim-memory-key={key},x-sev-sim-platform-id={own_id},"
            f"x-sev-sim-peer-platform-id={peer_id}{extra}"]


def source_args(key: str = K_SRC, extra: str = "") -> list[str]:
    return transport_args(key, SRC_ID, DST_ID, extra)


def destination_args(key: str = K_DST, extra: str = "") -> list[str]:
    return transport_args(key, DST_ID, SRC_ID, extra)


def set_capabilities(vm: Vm, channels: int = 0) -> None:
    """x-encrypted-pages and return-path; multifd with `channels` channels when > 0."""
    caps = [{"capability": "x-encrypted-pages", "state": True},
            {"capability": "return-path", "state": True}]
    if channels:
        caps.append({"capability": "multifd", "state": True})
    vm.cmd("migrate-set-capabilities", capabilities=caps)
    if channels:
        vm.cmd("migrate-set-parameters", **{"multifd-channels": channels})


def transport_info(vm: Vm) -> dict:
    """query-pagenc's transport part (firmware calls, pages, firmware state)."""
    return vm.pagenc_api.query().get("transport", {})


def guest_ram_ranges(mem_mb: int) -> list[tuple[int, int]]:
    """(gpa, size) of the guest RAM that pmemsave shows as RAM."""
    return [(0, LOW_RAM_END), (HIGH_RAM_START, mem_mb * MiB - HIGH_RAM_START)]


def dump(vm: Vm, path: Path, gpa: int, size: int) -> Path:
    path.unlink(missing_ok=True)
    vm.cmd("pmemsave", val=gpa, size=size, filename=str(path))
    wait_until(lambda: path.exists() and path.stat().st_size == size, 60,
               f"{vm.name}: pmemsave of {size:#x} bytes at {gpa:#x}")
    return path


_SUMMARY = re.compile(r"verify-keyed: pages (\d+) shared-ok (\d+) encrypted-ok (\d+) "
                      r"mismatches (\d+)")


class Verdict:
    """The verifier's result: counts, the mismatching pages it listed, its output."""

    def __init__(self, rc: int, out: str, err: str):
        self.rc = rc
        self.out = out
        self.err = err
        m = _SUMMARY.search(out)
        if rc not in (0, 1) or not m:
            raise AssertionError(f"verify_keyed failed to run (exit {rc}): {err}{out}")
        self.pages, self.shared_ok, self.encrypted_ok, self.mismatches = map(int, m.groups())
        self.bad_gpas = [int(g, 16) for g in re.findall(r"page (0x[0-9a-f]+):", out)]

    @property
    def ok(self) -> bool:
        return self.rc == 0 and self.mismatches == 0

    def __str__(self) -> str:
        return self.out.strip()


def verify(src: Vm, dst: Vm, workdir: Path, src_key: str = K_SRC, dst_key: str = K_DST,
           shared: Optional[list[tuple[int, int]]] = None) -> Verdict:
    """Dumps both sides' guest RAM and runs the verifier against the final list.

    The list is the destination's (it arrived with the migration); the caller checks it
    equals the source's.
    """
    if shared is None:
        shared = [(s, e - s) for s, e in PagencApi.ranges(dst.pagenc_api.query())]
    lst = workdir / "shared.txt"
    lst.write_text("".join(f"{g:#x} {n:#x}\n" for g, n in shared))
    args = [str(VERIFIER), "--src-key", src_key, "--dst-key", dst_key, "--shared", str(lst)]
    for i, (gpa, size) in enumerate(guest_ram_ranges(src.mem_mb)):
        s = dump(src, workdir / f"src-{i}.bin", gpa, size)
        d = dump(dst, workdir / f"dst-{i}.bin", gpa, size)
        args += ["--range", hex(gpa), str(s), str(d)]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    for i in range(len(guest_ram_ranges(src.mem_mb))):
        (workdir / f"src-{i}.bin").unlink(missing_ok=True)
        (workdir / f"dst-{i}.bin").unlink(missing_ok=True)
    return Verdict(r.returncode, r.stdout, r.stderr)
