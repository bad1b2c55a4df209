"""The demo's and the tests' shared story: a booted SEV-like list, READY, and a live
migration during which the list keeps changing.

`LiveMigration.run()` drives one precopy migration:
  * a converter thread issues coherent alloc/free churn (x-pagenc-map-gpa-range) on
    its own QMP connection, as fast as QMP answers;
  * the bandwidth is capped so the payload's dirtying keeps the migration iterating
    until `min_conversions` conversions happened during it (and a few dirty syncs),
    then the cap is lifted so it converges;
  * `pause-before-switchover` stops the migration once the source vCPUs are stopped:
    the converter is stopped and joined there, so every call it made is in the
    stream (a real guest cannot make a hypercall with its vCPUs stopped either),
    then `migrate-continue` lets the final pass and the pagenc section go out.
Everything waits with a timeout.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import sev_sequence as seq
from pagenc_vm import PAGE, MiB, HarnessError, PagencApi, Vm, wait_until


def boot_list(vm: Vm, made: list, *, ready_via_guest: Optional[bool] = None,
              report: Optional[Callable[[str, list], None]] = None) -> None:
    """The Linux SEV boot sequence on `vm`, READY in the middle, as Linux does.

    READY comes from the payload's own WRMSR under KVM (ready_via_guest None = when
    KVM is on), from x-pagenc-set-migration-control otherwise.
    """
    api = vm.pagenc_api
    before, after = seq.boot_sequence(vm.mem_mb * MiB)
    issue(api, before, made, report)
    set_ready(vm, 1, via_guest=ready_via_guest)
    issue(api, after, made, report)


def issue(api: PagencApi, calls, made: list, report=None) -> None:
    by_stage: dict[str, list] = {}
    for c in calls:
        ret = api.map_gpa_range(c.gpa, c.npages, c.attrs)
        if ret != 0:
            raise HarnessError(f"{c.stage}: map_gpa_range({c.gpa:#x}, {c.npages}, "
                               f"{c.attrs:#x}) returned {ret}")
        made.append(c)
        by_stage.setdefault(c.stage.split(" #")[0], []).append(c)
    if report:
        for key, cs in by_stage.items():
            report(key, cs)


def set_ready(vm: Vm, value: int, via_guest: Optional[bool] = None, timeout: float = 30) -> str:
    """Make MSR_KVM_MIGRATION_CONTROL `value`; returns how ('guest WRMSR' or 'QMP')."""
    if via_guest is None:
        via_guest = vm.kvm_enabled()
    api = vm.pagenc_api
    if via_guest:
        vm.serial_send(b"R" if value else b"0")
        wait_until(lambda: PagencApi.ready(api.query()) == bool(value), timeout,
                   f"{vm.name}: pagenc ready={bool(value)} after the guest's WRMSR "
                   f"(debugcon tail: {vm.debugcon_text()[-300:]!r})")
        return "guest WRMSR"
    api.set_migration_control(value)
    if PagencApi.ready(api.query()) != bool(value):
        raise HarnessError(f"{vm.name}: x-pagenc-set-migration-control {value} did not "
                           f"make ready={bool(value)}")
    return "QMP"


class Converter(threading.Thread):
    """Coherent alloc/free churn on `vm`, on its own QMP connection."""

    def __init__(self, vm: Vm, churn: seq.Churn):
        super().__init__(name=f"converter-{vm.name}", daemon=True)
        self.vm = vm
        self.churn = churn
        self.stop_flag = threading.Event()
        self.migrating = threading.Event()
        self.made: list = []
        self.during: list = []
        self.error: Optional[BaseException] = None

    def run(self):
        try:
            api = PagencApi(self.vm, self.vm.extra_qmp())
            while not self.stop_flag.is_set():
                c = self.churn.next_call()
                ret = api.map_gpa_range(c.gpa, c.npages, c.attrs)
                if ret != 0:
                    raise HarnessError(f"churn call {c} returned {ret}")
                self.made.append(c)
                if self.migrating.is_set():
                    self.during.append(c)
                time.sleep(0.001)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            self.error = e

    def stop(self):
        self.stop_flag.set()
        self.join(30)
        if self.is_alive():
            raise HarnessError("converter thread did not stop within 30s")
        if self.error:
            raise HarnessError(f"converter thread failed: {self.error}")


class LiveMigration:
    """One precopy migration of `src` to `uri` with conversions going on.

    The churn heap (default 176-192 MiB) lies outside everything the boot sequence made
    shared and outside the 16-48 MiB the payload dirties: a page there is sent again only
    if pagenc's change callback marked it dirty, which is what the resend check relies on.
    """

    def __init__(self, src: Vm, uri: str, *, min_conversions: int = 300,
                 churn_base: int = 0x0B000000, churn_size: int = 16 * MiB, seed: int = 7,
                 timeout: float = 180,
                 on_poll: Optional[Callable[["LiveMigration", dict, dict], None]] = None,
                 on_event: Optional[Callable[[str], None]] = None):
        self.src = src
        self.uri = uri
        self.min_conversions = min_conversions
        self.churn = seq.Churn(churn_base, churn_size, seed)
        self.timeout = timeout
        self.on_poll = on_poll
        self.on_event = on_event or (lambda msg: None)
        self.conv: Optional[Converter] = None
        self.info: dict = {}
        self.released = False

    def run(self) -> dict:
        src = self.src
        api = src.pagenc_api
        src.cmd("migrate-set-capabilities", capabilities=[
            {"capability": "pause-before-switchover", "state": True}])
        src.cmd("migrate-set-parameters", **{"max-bandwidth": 48 * MiB, "downtime-limit": 300})
        self.conv = conv = Converter(src, self.churn)
        conv.start()
        try:
            wait_until(lambda: len(conv.made) >= 10 or conv.error, 30,
                       "the converter thread to start")
            conv.migrating.set()
            src.cmd("migrate", uri=self.uri)
            self.on_event("migrate started; converter thread running, payload dirtying")
            deadline = time.monotonic() + self.timeout
            while True:
                if conv.error:
                    raise HarnessError(f"converter thread: {conv.error}")
                mi = src.cmd("query-migrate")
                status = mi.get("status")
                ram = mi.get("ram", {})
                if self.on_poll:
                    self.on_poll(self, mi, api.query())
                if status == "pre-switchover":
                    conv.migrating.clear()
                    conv.stop()
                    self.on_event(f"pre-switchover: source vCPUs stopped; converter stopped "
                                  f"after {len(conv.during)} conversions during the migration")
                    src.cmd("migrate-continue", state="pre-switchover")
                elif status in ("completed", "failed", "cancelled"):
                    break
                if (not self.released and len(conv.during) >= self.min_conversions
                        and ram.get("dirty-sync-count", 0) >= 3):
                    self.on_event(f"{len(conv.during)} conversions and "
                                  f"{ram.get('dirty-sync-count')} dirty syncs so far: lifting "
                                  "the bandwidth cap so the migration converges")
                    src.cmd("migrate-set-parameters", **{"max-bandwidth": 8 << 30})
                    self.released = True
                if time.monotonic() > deadline:
                    src.cmd("migrate_cancel")
                    raise HarnessError(f"migration still {status} after {self.timeout:.0f}s")
                time.sleep(0.1)
        finally:
            if conv.is_alive():
                conv.stop_flag.set()
                conv.join(30)
        self.info = src.cmd("query-migrate")
        if self.info.get("status") != "completed":
            raise HarnessError(f"migration from {src.name} {self.info.get('status')}: "
                               f"{self.info.get('error-desc', '')}\n"
                               f"{src.stderr_text()[-1500:]}")
        return self.info

    @property
    def made(self) -> list:
        return self.conv.made if self.conv else []

    @property
    def during(self) -> list:
        return self.conv.during if self.conv else []


# Trace events the source logs with `-D file -trace pagenc_ram_page -trace pagenc_pages_changed`.
TRACE_ARGS = ["-trace", "pagenc_ram_page", "-trace", "pagenc_pages_changed"]


def read_trace(path: Path):
    """(last send per pfn: (index, encrypted), last in-migration flip per pfn: (index, enc),
    number of sends). Log order is the order of events: both trace points log under the
    global log lock, the change one before the range is marked dirty."""
    sent: dict[int, tuple[int, bool]] = {}
    changed: dict[int, tuple[int, bool]] = {}
    started = False
    n_sent = 0
    # page=0 encrypted, 1 shared, 2 not guest RAM (QemuPagencPage): every line is a page
    # sent; the resend check looks at guest RAM pages only
    ram_re = re.compile(r"pagenc_ram_page block=\S+ offset=0x[0-9a-f]+ gpa=0x([0-9a-f]+) "
                        r"page=(\d)")
    chg_re = re.compile(r"pagenc_pages_changed id=\S+ gpa=0x([0-9a-f]+) npages=0x([0-9a-f]+) "
                        r"encrypted=(\d)")
    with open(path, errors="replace") as f:
        for i, line in enumerate(f):
            m = ram_re.search(line)
            if m:
                started = True
                n_sent += 1
                if m.group(2) in ("0", "1"):
                    sent[int(m.group(1), 16) // PAGE] = (i, m.group(2) == "0")
                continue
            m = chg_re.search(line)
            if m and started:
                first = int(m.group(1), 16) // PAGE
                for pfn in range(first, first + int(m.group(2), 16)):
                    changed[pfn] = (i, m.group(3) == "1")
    return sent, changed, n_sent


def resend_violations(sent: dict, changed: dict) -> tuple[list, list]:
    """Pages not sent after their last flip; pages last sent with a stale classification."""
    missing = sorted(p for p, (ci, _) in changed.items() if p not in sent or sent[p][0] < ci)
    wrong = sorted(p for p, (_, enc) in changed.items()
                   if p in sent and sent[p][0] > changed[p][0] and sent[p][1] != enc)
    return missing, wrong
