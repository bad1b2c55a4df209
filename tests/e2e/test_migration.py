"""End-to-end: a guest with a pagenc list live-migrates between two real QEMUs.

Every test boots the project's payload (guest/) in the patched QEMU with
-object pagenc, gives it the hypercall sequence of a booting Linux SEV guest
(tests/e2e/sev_sequence.py) and checks what arrives on the other side.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

import pytest

import scenario
from scenario import read_trace, resend_violations
import sev_sequence as seq
from pagenc_vm import MiB, PAGE, PagencApi, QmpError, Vm, wait_until

MIGRATION_TIMEOUT = 120


def ranges(vm: Vm):
    return PagencApi.ranges(vm.pagenc_api.query())


def boot_source(make, name="src", **kw):
    vm = make(name, **kw)
    vm.wait_guest_running(2)
    made: list = []
    scenario.boot_list(vm, made)
    return vm, made


def wait_incoming_failed(vm: Vm, timeout=60) -> str:
    """The destination's migration failed; returns everything it said about why."""
    def failed():
        if not vm.alive():
            return "exited"
        return vm.cmd("query-migrate").get("status") == "failed" and "failed"
    how = wait_until(failed, timeout, f"{vm.name}: incoming migration to fail")
    desc = "" if how == "exited" else vm.cmd("query-migrate").get("error-desc", "")
    return desc + "\n" + vm.stderr_text()


def plain_migrate(src: Vm, uri: str):
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 8 << 30})
    src.cmd("migrate", uri=uri)
    return wait_until(lambda: (s := src.cmd("query-migrate"))["status"] in
                      ("completed", "failed", "cancelled") and s,
                      MIGRATION_TIMEOUT, f"{src.name}: migration to {uri} to end")


# --------------------------------------------------------------------------------------------
# (a) + (b): one live migration with hundreds of conversions, checked three ways.

@pytest.fixture(scope="module")
def live(request):
    work = Path(tempfile.mkdtemp(prefix="pe2e-live-", dir="/tmp"))
    started: list[Vm] = []

    def make(name, **kw):
        vm = Vm(name, work, **kw)
        started.append(vm)
        return vm.launch()

    try:
        # The source logs, in order, every page the RAM loop sends and every change of the
        # list (QEMU's log trace backend): the resend check below reads it.
        trace = work / "src-trace.log"
        # Default devices (VGA, e1000e, ...): the guest RAM layout must not depend on the
        # device state the destination loads after pagenc's section (review finding 1).
        src, made = boot_source(make, extra_args=["-D", str(trace), *scenario.TRACE_ARGS],
                                nodefaults=False)
        dst = make("dst", incoming=f"unix:{work}/mig.sock", paused=True, nodefaults=False)
        before = src.pagenc_api.query()
        lm = scenario.LiveMigration(src, f"unix:{work}/mig.sock", min_conversions=300,
                                    timeout=MIGRATION_TIMEOUT)
        lm.run()
        dst.wait_status("paused")
        yield {"src": src, "dst": dst, "made": made + lm.made, "lm": lm, "work": work,
               "before": before, "trace": trace}
    finally:
        for vm in started:
            vm.kill()
        shutil.rmtree(work, ignore_errors=True)


def test_list_on_destination_equals_source_after_conversions_during_migration(live):
    src, dst, lm = live["src"], live["dst"], live["lm"]
    assert len(lm.during) >= 300, "the migration must have seen hundreds of conversions"
    sr, dr = ranges(src), ranges(dst)
    assert sr == seq.expected_shared(live["made"]), "source list differs from the calls made"
    assert dr == sr
    si, di = src.pagenc_api.query(), dst.pagenc_api.query()
    assert PagencApi.shared_bytes(di) == PagencApi.shared_bytes(si) > 0
    assert PagencApi.ready(di) and PagencApi.ready(si)


def test_pages_converted_during_migration_were_sent_again(live):
    """Every page whose state flipped during the migration went out again after its last
    flip, classified with its final state.

    From the source's trace, in log order: pagenc_ram_page (the RAM loop classifies a page
    it sends) and pagenc_pages_changed (the change callback, which marks the range dirty).
    A flip counts as "during the migration" when it comes after the first page was sent.
    Negative control, done once by hand: with the memory_region_set_dirty() call of
    pagenc's change callback removed from QEMU, this test failed with "412 of 851 pages
    flipped during the migration were not sent after their flip" (the list test still
    passed: the list travels in its own section).
    """
    src, lm = live["src"], live["lm"]
    sent, changed, sent_count = read_trace(live["trace"])
    assert sent_count > 0, "the trace has no pagenc_ram_page events"
    info = src.pagenc_api.query()
    assert info["pages-sent-encrypted"] + info["pages-sent-shared"] == sent_count
    assert info["pages-sent-shared"] > 0 and info["pages-sent-encrypted"] > 0
    assert len(changed) >= 100, f"only {len(changed)} pages flipped during the migration"
    missing, wrong = resend_violations(sent, changed)
    assert not missing, (f"{len(missing)} of {len(changed)} pages flipped during the migration "
                         f"were not sent after their flip, e.g. gpa "
                         f"{[hex(p * PAGE) for p in missing[:5]]}")
    assert not wrong, (f"{len(wrong)} pages were last sent with the wrong classification, e.g. "
                       f"{[hex(p * PAGE) for p in wrong[:5]]}")
    assert len(lm.during) >= 300


