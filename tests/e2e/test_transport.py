"""End-to-end: encrypted pages through the transport (issue 14), precopy and file.

Both QEMUs use the simulated SEV firmware (-object pagenc,x-sev-simulated-firmware=on)
in identity mode (all-zero memory keys: the simulated encryption is the identity, so the
guest keeps running on the destination and both memories are equal byte for byte), and
the x-encrypted-pages migration capability. The firmware's own command counts
(query-pagenc's "transport") say how many pages went through it each way; pagenc's
classifier counts (pages-sent-encrypted) say how many should have.

Keyed mode (a different memory key per side) and multifd are tested elsewhere
(the transport-proof branch).
"""

from __future__ import annotations

import re

import pytest

import scenario
from scenario import read_trace, resend_violations
import sev_sequence as seq
from pagenc_vm import MiB, PAGE, HarnessError, PagencApi, QmpError, Vm, wait_until

MIGRATION_TIMEOUT = 120
SIM = "x-sev-simulated-firmware=on"
P_SRC = "11" * 32
P_DST = "22" * 32
# SEV API guest states (pagenc_simfw_guest_state)
RUNNING, SENT = 3, 6


def pagenc_object(*props: str) -> list[str]:
    return ["-object", ",".join(["pagenc,id=pe0,x-testing=on", SIM, *props])]


def caps(*names: str) -> list[str]:
    return [a for n in names for a in ("-global", f"migration.{n}=on")]


def source_args(*props, extra=(), return_path=True):
    return [*pagenc_object(f"x-sev-sim-platform-id={P_SRC}",
                           f"x-sev-sim-peer-platform-id={P_DST}", *props),
            *caps("x-encrypted-pages", *(["x-return-path"] if return_path else [])),
            *extra]


def dest_args(*props, extra=(), return_path=True):
    return [*pagenc_object(f"x-sev-sim-platform-id={P_DST}", *props),
            *caps("x-encrypted-pages", *(["x-return-path"] if return_path else [])),
            *extra]


def transport(vm: Vm) -> dict:
    return vm.pagenc_api.query()["transport"]


def boot(make, name="src", *, mem_mb=128, extra_args=(), **kw) -> Vm:
    vm = make(name, pagenc=False, mem_mb=mem_mb, extra_args=list(extra_args), **kw)
    vm.wait_guest_running(2)
    scenario.boot_list(vm, [])
    return vm


def boot_ready(make, name="src", *, extra_args=()) -> Vm:
    """A running payload that says READY, with no shared pages: enough for refusals."""
    vm = make(name, pagenc=False, mem_mb=128, extra_args=list(extra_args))
    vm.wait_guest_running(0)                # the banner: its COM1 poller runs
    scenario.set_ready(vm, 1)
    return vm


def wait_migration(src: Vm, statuses=("completed", "failed", "cancelled")) -> dict:
    return wait_until(lambda: (i := src.cmd("query-migrate"))["status"] in statuses and i,
                      MIGRATION_TIMEOUT, f"{src.name}: migration to end in {statuses}")


def migrate_fast(src: Vm, uri: str) -> dict:
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 8 << 30})
    src.cmd("migrate", uri=uri)
    return wait_migration(src)


def assert_sent_through_firmware(src: Vm, dst: Vm):
    """Every page the classifier called encrypted went through both firmwares, once each
    way, and nothing else did."""
    si, di = src.pagenc_api.query(), dst.pagenc_api.query()
    st, dt = si["transport"], di["transport"]
    assert st["firmware"] == dt["firmware"] == "simulated"
    assert si["pages-sent-encrypted"] > 0 and si["pages-sent-shared"] > 0
    assert st["send-update-data"] == st["pages-sent"] == si["pages-sent-encrypted"]
    assert dt["receive-update-data"] == dt["pages-received"] == st["send-update-data"]
    assert (st["send-start"], st["send-finish"], st["send-cancel"]) == (1, 1, 0)
    assert (dt["receive-start"], dt["receive-finish"]) == (1, 1)
    assert st["failures"] == dt["failures"] == 0
    assert st["guest-state"] == SENT and st["guest-may-run"] is False
    assert dt["guest-state"] == RUNNING and dt["guest-may-run"] is True


