"""Real QEMU processes for pagenc's end-to-end tests and demo.

One module both `scripts/demo.py` and `tests/e2e/` use, so the demo shows
exactly what the tests check. Every QEMU runs the project's own guest payload
(guest/build/payload.elf) on q35 with `-object pagenc` unless told otherwise,
with QMP, the guest's debug console and COM1 on unix sockets/files in a
per-VM work directory. Every wait has a timeout and every process is killed
by `Vm.kill()` (idempotent; the pytest fixture and the demo always call it).

The pagenc QMP names live in one place (PagencApi) so that a rename in the
QEMU series is a one-line change here.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

from qemu.qmp import ExecuteError
from qemu.qmp.legacy import QEMUMonitorProtocol

ROOT = Path(__file__).resolve().parents[2]
# The QEMU-starting helper tests/qemu shares
sys.path.insert(0, str(ROOT / "tests/qemu_helper"))
import qemu_proc  # noqa: E402


QEMU_BIN = Path(os.environ.get("PAGENC_QEMU", ROOT / "build/qemu-build/qemu-system-x86_64"))
PAYLOAD = ROOT / "guest/build/payload.elf"
BIOS_DIR = os.environ.get("PAGENC_BIOS_DIR", "/usr/share/seabios")
# QEMU's multiboot option ROM, built from QEMU's source by guest/Makefile.
ROM_DIR = ROOT / "guest/build/roms"
# q35's default e1000e needs its option ROM: Debian's ipxe-qemu, unpacked by build-qemu.sh
IPXE_DIR = ROOT / "build/firmware/usr/lib/ipxe/qemu"

PAGE = 4096
MiB = 1 << 20
# KVM_HC_MAP_GPA_RANGE attributes (include/uapi/linux/kvm_para.h).
ATTR_4K = 0
ATTR_2M = 1
ATTR_ENCRYPTED = 1 << 4
ATTR_DECRYPTED = 0
MSR_KVM_MIGRATION_CONTROL = 0x4B564D08

DEFAULT_TIMEOUT = float(os.environ.get("PAGENC_E2E_TIMEOUT", "60"))


class HarnessError(RuntimeError):
    """A QEMU did not do what the harness waited for; the message says what."""


class QmpError(HarnessError):
    """A QMP command returned an error. `desc` is QEMU's message."""

    def __init__(self, cmd: str, args: dict, error_class: str, desc: str):
        super().__init__(f"QMP {cmd} {args} failed: {error_class}: {desc}")
        self.cmd = cmd
        self.error_class = error_class
        self.desc = desc


def kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def choose_accel() -> str:
    """`kvm` where /dev/kvm opens, `tcg` otherwise; PAGENC_ACCEL overrides."""
    forced = os.environ.get("PAGENC_ACCEL")
    if forced:
        if forced not in ("kvm", "tcg"):
            raise HarnessError(f"PAGENC_ACCEL={forced!r}: allowed values are kvm and tcg")
        return forced
    return "kvm" if kvm_usable() else "tcg"