def test_resend_check_catches_a_page_not_sent_again(tmp_path):
    """Negative control for the check above, on a hand-written trace: it must fail when a
    flipped page is not sent after the flip, or is sent with its old state."""
    log = tmp_path / "trace.log"
    log.write_text(
        "1@1.0:pagenc_ram_page block=pc.ram offset=0x1000 gpa=0x1000 page=0\n"
        "1@1.0:pagenc_ram_page block=pc.ram offset=0x2000 gpa=0x2000 page=0\n"
        "1@1.0:pagenc_ram_page block=pc.ram offset=0x3000 gpa=0x3000 page=0\n"
        "1@1.1:pagenc_pages_changed id=pe0 gpa=0x1000 npages=0x3 encrypted=0\n"
        "1@1.2:pagenc_ram_page block=pc.ram offset=0x1000 gpa=0x1000 page=1\n"
        "1@1.2:pagenc_ram_page block=pc.ram offset=0x2000 gpa=0x2000 page=0\n")
    sent, changed, n = read_trace(log)
    assert n == 5 and sorted(changed) == [1, 2, 3]
    missing, wrong = resend_violations(sent, changed)
    assert missing == [3]      # never sent after the flip
    assert wrong == [2]        # sent after it, but still as encrypted


def test_guest_memory_on_destination_equals_source(live):
    src, dst, work = live["src"], live["dst"], live["work"]
    assert src.status() == "postmigrate"
    assert dst.status() == "paused"
    hs = src.memory_sha256(work / "src.ram")
    hd = dst.memory_sha256(work / "dst.ram")
    assert hs == hd
    # The destination really runs the guest afterwards.
    p = dst.pass_count()
    dst.cmd("cont")
    wait_until(lambda: dst.pass_count() > p + 2, 60, "the payload to run on the destination")


# --------------------------------------------------------------------------------------------
# (c) ping-pong

def test_ping_pong_keeps_the_list_exact(vms):
    w = vms.workdir
    a, made = boot_source(vms, "a")
    b = vms("b", incoming=f"unix:{w}/ab.sock")
    lm1 = scenario.LiveMigration(a, f"unix:{w}/ab.sock", min_conversions=100, seed=11,
                                 timeout=MIGRATION_TIMEOUT)
    lm1.run()
    made += lm1.made
    b.wait_status("running")
    assert ranges(b) == ranges(a) == seq.expected_shared(made)

    a2 = vms("a2", incoming=f"unix:{w}/ba.sock")
    lm2 = scenario.LiveMigration(b, f"unix:{w}/ba.sock", min_conversions=100, seed=12,
                                 churn_base=0x0C000000, timeout=MIGRATION_TIMEOUT)
    lm2.run()
    made += lm2.made
    a2.wait_status("running")
    assert ranges(a2) == ranges(b) == seq.expected_shared(made)
    assert PagencApi.ready(a2.pagenc_api.query())
    a2.wait_guest_running(a2.pass_count() + 2, boots=0)  # booted on a, not here


# --------------------------------------------------------------------------------------------
# (d) the READY blocker

def test_migration_blocked_before_ready_allowed_after_blocked_after_zero(vms):
    w = vms.workdir
    src = vms("src")
    src.wait_guest_running(2)
    made: list = []
    before, _ = seq.boot_sequence(src.mem_mb * MiB)
    scenario.issue(src.pagenc_api, before, made)
    with pytest.raises(QmpError) as e:
        src.cmd("migrate", uri=f"unix:{w}/never.sock")
    assert "pagenc" in e.value.desc.lower(), e.value.desc
    assert src.status() == "running"

    how = scenario.set_ready(src, 1)
    dst = vms("dst", incoming=f"unix:{w}/m.sock")
    info = plain_migrate(src, f"unix:{w}/m.sock")
    assert info["status"] == "completed", info
    dst.wait_status("running")
    assert PagencApi.ready(dst.pagenc_api.query())

    # The guest (now on dst) takes READY back: blocked again, same way it was set.
    scenario.set_ready(dst, 0, via_guest=(how == "guest WRMSR"))
    with pytest.raises(QmpError) as e:
        dst.cmd("migrate", uri=f"unix:{w}/never2.sock")
    assert "pagenc" in e.value.desc.lower(), e.value.desc


# --------------------------------------------------------------------------------------------
# (e) a damaged pagenc section fails the incoming side; the source migrates again

SECTION_NAME = b"pagenc"
MAGIC = b"PGEL"