# --------------------------------------------------------------------------------------------
# Precopy over a socket with the return path, conversions during the migration.

def test_identity_precopy_with_conversions(vms):
    w = vms.workdir
    trace = w / "src-trace.log"
    src = boot(vms, mem_mb=256, extra_args=source_args(
        extra=["-D", str(trace), *scenario.TRACE_ARGS]))
    dst = vms("dst", pagenc=False, incoming=f"unix:{w}/m.sock", paused=True,
              extra_args=dest_args())
    assert transport(dst)["guest-may-run"] is False     # nothing received yet
    lm = scenario.LiveMigration(src, f"unix:{w}/m.sock", min_conversions=100,
                                timeout=MIGRATION_TIMEOUT)
    lm.run()
    dst.wait_status("paused")
    assert_sent_through_firmware(src, dst)

    # Pages converted during the migration went out again, the way their final state says.
    sent, changed, n = read_trace(trace)
    assert len(changed) >= 50, f"only {len(changed)} pages flipped during the migration"
    missing, wrong = resend_violations(sent, changed)
    assert not missing and not wrong, (missing[:5], wrong[:5])

    # Identity keys: the destination's memory is the source's, and the guest runs on.
    assert src.memory_sha256(w / "src.ram") == dst.memory_sha256(w / "dst.ram")
    assert PagencApi.ranges(dst.pagenc_api.query()) == PagencApi.ranges(src.pagenc_api.query())
    p = dst.pass_count()
    dst.cmd("cont")
    wait_until(lambda: dst.pass_count() > p + 2, 60, "the payload to run on the destination")

    # After SEND_FINISH the source guest must never run again: the firmware says so.
    try:
        src.cmd("cont")
    except Exception:   # noqa: BLE001 - QEMU may exit before it answers
        pass
    assert src.wait_exit(30) != 0
    assert "the guest must not run: the simulated SEV firmware's guest state is 6" in \
        src.stderr_text()


# --------------------------------------------------------------------------------------------
# Migration to a file: no return path; the stream is complete once written.

def test_identity_migration_to_file(vms):
    w = vms.workdir
    src = boot(vms, extra_args=source_args(return_path=False))
    info = migrate_fast(src, f"file:{w}/vm.mig")
    assert info["status"] == "completed", info
    dst = vms("dst", pagenc=False, mem_mb=128, incoming="defer", paused=True,
              extra_args=dest_args(return_path=False))
    dst.cmd("migrate-incoming", uri=f"file:{w}/vm.mig")
    wait_until(lambda: dst.cmd("query-migrate").get("status") == "completed", 60,
               "the destination to load the file")
    assert_sent_through_firmware(src, dst)
    assert src.memory_sha256(w / "src.ram") == dst.memory_sha256(w / "dst.ram")
    p = dst.pass_count()
    dst.cmd("cont")
    wait_until(lambda: dst.pass_count() > p + 2, 60, "the payload to run on the destination")


# --------------------------------------------------------------------------------------------
# Failure paths: the source guest runs on (SEND_CANCEL).

