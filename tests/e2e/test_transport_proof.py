"""Issue 14's proof: encrypted pages migrate through the (simulated) SEV firmware, shared
pages the ordinary way, and every page arrives as the final list says.

Keyed mode (a different simulated memory key per side, destination kept paused): the
library's verifier (tests/e2e/keyed.py, pagenc::transport::Verifier) checks every guest-RAM
page: equal to the source where the list says shared, re-keyed where it says encrypted.
Identity mode (both keys zero): the destination guest runs on.

Matrix: precopy over a socket with return path, with conversions during the migration;
multifd with 1 and 4 channels, keyed and identity; a guest reset during the migration; the
deliberately wrong classification (x-misclassify-gpa) must be caught, by the verifier, on
exactly that page.  tests/e2e/test_transport.py covers cancel, a damaged packet,
migration to a file and the refusals.
"""

from __future__ import annotations

import re

import pytest

import keyed
import scenario
from pagenc_vm import MiB, PAGE, PagencApi, Vm, wait_until

TIMEOUT = 60


@pytest.fixture(scope="module", autouse=True)
def verifier():
    return keyed.build_verifier()


def boot_source(vms, key=keyed.K_SRC, extra="", **kw) -> Vm:
    src = vms("src", pagenc=False, extra_args=keyed.source_args(key, extra), **kw)
    src.wait_guest_running(2)
    scenario.boot_list(src, [])
    return src


def start_destination(vms, sock, key=keyed.K_DST, paused=True, channels=0, **kw) -> Vm:
    """The destination, listening on `sock` with the capabilities set (multifd must be set
    before the incoming migration starts: -incoming defer, then migrate-incoming)."""
    dst = vms("dst", pagenc=False, incoming="defer", paused=paused,
              extra_args=keyed.destination_args(key), **kw)
    keyed.set_capabilities(dst, channels)
    dst.cmd("migrate-incoming", uri=f"unix:{sock}")
    return dst


def migrate(src: Vm, dst: Vm, sock, channels: int = 0) -> dict:
    keyed.set_capabilities(src, channels)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 8 << 30})
    src.cmd("migrate", uri=f"unix:{sock}")
    info = wait_until(lambda: (s := src.cmd("query-migrate"))["status"] in
                      ("completed", "failed", "cancelled") and s,
                      TIMEOUT, "the migration to end")
    assert info["status"] == "completed", (info.get("error-desc"), src.stderr_text()[-2000:],
                                           dst.stderr_text()[-2000:])
    return info


def check_keyed(src: Vm, dst: Vm, workdir, expect_encrypted_min: int = 1000):
    """Destination paused; list equal on both sides; every page as the list says; the
    firmware calls add up."""
    dst.wait_status("paused")
    assert PagencApi.ranges(dst.pagenc_api.query()) == PagencApi.ranges(src.pagenc_api.query())
    v = keyed.verify(src, dst, workdir)
    assert v.ok, f"keyed check failed:\n{v}"
    assert v.shared_ok > 0 and v.encrypted_ok >= expect_encrypted_min, str(v)
    st, dt = keyed.transport_info(src), keyed.transport_info(dst)
    assert st["send-start"] == 1 and st["send-finish"] == 1 and st["send-cancel"] == 0, st
    assert dt["receive-start"] == 1 and dt["receive-finish"] == 1, dt
    assert dt["receive-update-data"] == st["send-update-data"] >= v.encrypted_ok, (st, dt, str(v))
    assert st["guest-may-run"] is False and dt["guest-may-run"] is True, (st, dt)
    return v


# --------------------------------------------------------------------------------------------
# Keyed precopy with conversions during the migration

def test_keyed_precopy_with_conversions_every_page_as_the_list_says(vms):
    w = vms.workdir
    src = boot_source(vms)
    dst = start_destination(vms, w / "mig.sock")
    keyed.set_capabilities(src)
    lm = scenario.LiveMigration(src, f"unix:{w}/mig.sock", min_conversions=100,
                                timeout=TIMEOUT)
    lm.run()
    assert len(lm.during) >= 100
    check_keyed(src, dst, w)


