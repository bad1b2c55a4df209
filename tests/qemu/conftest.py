"""Harness for the QEMU integration tests of the pagenc patch series.

Starts the patched qemu-system-x86_64 (scripts/build-qemu.sh builds it) on
q35 with SeaBIOS and no guest OS, drives it over QMP (qemu.qmp, unix socket)
and kills it on teardown.  Guests here never make hypercalls (a VMMCALL
livelocks on this kind of host): the x-pagenc-* commands drive the same
functions the KVM exit handlers call.

Environment:
  PAGENC_QEMU          QEMU binary (default build/qemu-build/qemu-system-x86_64)
  PAGENC_ACCEL         kvm or tcg (default: kvm when /dev/kvm opens)
  PAGENC_REQUIRE_QEMU  1: a missing binary fails instead of skipping
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# The QEMU-starting helper tests/e2e shares
sys.path.insert(0, str(ROOT / "tests/qemu_helper"))
import qemu_proc  # noqa: E402

QEMU = Path(os.environ.get("PAGENC_QEMU", ROOT / "build/qemu-build/qemu-system-x86_64"))
BIOS = os.environ.get("PAGENC_BIOS_DIR", "/usr/share/seabios")
# Debian's ovmf and ipxe-qemu, unpacked by scripts/build-qemu.sh (stage "firmware")
FIRMWARE = Path(os.environ.get("PAGENC_FIRMWARE_DIR", ROOT / "build/firmware"))
OVMF_DIR = FIRMWARE / "usr/share/OVMF"
IPXE_DIR = FIRMWARE / "usr/lib/ipxe/qemu"
START_TIMEOUT = 20.0
QMP_TIMEOUT = 30.0
TEST_TIMEOUT = 180


def kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


ACCEL = os.environ.get("PAGENC_ACCEL") or ("kvm" if kvm_usable() else "tcg")


class QmpError(Exception):
    def __init__(self, cmd, error):
        super().__init__(f"{cmd}: {error.get('class')}: {error.get('desc')}")
        self.cls = error.get("class")
        self.desc = error.get("desc", "")


class Qemu:
    """One QEMU process with a QMP socket; every wait is bounded."""

    def __init__(self, workdir: Path, name: str, args: list[str], accel: str = ACCEL,
                 mem: str = "256", defaults: bool = False, serial: str = "none",
                 machine: str = "q35"):
        """defaults=True: q35's default devices (std VGA, e1000e, ...), not -nodefaults."""
        self.workdir = workdir
        self.name = name
        self.sock = str(workdir / f"{name}.qmp")
        self.stderr_path = workdir / f"{name}.stderr"
        self.cmdline = [str(QEMU), "-machine", machine, "-accel", accel, "-nographic"]
        self.cmdline += ["-L", BIOS, "-L", str(IPXE_DIR)] if defaults else ["-nodefaults", "-L", BIOS]
        self.cmdline += ["-m", mem, "-serial", serial, "-monitor", "none",
                         "-qmp", f"unix:{self.sock},server=on,wait=off"] + args
        self.proc = None
        self.qmp = None

    # -- process ---------------------------------------------------------
    def start(self) -> "Qemu":
        self.proc, self.qmp = qemu_proc.start(self.cmdline, self.sock, self.stderr_path,
                                              START_TIMEOUT, self.name)
        self.qmp.settimeout(QMP_TIMEOUT)
        return self

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_exit(self, timeout: float = 20.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"QEMU {self.name} did not exit within {timeout}s")

    def kill(self):
        qemu_proc.stop(self.proc, [self.qmp])
        self.qmp = None

    # -- QMP -------------------------------------------------------------
    def raw(self, cmd: str, **args) -> dict:
        return self.qmp.cmd_raw(cmd, args or None)

    def cmd(self, cmd: str, **args):
        r = self.raw(cmd, **args)
        if "error" in r:
            raise QmpError(cmd, r["error"])
        return r["return"]

    def error(self, cmd: str, **args) -> QmpError:
        r = self.raw(cmd, **args)
        assert "error" in r, f"{cmd} {args} succeeded: {r}"
        return QmpError(cmd, r["error"])

    def hmp(self, line: str) -> str:
        return self.cmd("human-monitor-command", **{"command-line": line})

    def pagenc(self, **args) -> dict:
        """query-pagenc with the shared ranges (one page of up to 4096 of them)."""
        args.setdefault("ranges", True)
        return self.cmd("query-pagenc", **args)

    def map(self, gpa: int, npages: int, attrs: int) -> int:
        return self.cmd("x-pagenc-map-gpa-range", gpa=gpa, npages=npages, attrs=attrs)["ret"]

    def set_mc(self, value: int) -> bool:
        return self.cmd("x-pagenc-set-migration-control", value=value)["accepted"]

    def wait_for(self, pred, what: str, timeout: float = 20.0):
        deadline = time.monotonic() + timeout
        while True:
            v = pred()
            if v:
                return v
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(0.05)

    def wait_migration(self, timeout: float = 60.0) -> dict:
        def done():
            st = self.cmd("query-migrate")
            return st if st.get("status") in ("completed", "failed", "cancelled") else None
        return self.wait_for(done, "migration to finish", timeout)