def find_section(data: bytes) -> int:
    """Offset of the pagenc list's magic in a migration stream.

    The list is device state (qemu-patches: backends/pagenc, a VMStateDescription):
    QEMU_VM_SECTION_FULL (0x04) + be32 id + name "pagenc" + be32 instance + be32
    version, then its fields: be32 length + the list.
    """
    name = bytes([len(SECTION_NAME)]) + SECTION_NAME
    at = data.find(name + b"\x00\x00\x00\x00\x00\x00\x00\x01")
    assert at >= 5 and data[at - 5] == 0x04, "no device section 'pagenc' in the stream"
    pos = at + len(name) + 8 + 4
    assert data[pos:pos + 4] == MAGIC, "no pagenc list (magic) after the section header"
    return pos


def damage(data: bytes, how: str) -> bytes:
    m = find_section(data)
    buf = bytearray(data)
    if how == "corrupt":
        buf[m + 4:m + 6] = b"\x7f\xfe"              # version 32766: unknown
    elif how == "overlong-count":
        # record_count claims one more record than there is: the CRC32C trailer no longer
        # matches (pagenc stream version 2), so the blob is refused as damaged.
        count = int.from_bytes(buf[m + 48:m + 56], "big")
        buf[m + 48:m + 56] = (count + 1).to_bytes(8, "big")
    elif how == "truncate":
        # Cut the file inside the pagenc blob.
        del buf[m + 40:]
    else:
        raise AssertionError(how)
    return bytes(buf)


# What pagenc's load must say for each damage (QEMU's stderr / error-desc).
DAMAGE_MESSAGE = {
    "corrupt": "stream version 32766 is newer than this build",
    "overlong-count": "stream is damaged",
    # A stream cut inside the list: QEMU's vmstate layer reads the buffer and names the device.
    "truncate": "of device 'pagenc': Failed to load pagenc state",
}


@pytest.mark.parametrize("how", sorted(DAMAGE_MESSAGE))
def test_damaged_section_fails_incoming_and_source_can_migrate_again(vms, how):
    w = vms.workdir
    src, made = boot_source(vms, "src")
    expected = ranges(src)
    stream = w / "stream.bin"
    info = plain_migrate(src, f"file:{stream}")
    assert info["status"] == "completed", info
    bad = w / "damaged.bin"
    bad.write_bytes(damage(stream.read_bytes(), how))

    dst = vms("dst", incoming="defer")
    dst.cmd("migrate-incoming", uri=f"file:{bad}", **{"exit-on-error": False})
    said = wait_incoming_failed(dst)
    if how != "truncate":
        assert "pagenc 'pe0': incoming migration" in said, said
    assert DAMAGE_MESSAGE[how] in said, said
    if dst.alive():
        assert ranges(dst) == [], "a failed load must not leave a partial list"

    # The source never stopped being usable: resume it and migrate for real.
    src.cmd("cont")
    src.wait_status("running")
    dst2 = vms("dst2", incoming=f"unix:{w}/m2.sock")
    info = plain_migrate(src, f"unix:{w}/m2.sock")
    assert info["status"] == "completed", info
    dst2.wait_status("running")
    assert ranges(dst2) == expected


# --------------------------------------------------------------------------------------------
# (f) reset

def test_guest_reset_clears_list_and_readiness(vms):
    w = vms.workdir
    src, made = boot_source(vms, "src")
    assert ranges(src) and PagencApi.ready(src.pagenc_api.query())
    src.cmd("system_reset")
    wait_until(lambda: not PagencApi.ready(src.pagenc_api.query()), 30,
               "readiness to clear after system_reset")
    info = src.pagenc_api.query()
    assert PagencApi.ranges(info) == [] and PagencApi.shared_bytes(info) == 0
    with pytest.raises(QmpError) as e:
        src.cmd("migrate", uri=f"unix:{w}/never.sock")
    assert "pagenc" in e.value.desc.lower()
    # The payload booted again after the reset.
    src.wait_guest_running(2, boots=2)


# --------------------------------------------------------------------------------------------
# (g) a destination without the object

def test_destination_without_pagenc_refuses_a_stream_with_a_list(vms):
    w = vms.workdir
    src, made = boot_source(vms, "src")
    expected = ranges(src)
    dst = vms("dst", pagenc=False, incoming="defer")
    # The list is device state, sent after all of RAM: only the return path tells the
    # source that the destination refused it (without it the source would end
    # "completed", as with any late load failure).
    for vm in (src, dst):
        vm.cmd("migrate-set-capabilities",
               capabilities=[{"capability": "return-path", "state": True}])
    dst.cmd("migrate-incoming", uri=f"unix:{w}/m.sock", **{"exit-on-error": False})
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 8 << 30})
    src.cmd("migrate", uri=f"unix:{w}/m.sock")
    said = wait_incoming_failed(dst)
    assert "Unknown section or instance 'pagenc'" in said, said
    wait_until(lambda: src.cmd("query-migrate")["status"] in ("failed", "cancelled"), 60,
               "the source to see the migration fail")
    # The source keeps running with its list.
    src.wait_status("running")
    assert ranges(src) == expected