def test_wrong_classification_is_caught_on_exactly_that_page(vms):
    """The negative control of the proof: the source sends one page the wrong way
    (x-misclassify-gpa); the keyed check must fail there and nowhere else."""
    w = vms.workdir
    bad = 100 * MiB + 7 * PAGE      # guest RAM the payload does not touch: encrypted
    src = boot_source(vms, extra=f",x-misclassify-gpa={bad}")
    dst = start_destination(vms, w / "mig.sock")
    migrate(src, dst, w / "mig.sock")
    dst.wait_status("paused")
    v = keyed.verify(src, dst, w)
    assert not v.ok and v.mismatches == 1 and v.bad_gpas == [bad], str(v)
    assert "sent the ordinary way" in v.out, str(v)


# --------------------------------------------------------------------------------------------
# Multifd: encrypted pages in packets of their own, on the channel threads

@pytest.mark.parametrize("channels", [1, 4])
def test_keyed_multifd(vms, channels):
    """Negative control, done once by hand: with multifd_queue_encrypted_page() queueing
    encrypted pages as plain ones (patch 15 broken on purpose), the [4] case failed with
    "pages 65440 shared-ok 9010 encrypted-ok 0 mismatches 56430"."""
    w = vms.workdir
    log = w / "src-trace.log"
    src = vms("src", pagenc=False,
              extra_args=[*keyed.source_args(), "-D", str(log),
                          "-trace", "multifd_send_encrypted", "-trace", "cgs_*"])
    src.wait_guest_running(2)
    scenario.boot_list(src, [])
    dst = start_destination(vms, w / "mig.sock", channels=channels)
    migrate(src, dst, w / "mig.sock", channels)
    v = check_keyed(src, dst, w)
    # The encrypted pages went in multifd packets flagged encrypted, not on the main channel.
    text = log.read_text(errors="replace")
    sent = [int(n) for n in re.findall(
        r"multifd_send_encrypted channel \d+ encrypted pages (\d+)", text)]
    assert sum(sent) == keyed.transport_info(src)["send-update-data"] >= v.encrypted_ok


@pytest.mark.parametrize("channels,compression", [(1, "none"), (4, "none"), (4, "zlib")])
def test_identity_multifd_guest_runs_on(vms, channels, compression):
    """zlib: the compressor takes the plain packets, never the encrypted ones."""
    w = vms.workdir
    src = boot_source(vms, key=keyed.K_IDENTITY)
    dst = vms("dst", pagenc=False, incoming="defer",
              extra_args=keyed.destination_args(keyed.K_IDENTITY))
    for vm in (src, dst):
        keyed.set_capabilities(vm, channels)
        vm.cmd("migrate-set-parameters", **{"multifd-compression": compression})
    dst.cmd("migrate-incoming", uri=f"unix:{w}/mig.sock")
    migrate(src, dst, w / "mig.sock", channels)
    dst.wait_status("running")
    p = dst.pass_count()
    wait_until(lambda: dst.pass_count() > p + 2, 60, "the payload to run on the destination")
    t = keyed.transport_info(dst)
    assert t["receive-update-data"] > 1000 and t["guest-may-run"] is True, t


# --------------------------------------------------------------------------------------------
# A guest reset during the migration: the list is cleared (every page encrypted again) and
# rebuilt while pages are in flight

def test_keyed_guest_reset_during_migration(vms):
    w = vms.workdir
    src = boot_source(vms)
    dst = start_destination(vms, w / "mig.sock")
    keyed.set_capabilities(src)
    # Slow enough that the reset and the new boot list happen while pages are in flight.
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 32 * MiB})
    src.cmd("migrate", uri=f"unix:{w}/mig.sock")
    wait_until(lambda: src.cmd("query-migrate").get("ram", {}).get("transferred", 0) > 8 * MiB,
               30, "the migration to be under way")
    src.cmd("system_reset")
    src.wait_guest_running(2, boots=2)
    scenario.boot_list(src, [])
    assert src.cmd("query-migrate")["status"] == "active", "the reset must land mid-migration"
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 8 << 30})
    info = wait_until(lambda: (s := src.cmd("query-migrate"))["status"] in
                      ("completed", "failed", "cancelled") and s, TIMEOUT, "the migration to end")
    assert info["status"] == "completed", (info.get("error-desc"), src.stderr_text()[-2000:])
    check_keyed(src, dst, w)