def test_cancel_midway_source_runs_on_and_migrates_again(vms):
    w = vms.workdir
    src = boot(vms, extra_args=source_args())
    dst = vms("dst", pagenc=False, mem_mb=128, incoming=f"unix:{w}/m.sock",
              extra_args=dest_args())
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 2 * MiB})
    src.cmd("migrate", uri=f"unix:{w}/m.sock")
    wait_until(lambda: transport(src)["pages-sent"] > 100, 60,
               "encrypted pages to go through the transport")
    src.cmd("migrate_cancel")
    assert wait_migration(src)["status"] == "cancelled"
    st = transport(src)
    assert (st["send-start"], st["send-cancel"], st["send-finish"]) == (1, 1, 0)
    assert st["guest-state"] == RUNNING and st["guest-may-run"] is True
    src.wait_status("running")
    p = src.pass_count()
    wait_until(lambda: src.pass_count() > p + 2, 60, "the payload to run on at the source")
    dst.kill()

    # A new session: the guest migrates after all.
    dst2 = vms("dst2", pagenc=False, mem_mb=128, incoming=f"unix:{w}/m2.sock",
               extra_args=dest_args())
    assert migrate_fast(src, f"unix:{w}/m2.sock")["status"] == "completed"
    st = transport(src)
    assert (st["send-start"], st["send-cancel"], st["send-finish"]) == (2, 1, 1)
    dst2.wait_status("running")
    assert transport(dst2)["receive-finish"] == 1


def test_damaged_packet_fails_destination_source_resumes(vms):
    w = vms.workdir
    # The 50th packet of the migration has a flipped ciphertext byte.
    src = boot(vms, extra_args=source_args("x-sev-sim-corrupt-packet=50"))
    dst = vms("dst", pagenc=False, mem_mb=128, incoming="defer", extra_args=dest_args())
    dst.cmd("migrate-incoming", uri=f"unix:{w}/m.sock", **{"exit-on-error": False})
    info = migrate_fast(src, f"unix:{w}/m.sock")
    assert info["status"] == "failed", info
    wait_until(lambda: dst.cmd("query-migrate").get("status") == "failed", 60,
               "the destination to fail")
    said = dst.stderr_text()
    assert "RECEIVE_UPDATE_DATA" in said and "BAD_MEASUREMENT" in said, said
    dt = transport(dst)
    assert dt["failures"] == 1 and dt["receive-finish"] == 0 and dt["guest-may-run"] is False
    assert dt["receive-update-data"] == 49
    st = transport(src)
    assert (st["send-cancel"], st["send-finish"]) == (1, 0) and st["guest-state"] == RUNNING
    src.wait_status("running")
    p = src.pass_count()
    wait_until(lambda: src.pass_count() > p + 2, 60, "the payload to run on at the source")


# --------------------------------------------------------------------------------------------
# Refused configurations, each with its message.

@pytest.fixture(scope="module")
def refusals(request):
    import shutil
    import tempfile
    from pathlib import Path
    work = Path(tempfile.mkdtemp(prefix="pe2e-tx-", dir="/tmp"))
    vm = Vm("src", work, pagenc=False, mem_mb=128, extra_args=source_args())
    vm.launch()
    try:
        vm.wait_guest_running(1)
        scenario.set_ready(vm, 1)
        yield vm
    finally:
        vm.kill()
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.parametrize("cap,other", [
    ("postcopy-ram", "postcopy-ram"), ("mapped-ram", "mapped-ram"),
    ("background-snapshot", "background-snapshot"), ("xbzrle", "xbzrle"),
])
def test_incompatible_capability_refused(refusals, cap, other):
    # background-snapshot also refuses the return path: drop it so ours is the refusal
    rp = cap == "background-snapshot"
    if rp:
        refusals.cmd("migrate-set-capabilities",
                     capabilities=[{"capability": "return-path", "state": False}])
    try:
        with pytest.raises(QmpError) as e:
            refusals.cmd("migrate-set-capabilities",
                         capabilities=[{"capability": cap, "state": True}])
    finally:
        if rp:
            refusals.cmd("migrate-set-capabilities",
                         capabilities=[{"capability": "return-path", "state": True}])
    assert f"x-encrypted-pages is incompatible with {other}" in e.value.desc, e.value.desc


