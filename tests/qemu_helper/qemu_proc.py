"""Starting and stopping a QEMU for the tests: the one helper tests/qemu (pytest) and
tests/e2e (pytest, scripts/demo.py) share.

start() runs QEMU in its own session, with SIGTERM when the harness dies (so no QEMU
outlives a killed run), stdout and stderr into one file, and returns once QMP answers on a
unix socket; every wait is bounded.  stop() closes the QMP connections and makes sure the
process group is gone.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

from qemu.qmp.legacy import QEMUMonitorProtocol


class QemuStartError(AssertionError):
    """QEMU exited, or its QMP socket did not answer, while starting."""


def _die_with_parent():
    """In the child before exec: SIGTERM when the harness dies, even by SIGKILL
    (PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def read_text(path: Path) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def launch(cmdline: list[str], stderr_path: Path) -> subprocess.Popen:
    """Start QEMU; its stdout and stderr go to stderr_path."""
    with open(stderr_path, "wb") as err:
        return subprocess.Popen(cmdline, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                start_new_session=True, preexec_fn=_die_with_parent)


def connect_qmp(proc: subprocess.Popen, path: Path, timeout: float, name: str,
                describe: Callable[[], str] = lambda: "",
                error: type = QemuStartError) -> QEMUMonitorProtocol:
    """Connect to QMP on the unix socket path once QEMU listens there (bounded)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise error(f"{name}: QEMU exited with {proc.returncode} before QMP was up:\n"
                        f"{describe()}")
        if os.path.exists(path):
            qmp = QEMUMonitorProtocol(str(path))
            try:
                qmp.connect(negotiate=True)
                qmp.settimeout(timeout)
                return qmp
            except Exception as e:  # the socket exists but is not listening yet
                last = e
                qmp.close()
        time.sleep(0.05)
    stop(proc)
    raise error(f"{name}: no QMP on {path} after {timeout:.0f}s ({last}):\n{describe()}")


def start(cmdline: list[str], qmp_path: Path, stderr_path: Path, timeout: float, name: str,
          error: type = QemuStartError) -> tuple[subprocess.Popen, QEMUMonitorProtocol]:
    proc = launch(cmdline, stderr_path)
    qmp = connect_qmp(proc, qmp_path, timeout, name,
                      lambda: read_text(stderr_path) + "\ncommand: " + " ".join(cmdline),
                      error)
    return proc, qmp


def stop(proc: Optional[subprocess.Popen], qmps: Iterable = ()):
    """Close the QMP connections; SIGTERM, then SIGKILL, the process group. Safe to repeat."""
    for q in qmps:
        if q is not None:
            try:
                q.close()
            except Exception:
                pass
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            pass
