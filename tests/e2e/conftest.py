"""pytest set-up for pagenc's end-to-end tests: real QEMU processes, QMP on unix sockets.

The tests need the patched QEMU (scripts/build-qemu.sh) and the guest payload
(make -C guest). Without the QEMU binary they skip with a message saying so,
unless PAGENC_REQUIRE_QEMU=1 (CI), where they fail instead.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pagenc_vm import PAYLOAD, QEMU_BIN, ROM_DIR, Vm, choose_accel  # noqa: E402


def pytest_report_header(config):
    return [f"pagenc e2e: QEMU {QEMU_BIN} ({'present' if QEMU_BIN.exists() else 'MISSING'}), "
            f"accel {choose_accel()}"]


@pytest.fixture(scope="session", autouse=True)
def _need_qemu():
    if not QEMU_BIN.exists():
        msg = (f"patched QEMU {QEMU_BIN} is missing: build it with `bash scripts/build-qemu.sh` "
               "(or `make check-e2e`)")
        if os.environ.get("PAGENC_REQUIRE_QEMU") == "1":
            pytest.fail(msg + " [PAGENC_REQUIRE_QEMU=1, so this is a failure]", pytrace=False)
        pytest.skip(msg)
    for f in (PAYLOAD, ROM_DIR / "multiboot_dma.bin"):
        if not f.exists():
            pytest.fail(f"{f} is missing: build it with `make -C guest`", pytrace=False)


@pytest.fixture
def workdir():
    # Short path: unix socket paths are limited to 107 bytes, pytest's tmp_path is long.
    d = Path(tempfile.mkdtemp(prefix="pe2e-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def vms(workdir, request):
    """Factory: vms(name, **Vm kwargs) -> launched Vm; all killed at teardown.

    On failure, each VM's stderr and debug console tail are printed.
    """
    started: list[Vm] = []

    def make(name: str, **kw) -> Vm:
        vm = Vm(name, workdir, **kw)
        started.append(vm)
        return vm.launch()

    make.workdir = workdir
    yield make
    failed = getattr(request.node, "rep_call", None)
    for vm in started:
        vm.kill()
        if failed is not None and failed.failed:
            print(f"--- {vm.name} stderr:\n{vm.stderr_text()[-3000:]}")
            print(f"--- {vm.name} debugcon tail:\n{vm.debugcon_text()[-500:]}")


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