def test_return_path_required(refusals):
    import socket
    path = refusals.dir / "sink.sock"
    path.unlink(missing_ok=True)
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sink.bind(str(path))
    sink.listen(1)      # the connection succeeds, so the setup runs
    try:
        refusals.cmd("migrate-set-capabilities",
                     capabilities=[{"capability": "return-path", "state": False}])
        refusals.cmd("migrate", uri=f"unix:{path}")
        info = wait_migration(refusals)
    finally:
        refusals.cmd("migrate-set-capabilities",
                     capabilities=[{"capability": "return-path", "state": True}])
        sink.close()
    assert info["status"] == "failed"
    assert "x-encrypted-pages needs the return-path capability" in info["error-desc"], info
    refusals.wait_status("running")
    assert transport(refusals)["send-start"] == 0


def test_snapshot_refused(refusals):
    said = refusals.hmp("savevm t0")
    assert "Snapshots are not compatible with x-encrypted-pages" in said, said


@pytest.mark.parametrize("props,message", [
    (["x-sev-sim-policy=8"], "NOSEND"),
    (["x-sev-sim-policy=4"], "SEV-ES"),
    (["x-sev-sim-mode=sev-es"], "SEV-ES"),
    (["x-sev-sim-mode=sev-snp"], "SNP"),
])
def test_refused_guest_policy(vms, props, message):
    w = vms.workdir
    src = boot_ready(vms, extra_args=source_args(*props))
    dst = vms("dst", pagenc=False, mem_mb=128, incoming=f"unix:{w}/m.sock",
              extra_args=dest_args(*props))
    info = migrate_fast(src, f"unix:{w}/m.sock")
    assert info["status"] == "failed", info
    assert "SEND_START" in info["error-desc"] and message in info["error-desc"], info
    st = transport(src)
    assert st["send-start"] == 0 and st["guest-state"] == RUNNING
    src.wait_status("running")


def test_destination_without_the_capability_refuses(vms):
    w = vms.workdir
    src = boot_ready(vms, extra_args=source_args())
    dst = vms("dst", pagenc=False, mem_mb=128, incoming="defer",
              extra_args=pagenc_object(f"x-sev-sim-platform-id={P_DST}") +
              caps("x-return-path"))
    dst.cmd("migrate-incoming", uri=f"unix:{w}/m.sock", **{"exit-on-error": False})
    info = migrate_fast(src, f"unix:{w}/m.sock")
    assert info["status"] == "failed", info
    wait_until(lambda: dst.cmd("query-migrate").get("status") == "failed", 60,
               "the destination to fail")
    assert "the x-encrypted-pages capability is not set here" in dst.stderr_text()
    assert transport(src)["send-cancel"] == 1
    src.wait_status("running")


def test_simulated_firmware_properties_need_the_opt_in(vms):
    vm = Vm("bad", vms.workdir, pagenc=False, mem_mb=128,
            extra_args=["-object", "pagenc,id=pe0,x-testing=on,x-sev-sim-policy=1"])
    with pytest.raises(HarnessError):
        vm.launch()
    vm.kill()
    assert "the x-sev-sim-* properties need x-sev-simulated-firmware=on" in vm.stderr_text()


def qtest(path, lines):
    """Send qtest protocol lines, each must answer OK."""
    import socket
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    wait_until(lambda: s.connect_ex(str(path)) == 0, 20, f"qtest socket {path}")
    s.settimeout(30)
    f = s.makefile("rw")
    for line in lines:
        f.write(line + "\n")
        f.flush()
        while not (reply := f.readline()).startswith(("OK", "FAIL")):
            assert reply, f"qtest closed during {line!r}"
        assert reply.startswith("OK"), f"qtest {line!r}: {reply}"
    s.close()


# --------------------------------------------------------------------------------------------
# q35 with TSEG enabled (TCG + qtest programs ESMRAMC, as OVMF with SMM does).