def wait_until(pred: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    """Poll `pred` until it returns something truthy; HarnessError naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise HarnessError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class PagencApi:
    """The pagenc QMP commands of the QEMU series (qemu-patches/, qapi/pagenc.json)."""

    QUERY = "query-pagenc"
    MAP = "x-pagenc-map-gpa-range"
    SET_MC = "x-pagenc-set-migration-control"

    def __init__(self, vm: "Vm", qmp: Optional[QEMUMonitorProtocol] = None):
        self.vm = vm
        self.qmp = qmp

    def _cmd(self, name, **args):
        return self.vm.cmd(name, _qmp=self.qmp, **args)

    def query(self) -> dict:
        """query-pagenc with every shared range (the command pages them: ranges-next)."""
        info = self._cmd(self.QUERY, ranges=True)
        ranges = list(info.get("ranges", []))
        while "ranges-next" in info:
            info = self._cmd(self.QUERY, ranges=True, start=info["ranges-next"])
            ranges += info.get("ranges", [])
        info["ranges"] = ranges
        return info

    def map_gpa_range(self, gpa: int, npages: int, attrs: int) -> int:
        """Drives the KVM_EXIT_HYPERCALL path; returns the hypercall's ret (0 or -errno)."""
        ret = self._cmd(self.MAP, gpa=gpa, npages=npages, attrs=attrs)
        if isinstance(ret, dict):
            ret = ret.get("ret", ret.get("return", 0))
        return int(ret)

    def set_migration_control(self, value: int) -> bool:
        """Drives the KVM_EXIT_X86_WRMSR path; False where the guest would get #GP."""
        ret = self._cmd(self.SET_MC, value=value)
        return bool(ret.get("accepted", True)) if isinstance(ret, dict) else True

    # Field accessors, tolerant of the exact key spelling in the schema.
    @staticmethod
    def ready(info: dict) -> bool:
        return bool(info.get("ready", info.get("migration-ready")))

    @staticmethod
    def ranges(info: dict) -> list[tuple[int, int]]:
        """Shared ranges as sorted (start_gpa, end_gpa_exclusive) pairs."""
        out = []
        for r in info.get("ranges", info.get("shared-ranges", [])):
            start = r.get("gpa", r.get("start"))
            if "npages" in r:
                end = start + r["npages"] * PAGE
            elif "size" in r:
                end = start + r["size"]
            else:
                end = r["end"]
            out.append((int(start), int(end)))
        return sorted(out)

    @staticmethod
    def shared_bytes(info: dict) -> int:
        if "shared-bytes" in info:
            return int(info["shared-bytes"])
        return sum(e - s for s, e in PagencApi.ranges(info))


class Vm:
    """One QEMU process running the payload, driven over QMP on a unix socket."""

    def __init__(
        self,
        name: str,
        workdir: Path,
        *,
        pagenc: bool = True,
        incoming: Optional[str] = None,
        paused: bool = False,
        mem_mb: int = 256,
        append: str = "serial",
        accel: Optional[str] = None,
        extra_args: Iterable[str] = (),
        qmp_extra: int = 1,
        nodefaults: bool = True,
        payload: bool = True,
    ):
        """`nodefaults=False` keeps the machine's default devices (q35: std VGA, e1000e,
        whose option ROM comes from Debian's ipxe-qemu in build/firmware);
        `payload=False` boots no -kernel (firmware alone, e.g. OVMF in extra_args)."""
        self.name = name
        self.dir = Path(workdir) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.accel = accel or choose_accel()
        self.pagenc = pagenc
        self.mem_mb = mem_mb
        self.qmp_path = self.dir / "qmp.sock"
        self.qmp_extra_paths = [self.dir / f"qmp{i}.sock" for i in range(1, qmp_extra + 1)]
        self.serial_path = self.dir / "serial.sock"
        self.debugcon_path = self.dir / "debugcon.log"
        self.stderr_path = self.dir / "stderr.log"
        # Everything the guest writes to COM1, connected or not (chardev logfile).
        self.serial_log_path = self.dir / "serial.log"
        for p in [self.qmp_path, self.serial_path, *self.qmp_extra_paths]:
            p.unlink(missing_ok=True)
        args = [
            str(QEMU_BIN),
            "-machine", "q35", "-accel", self.accel,
            *(["-nographic", "-nodefaults"] if nodefaults else
              ["-display", "none", "-monitor", "none"]),
            "-L", str(ROM_DIR), "-L", BIOS_DIR, *([] if nodefaults else ["-L", str(IPXE_DIR)]),
            "-m", str(mem_mb), "-smp", "1",
            *(["-kernel", str(PAYLOAD), "-append", append] if payload else []),
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-chardev", f"socket,id=ser0,path={self.serial_path},server=on,wait=off,"
                        f"logfile={self.serial_log_path}",
            "-serial", "chardev:ser0",
            "-debugcon", f"file:{self.debugcon_path}",
        ]
        for p in self.qmp_extra_paths:
            args += ["-qmp", f"unix:{p},server=on,wait=off"]
        if pagenc:
            args += ["-object", "pagenc,id=pe0,x-testing=on"]
        if incoming:
            args += ["-incoming", incoming]
        if paused:
            args += ["-S"]
        args += list(extra_args)
        self.args = args
        self.proc: Optional[subprocess.Popen] = None
        self.qmp: Optional[QEMUMonitorProtocol] = None
        self._extra_qmps: list[QEMUMonitorProtocol] = []
        self._serial: Optional[socket.socket] = None
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- life
    def launch(self, timeout: float = 20.0) -> "Vm":
        if not QEMU_BIN.exists():
            raise HarnessError(f"{QEMU_BIN} does not exist: run scripts/build-qemu.sh")
        if "-kernel" in self.args and not PAYLOAD.exists():
            raise HarnessError(f"{PAYLOAD} does not exist: run make -C guest")
        self.proc, self.qmp = qemu_proc.start(self.args, self.qmp_path, self.stderr_path,
                                              timeout, self.name, error=HarnessError)
        return self

    def _connect(self, path: Path, timeout: float) -> QEMUMonitorProtocol:
        return qemu_proc.connect_qmp(
            self.proc, path, timeout, self.name,
            lambda: f"{self.stderr_text()}\ncommand: {' '.join(self.args)}", HarnessError)

    def extra_qmp(self, index: int = 0) -> QEMUMonitorProtocol:
        """A second QMP connection for another thread (one connection per thread)."""
        qmp = self._connect(self.qmp_extra_paths[index], DEFAULT_TIMEOUT)
        self._extra_qmps.append(qmp)
        return qmp

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise HarnessError(f"{self.name}: QEMU still running after {timeout:.0f}s") from None

    def kill(self):
        """Close everything and make sure the process is gone. Safe to call twice."""
        if self._serial is not None:
            self._serial.close()
            self._serial = None
        qemu_proc.stop(self.proc, [self.qmp, *self._extra_qmps])
        self.qmp = None
        self._extra_qmps = []

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def serial_text(self) -> str:
        try:
            return self.serial_log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def debugcon_text(self) -> str:
        try:
            return self.debugcon_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # ---------------------------------------------------------------- QMP
    def cmd(self, name: str, _qmp: Optional[QEMUMonitorProtocol] = None, **args):
        qmp = _qmp or self.qmp
        if qmp is None:
            raise HarnessError(f"{self.name}: not connected")
        try:
            return qmp.cmd(name, **args)
        except ExecuteError as e:
            raise QmpError(name, args, e.error_class, str(e)) from None

    def hmp(self, line: str) -> str:
        return self.cmd("human-monitor-command", **{"command-line": line})

    def status(self) -> str:
        return self.cmd("query-status")["status"]

    def kvm_enabled(self) -> bool:
        return bool(self.cmd("query-kvm")["enabled"])

    def wait_status(self, statuses, timeout: float = DEFAULT_TIMEOUT) -> str:
        statuses = {statuses} if isinstance(statuses, str) else set(statuses)
        return wait_until(lambda: (s := self.status()) in statuses and s,
                          timeout, f"{self.name} run state in {sorted(statuses)}")

    @property
    def pagenc_api(self) -> PagencApi:
        return PagencApi(self)

    # ---------------------------------------------------------------- guest
    def pass_count(self) -> int:
        """The payload's pass counter (kept at guest-physical 0x7000)."""
        out = self.hmp("xp /1wx 0x7000")
        m = re.search(r":\s*0x([0-9a-f]+)", out)
        if not m:
            raise HarnessError(f"{self.name}: cannot parse xp output {out!r}")
        return int(m.group(1), 16)

    BANNER = "pagenc-guest: dirtying"

    def boots(self) -> int:
        """How many times the payload has started (its banner on the debug console)."""
        return self.debugcon_text().count(self.BANNER)

    def wait_guest_running(self, passes: int = 2, timeout: float = DEFAULT_TIMEOUT,
                           boots: int = 1):
        """Until the payload has started `boots` times and completed `passes` passes.

        The banner matters: before the payload runs, 0x7000 holds whatever the BIOS left.
        """
        return wait_until(lambda: self.boots() >= boots and self.pass_count() >= passes,
                          timeout,
                          f"{self.name}: guest payload (boot {boots}) to complete {passes} "
                          f"passes (debugcon: {self.debugcon_text()[-200:]!r})")

    def serial_send(self, data: bytes):
        """One-byte commands to the payload's COM1 poller: b'R' READY, b'0' not ready."""
        if self._serial is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(DEFAULT_TIMEOUT)
            s.connect(str(self.serial_path))
            self._serial = s
        self._serial.sendall(data)

    def memory_sha256(self, path: Path, size: Optional[int] = None, start: int = 0) -> str:
        """pmemsave guest-physical [start, start+size) to `path` and hash it."""
        size = size if size is not None else self.mem_mb * MiB
        path = Path(path)
        path.unlink(missing_ok=True)
        self.cmd("pmemsave", val=start, size=size, filename=str(path))
        wait_until(lambda: path.exists() and path.stat().st_size == size, 60,
                   f"{self.name}: pmemsave of {size} bytes to {path}")
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()


def migrate(src: Vm, uri: str, *, timeout: float = DEFAULT_TIMEOUT,
            on_poll: Optional[Callable[[dict], None]] = None,
            interval: float = 0.1, expect: str = "completed") -> dict:
    """Start `migrate` on src and poll query-migrate until it ends; returns the last info."""
    src.cmd("migrate", uri=uri)
    deadline = time.monotonic() + timeout
    while True:
        info = src.cmd("query-migrate")
        if on_poll:
            on_poll(info)
        status = info.get("status")
        if status in ("completed", "failed", "cancelled"):
            if expect and status != expect:
                raise HarnessError(f"migration from {src.name} ended {status}, expected {expect}: "
                                   f"{info.get('error-desc', '')}\n{src.stderr_text()[-2000:]}")
            return info
        if time.monotonic() > deadline:
            try:
                src.cmd("migrate_cancel")
            except HarnessError:
                pass
            raise HarnessError(f"migration from {src.name} still {status} after {timeout:.0f}s")
        time.sleep(interval)


def tune_migration(vm: Vm):
    """Fast local migration that still iterates: no bandwidth cap, 300 ms downtime."""
    vm.cmd("migrate-set-parameters", **{"max-bandwidth": 4 << 30, "downtime-limit": 300})