def migrate_list_between_two_qemus(vms, workdir) -> "Qemu":
    """The list's live migration every build must pass: two shared ranges and READY cross
    from one QEMU to another over a unix socket; the destination runs with the same list.
    Returns the destination, for checks of the build at hand."""
    page, mib = 4096, 1 << 20
    sock = workdir / "mig.sock"
    dst = vms("dst", ["-object", "pagenc,id=pe0,x-testing=on", "-incoming", "defer"])
    dst.cmd("migrate-incoming", uri=f"unix:{sock}")
    src = vms("src", ["-object", "pagenc,id=pe0,x-testing=on"])
    src.map(16 * mib, 8, 0)
    src.map(0x100000, 1, 0)
    src.set_mc(1)
    src.wait_for(lambda: not src.pagenc()["migration-blocked"], "source unblocked")
    src.cmd("migrate", uri=f"unix:{sock}")
    assert src.wait_migration()["status"] == "completed"
    dst.wait_for(lambda: dst.cmd("query-status")["status"] == "running", "destination running")
    got = dst.pagenc()
    assert [(r["gpa"], r["size"]) for r in got["ranges"]] == \
        [(0x100000, page), (16 * mib, 8 * page)]
    assert got["ready"] is True
    return dst


def run_qemu_expect_failure(args: list[str], timeout: float = 20.0,
                            accel: str = ACCEL) -> tuple[int, str]:
    """Run QEMU that must refuse its command line; returns (exit code, stderr)."""
    cmd = [str(QEMU), "-machine", "q35", "-accel", accel, "-nographic", "-nodefaults",
           "-L", BIOS, "-m", "256", "-serial", "none", "-monitor", "none", "-S"] + args
    try:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                           timeout=timeout, start_new_session=True)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"QEMU did not refuse {args} within {timeout}s (it ran)")
    return p.returncode, p.stderr.decode(errors="replace")


@pytest.fixture(scope="session", autouse=True)
def _need_qemu():
    if not QEMU.exists():
        if os.environ.get("PAGENC_REQUIRE_QEMU") == "1":
            pytest.fail(f"{QEMU} is missing: run scripts/build-qemu.sh")
        pytest.skip(f"{QEMU} is missing: run scripts/build-qemu.sh")


@pytest.fixture(autouse=True)
def _time_limit():
    """No test may hang: SIGALRM fails it after TEST_TIMEOUT seconds."""
    def on_alarm(signum, frame):
        raise TimeoutError(f"test exceeded {TEST_TIMEOUT}s")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(TEST_TIMEOUT)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture
def workdir():
    with tempfile.TemporaryDirectory(prefix="pagenc-qemu-") as d:
        yield Path(d)


@pytest.fixture
def vms(workdir):
    """Factory: vms(name, args, ...) starts a QEMU; all are killed on teardown."""
    started: list[Qemu] = []

    def start(name: str, args: list[str], **kw) -> Qemu:
        q = Qemu(workdir, name, args, **kw)
        started.append(q)
        return q.start()

    yield start
    for q in started:
        q.kill()


@pytest.fixture
def vm(vms):
    """A running QEMU with -object pagenc,id=pe0."""
    return vms("src", ["-object", "pagenc,id=pe0,x-testing=on"])


class Qtest:
    """The qtest protocol on a unix socket (-qtest unix:PATH,server=on,wait=off):
    one command a line, answered "OK ..." or "FAIL ..."."""

    def __init__(self, path: Path, timeout: float = START_TIMEOUT):
        import socket
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(path))
                break
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise AssertionError(f"qtest socket {path} not up after {timeout}s")
                time.sleep(0.05)
        s.settimeout(QMP_TIMEOUT)
        self.sock = s
        self.buf = b""

    def cmd(self, line: str) -> str:
        self.sock.sendall(line.encode() + b"\n")
        while True:
            # Skip asynchronous "IRQ ..." lines; the answer starts with OK or FAIL.
            while b"\n" in self.buf:
                reply, self.buf = self.buf.split(b"\n", 1)
                reply = reply.decode()
                if reply.startswith(("OK", "FAIL")):
                    assert reply.startswith("OK"), f"qtest {line!r}: {reply}"
                    return reply
            chunk = self.sock.recv(4096)
            assert chunk, f"qtest socket closed during {line!r}"
            self.buf += chunk

    def close(self):
        self.sock.close()