def test_tseg_enabled_identity_migration(vms):
    w = vms.workdir
    qt = w / "qtest.sock"
    src = vms("src", pagenc=False, accel="tcg", paused=True, mem_mb=256,
              extra_args=source_args(extra=["-qtest", f"unix:{qt},server=on,wait=off"]))
    qtest(qt, ["outl 0xcf8 0x8000009c", "outb 0xcfd 0x0a", "outb 0xcfe 0x01"])
    assert "tseg-blackhole" in src.hmp("info mtree -f")
    made: list = []
    before, after = seq.boot_sequence(256 * MiB)
    scenario.issue(src.pagenc_api, before, made)
    src.pagenc_api.map_gpa_range(255 * MiB + 16 * PAGE, 4, 0)   # under TSEG, shared
    src.pagenc_api.set_migration_control(1)
    dst = vms("dst", pagenc=False, accel="tcg", incoming=f"unix:{w}/m.sock", paused=True,
              mem_mb=256, extra_args=dest_args())
    assert migrate_fast(src, f"unix:{w}/m.sock")["status"] == "completed"
    dst.wait_status(("paused", "prelaunch"))    # the source never ran (-S)
    assert_sent_through_firmware(src, dst)
    assert src.memory_sha256(w / "src.ram") == dst.memory_sha256(w / "dst.ram")


# --------------------------------------------------------------------------------------------
# The count check checks the transport, not the classifier.

def test_count_check_catches_pages_not_sent_through_the_firmware(vms):
    """Negative control of assert_sent_through_firmware: the same pair without the
    x-encrypted-pages capability sends every page plainly. The classifier still counts
    encrypted pages; the firmware saw none, and the check must say so."""
    w = vms.workdir
    src = boot(vms, extra_args=[*pagenc_object(f"x-sev-sim-platform-id={P_SRC}",
                                               f"x-sev-sim-peer-platform-id={P_DST}"),
                                *caps("x-return-path")])
    dst = vms("dst", pagenc=False, mem_mb=128, incoming=f"unix:{w}/m.sock", paused=True,
              extra_args=[*pagenc_object(f"x-sev-sim-platform-id={P_DST}"),
                          *caps("x-return-path")])
    assert migrate_fast(src, f"unix:{w}/m.sock")["status"] == "completed"
    dst.wait_status("paused")
    assert src.pagenc_api.query()["pages-sent-encrypted"] > 0
    assert transport(src)["send-update-data"] == 0
    with pytest.raises(AssertionError):
        assert_sent_through_firmware(src, dst)


def test_misclassified_page_is_sent_plainly_and_counted_as_shared(vms):
    """x-misclassify-gpa flips pagenc's answer for one encrypted guest page: the RAM loop
    sends it plainly, on every pass, and counts it as shared. The transport gets exactly
    what the classifier said, so the firmware's counts still agree: they check the
    transport. What catches a wrong answer is the memory in keyed mode
    (test_transport_proof.py, the same hook)."""
    w = vms.workdir
    trace = w / "src-trace.log"
    src = boot(vms, extra_args=source_args(extra=["-D", str(trace),
                                                   "-trace", "pagenc_ram_page"]))
    shared = PagencApi.ranges(src.pagenc_api.query())
    gpa = 16 * MiB                          # the payload dirties it on every pass
    assert not any(s <= gpa < e for s, e in shared), "the control page must be encrypted"
    src.cmd("qom-set", path="/objects/pe0", property="x-misclassify-gpa", value=gpa)
    dst = vms("dst", pagenc=False, mem_mb=128, incoming=f"unix:{w}/m.sock", paused=True,
              extra_args=dest_args())
    assert migrate_fast(src, f"unix:{w}/m.sock")["status"] == "completed"
    dst.wait_status("paused")
    assert_sent_through_firmware(src, dst)
    sent = {}
    for m in re.finditer(r"pagenc_ram_page block=pc\.ram offset=0x[0-9a-f]+ "
                         r"gpa=0x([0-9a-f]+) page=(\d)", trace.read_text(errors="replace")):
        sent.setdefault(int(m.group(1), 16), set()).add(int(m.group(2)))
    assert sent.get(gpa) == {1}, sent.get(gpa)              # QEMU_PAGENC_PAGE_SHARED
    assert sent.get(gpa + PAGE) == {0}, sent.get(gpa + PAGE)  # its neighbour: ENCRYPTED
