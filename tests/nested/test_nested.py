"""Host-side assertions on what the nested rig's L1 reported (docs/nested.md).

`make check-nested` boots L1 (scripts/nested-rig.sh check), where Debian's own kvm-amd runs the
guest payload in hypercall mode under the patched QEMU; L1 writes its results to ttyS1, which
lands in build/nested/out/results-<kernel>.txt as "=== BEGIN name" ... "=== END name" sections.
This file checks them: the guest's own VMMCALLs reached pagenc through KVM, the guest found the
values it expected in RAX, the list equals the guest's own model of it, the live migration kept
lists and memory equal and sent again the pages converted during it, a reset cleared list and
readiness, the library's kvm_guest tests saw real hypercall exits in both kernel layouts, and the
negative control was reported.

The analysis helpers are tested on hand-made input first (they must catch what they look for).
Without rig results (build/nested/out/status missing, or "cannot-run: ...") the rig tests skip,
unless PAGENC_REQUIRE_NESTED=1 (CI), where they fail.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(os.environ.get("PAGENC_NESTED_OUT", ROOT / "build/nested/out"))
PAGE = 4096
# What the payload's boot sequence does (guest/hypercall.S): calls KVM answers itself, before
# any exit (32-bit unknown nr, misaligned gpa, npages 0, gfn + npages wrapping 64 bits, 64-bit
# unknown nr) ...
KVM_ANSWERED = 5
# ... and pagenc's rejections: out-of-range (beyond 52 bits, crossing 52 bits, gpa at the top of
# 64 bits), reserved attrs (32-bit bit 5, bit 5, bit 63; plus one per 256 churn conversions),
# bad page-size hint, the reserved MSR bit; 4 pages above RAM clipped.
BOOT_REJECTED = {"out-of-range": 3, "reserved-attrs": 3, "bad-page-size": 1,
                 "reserved-msr-bits": 1, "unaligned": 0, "zero-length": 0,
                 "unknown-hypercall": 0}
CHURN_BASE, CHURN_PAGES = 0x06000000, 2048


# ------------------------------------------------------------------------------ parsing helpers
def sections(text: str) -> dict[str, str]:
    """The "=== BEGIN name" ... "=== END name" sections of a results file."""
    out: dict[str, str] = {}
    name, lines = None, []
    for line in text.replace("\r", "").splitlines():
        m = re.match(r"^=== (BEGIN|END) (\S+)$", line)
        if m and m.group(1) == "BEGIN":
            name, lines = m.group(2), []
        elif m and name == m.group(2):
            out[name] = "\n".join(lines)
            name = None
        elif name is not None:
            lines.append(line)
    return out


def info_ranges(info: str) -> list[tuple[int, int]]:
    """Shared ranges [start, end) from `info pagenc`."""
    return [(int(a, 16), int(b, 16) + 1)
            for a, b in re.findall(r"^\s+0x([0-9a-f]+)-0x([0-9a-f]+) \(", info, re.M)]


def info_values(info: str) -> dict[str, int]:
    """The counters of `info pagenc` (hypercalls, clipped pages, rejected: ...)."""
    v: dict[str, int] = {}
    for key, val in re.findall(r"([a-z][a-z -]*?):? (\d+)(?=[ ,\n]|$)", info):
        v[key.strip().split(", ")[-1]] = int(val)
    m = re.search(r"^rejected: (.*)$", info, re.M)
    if m:
        for key, val in re.findall(r"([a-z-]+) (\d+)", m.group(1)):
            v[key] = int(val)
    m = re.search(r"MSR_KVM_MIGRATION_CONTROL 0x([0-9a-f]+)", info)
    if m:
        v["msr"] = int(m.group(1), 16)
    v["ready"] = int("guest ready" in info)
    return v


def model_ranges(hexdump: str) -> list[tuple[int, int]]:
    """The guest's own model (1 bit per page, set = shared) as shared ranges [start, end)."""
    bits = bytes.fromhex("".join(hexdump.split()))
    out: list[tuple[int, int]] = []
    for i in range(len(bits) * 8):
        if bits[i // 8] >> (i % 8) & 1:
            if out and out[-1][1] == i * PAGE:
                out[-1] = (out[-1][0], (i + 1) * PAGE)
            else:
                out.append((i * PAGE, (i + 1) * PAGE))
    return out


def tally(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", text)}


def to_ranges(pages: set[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for p in sorted(pages):
        if out and out[-1][1] == p * PAGE:
            out[-1] = (out[-1][0], (p + 1) * PAGE)
        else:
            out.append((p * PAGE, (p + 1) * PAGE))
    return out


def lists_the_model_allows(model_hex: str, t: dict[str, int]) -> list[list[tuple[int, int]]]:
    """The lists pagenc may hold for a stopped guest whose model is `model_hex` and tally `t`:
    the model itself, and, when a call was in flight (QEMU may stop the guest after handling
    the exit but before the guest has seen RAX and updated its model), the model with that
    call applied."""
    model = model_ranges(model_hex)
    allowed = [model]
    if t.get("inflight"):
        pages = {a // PAGE + i for a, b in model for i in range((b - a) // PAGE)}
        call = range(t["if_gpa"] // PAGE, t["if_gpa"] // PAGE + t["if_npages"])
        if t["if_attrs"] & 0x10:
            pages.difference_update(call)
        else:
            pages.update(call)
        allowed.append(to_ranges(pages))
    return allowed


def assert_list_is_the_guests_model(info: str, model_hex: str, tally_text: str):
    have = info_ranges(info)
    allowed = lists_the_model_allows(model_hex, tally(tally_text))
    if have not in allowed:
        have_s, model_s = set(have), set(allowed[0])
        pytest.fail(f"pagenc's list differs from the guest's own model (tally {tally_text}): "
                    f"only in the list {[(hex(a), hex(b)) for a, b in sorted(have_s - model_s)]}, "
                    f"only in the model {[(hex(a), hex(b)) for a, b in sorted(model_s - have_s)]}",
                    pytrace=False)


def resend_check(trace: str) -> tuple[int, list[int], list[int], int]:
    """The source's compacted trace (first line: total pages sent; then "S gpa enc" for a page
    sent and "C gpa npages enc" for a list change, in log order). A change counts as during the
    migration when it comes after the first page sent. Returns (pages sent in total, pages
    changed during the migration and never sent after their last change, pages last sent with
    a state other than their final one, pages sent before a change and again after it)."""
    lines = trace.split("\n")
    total = int(lines[0])
    started = False
    final: dict[int, int] = {}       # page -> state after its last change (1 = encrypted)
    pending: dict[int, bool] = {}    # changed during migration, not sent since; value: was sent before
    sent_before: set[int] = set()
    last_sent: dict[int, int] = {}
    again: set[int] = set()
    for line in lines[1:]:
        f = line.split()
        if not f:
            continue
        if f[0] == "S":
            started = True
            page, enc = int(f[1], 16) // PAGE, int(f[2])
            last_sent[page] = enc
            if page in pending:
                if pending.pop(page):
                    again.add(page)
            sent_before.add(page)
        elif f[0] == "C":
            first, n, enc = int(f[1], 16) // PAGE, int(f[2], 16), int(f[3])
            for page in range(first, first + n):
                final[page] = enc
                if started:
                    pending[page] = pending.get(page, False) or page in sent_before
    changed_during = [p for p in final if p in pending or p in again]
    missing = sorted(pending)
    wrong = sorted(p for p in changed_during if p not in pending and last_sent.get(p) != final[p])
    return total, missing, wrong, len(again)


# --------------------------------------------------------------- the helpers catch what they must
def test_sections_and_ranges_parse():
    text = ("junk\n=== BEGIN a-info\npagenc pe0: guest ready (MSR_KVM_MIGRATION_CONTROL 0x1, "
            "1 writes), migration not blocked\nhypercalls: 12, pages flipped: 3, clipped pages: 4"
            "\nrejected: unknown-hypercall 0 unaligned 0 zero-length 0 out-of-range 3 "
            "reserved-attrs 4 bad-page-size 1 reserved-msr-bits 1\nshared ranges:\n"
            "  0x0000000000002000-0x0000000000003fff (2 pages)\n=== END a-info\n"
            "=== BEGIN a-model\n0c" + "00" * 63 + "\n=== END a-model\n")
    s = sections(text)
    assert info_ranges(s["a-info"]) == [(0x2000, 0x4000)]
    v = info_values(s["a-info"])
    assert (v["hypercalls"], v["clipped pages"], v["out-of-range"], v["reserved-attrs"],
            v["msr"], v["ready"]) == (12, 4, 3, 4, 1, 1)
    assert model_ranges(s["a-model"]) == [(0x2000, 0x4000)]
    # negative control: one bit off is a different list
    assert model_ranges("1c" + "00" * 63) != info_ranges(s["a-info"])
    # an in-flight call: the list may be one call ahead of the model, and no more
    t = "inflight=1 if_gpa=12288 if_npages=1 if_attrs=0"
    assert_list_is_the_guests_model(s["a-info"], "04" + "00" * 63, t)
    assert_list_is_the_guests_model(s["a-info"], "0c" + "00" * 63, t)
    with pytest.raises(pytest.fail.Exception):
        assert_list_is_the_guests_model(s["a-info"], "04" + "00" * 63, "inflight=0")
    with pytest.raises(pytest.fail.Exception):
        assert_list_is_the_guests_model(s["a-info"], "00" * 64, t)


def test_resend_check_catches_a_page_not_sent_again():
    base = "5\nC 0x6000000 0x1 0\nS 0x6000000 0\nS 0x6001000 1\n"
    ok = base + "C 0x6001000 0x1 0\nS 0x6001000 0\n"
    assert resend_check(ok) == (5, [], [], 1)
    not_resent = base + "C 0x6001000 0x1 0\nS 0x6002000 1\n"
    assert resend_check(not_resent)[1] == [0x6001]
    wrong_state = base + "C 0x6001000 0x1 0\nS 0x6001000 0\nC 0x6001000 0x1 1\nC 0x6001000 0x1 1\n"
    assert resend_check(wrong_state)[1] == [0x6001]
    stale = base + "C 0x6001000 0x1 0\nS 0x6001000 1\n"
    assert resend_check(stale)[2] == [0x6001]


# ------------------------------------------------------------------------------ the rig's results
@pytest.fixture(scope="module")
def rig():
    status_file = OUT / "status"
    required = os.environ.get("PAGENC_REQUIRE_NESTED") == "1"
    if not status_file.exists():
        msg = f"the nested rig has not run here ({status_file} missing): make check-nested"
    else:
        status = status_file.read_text().strip()
        if status == "ok":
            return {k: sections((OUT / f"results-{k}.txt").read_text())
                    for k in ("6.1", "6.12") if (OUT / f"results-{k}.txt").exists()}
        if not status.startswith("cannot-run"):
            pytest.fail(f"the nested rig failed: {status}", pytrace=False)
        msg = f"the nested rig cannot run on this machine: {status}"
    if required:
        pytest.fail(msg + " [PAGENC_REQUIRE_NESTED=1, so this is a failure]", pytrace=False)
    pytest.skip(msg)


def need(rig, kernel: str, name: str) -> str:
    assert kernel in rig, f"no results from L1 {kernel}"
    assert name in rig[kernel], f"L1 {kernel} did not report section {name}"
    return rig[kernel][name]


KERNELS = ["6.1", "6.12"]
# What scripts/nested-rig.sh check runs on each L1 boot.
SCENARIOS = {"6.1": ["kvmtests", "single", "negctl"], "6.12": ["kvmtests", "single", "migrate"]}


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_scenario_in_l1_passed(rig, kernel):
    text = (OUT / f"results-{kernel}.txt").read_text().replace("\r", "")
    assert re.search(rf"^L1 kernel={re.escape(kernel)}\.\S* kvm_amd nested=1 npt=Y", text, re.M), \
        "L1 did not load kvm-amd with nested SVM and NPT"
    ran = dict(re.findall(r"^SCENARIO (\S+) rc=(\d+)$", text, re.M))
    assert ran == {s: "0" for s in SCENARIOS[kernel]}, \
        f"scenarios in L1 {kernel}: {ran}; failures: {re.findall(r'^FAIL .*$', text, re.M)}"
    assert "=== L1 DONE" in text


@pytest.mark.parametrize("kernel", KERNELS)
def test_library_kvm_tests_see_real_hypercall_exits(rig, kernel):
    """tests/kvm_guest.rs in L1: the VMMCALL tests ran (not skipped) and passed, with the
    long-mode bit where each kernel puts it (6.1 `longmode`, 6.12 `flags`)."""
    out = need(rig, kernel, "kvmtests")
    assert "test result: ok" in out and "exit=0" in out, out
    assert "SKIP" not in out, out
    release = {"6.1": "6.1.", "6.12": "6.12."}[kernel]
    lm = re.search(r"long_mode_guest_vmmcall_reaches_pagenc: kernel (\S+), hypercall exits' "
                   r"flags/longmode word \[([0-9a-f, ]+)\]", out)
    rm = re.search(r"real_mode_guest_vmmcall_reaches_pagenc: kernel (\S+), hypercall exits' "
                   r"flags/longmode word \[([0-9a-f, ]+)\]", out)
    assert lm and rm, out
    assert lm.group(1).startswith(release) and rm.group(1).startswith(release)
    # 6.12 writes the whole flags word (other bits must be zero); 6.1 writes only `longmode`.
    assert [int(x, 16) & 1 for x in lm.group(2).split(", ")] == [1, 1]
    assert [int(x, 16) & 1 for x in rm.group(2).split(", ")] == [0, 0]
    if kernel == "6.12":
        assert lm.group(2) == "1, 1" and rm.group(2) == "0, 0"


@pytest.mark.parametrize("kernel", KERNELS)
def test_guest_vmmcalls_reach_pagenc_and_rax_is_what_the_guest_expects(rig, kernel):
    t = tally(need(rig, kernel, "single-tally"))
    assert t["stage"] == 1, f"boot sequence not done: {t}"
    assert t["mismatches"] == 0, need(rig, kernel, "single-dbg")
    assert t["conversions"] >= 300 and t["checks"] > t["conversions"]
    info = info_values(need(rig, kernel, "single-info"))
    # Every VMMCALL but those KVM answers itself reached pagenc (one more on the guest's side
    # if QEMU stopped it between counting a call and making it).
    assert t["vmmcalls"] - KVM_ANSWERED - info["hypercalls"] in (0, 1), (t, info)
    assert int(need(rig, kernel, "single-exits")) == info["hypercalls"], \
        "trace pagenc_hc_map_gpa_range: one per KVM_EXIT_HYPERCALL"
    for k, v in BOOT_REJECTED.items():
        if k != "reserved-attrs":
            assert info[k] == v, f"rejected {k}: {info[k]}, expected {v}"
    churn_hostile = t["conversions"] // 256
    assert info["reserved-attrs"] - BOOT_REJECTED["reserved-attrs"] in (churn_hostile - 1,
                                                                      churn_hostile)
    assert info["clipped pages"] == 4
    assert info["ready"] == 1 and info["msr"] == 1


@pytest.mark.parametrize("kernel", KERNELS)
def test_list_equals_the_guests_own_model(rig, kernel):
    ranges = info_ranges(need(rig, kernel, "single-info"))
    assert_list_is_the_guests_model(need(rig, kernel, "single-info"),
                                    need(rig, kernel, "single-model"),
                                    need(rig, kernel, "single-tally"))
    assert any(CHURN_BASE <= a < CHURN_BASE + CHURN_PAGES * PAGE for a, _ in ranges)
    assert (0x03a00000, 0x03a00000 + 0x1c0000) in ranges, ".bss..decrypted minus its tail"


@pytest.mark.parametrize("kernel", KERNELS)
def test_reset_clears_list_and_readiness(rig, kernel):
    info = need(rig, kernel, "reset-info")
    v = info_values(info)
    assert v["ready"] == 0 and v["msr"] == 0 and info_ranges(info) == [], info
    assert "shared: 0 bytes in 0 ranges" in info
    # ... and the guest, booted again, builds the same kind of list with a clean tally
    t = tally(need(rig, kernel, "reboot-tally"))
    assert t["stage"] == 1 and t["mismatches"] == 0
    assert_list_is_the_guests_model(need(rig, kernel, "reboot-info"),
                                    need(rig, kernel, "reboot-model"),
                                    need(rig, kernel, "reboot-tally"))
    assert info_values(need(rig, kernel, "reboot-info"))["ready"] == 1


def test_negative_control_wrong_expectation_is_reported(rig):
    """`hcwrong`: the guest expects 1 from its first call; pagenc answers 0; the guest must
    report exactly that one mismatch."""
    t = tally(need(rig, "6.1", "negctl-tally"))
    dbg = need(rig, "6.1", "negctl-dbg")
    assert t["mismatches"] == 1, dbg
    assert re.search(r"MISMATCH check 00000001 e820 re-encrypt \[0, 640K\): got "
                     r"0000000000000000 expected 0000000000000001", dbg), dbg


MIG = "6.12"


def test_migration_lists_equal_on_both_sides_and_to_the_guests_model(rig):
    src, dst = need(rig, MIG, "src-info"), need(rig, MIG, "dst-info")
    assert info_ranges(src) == info_ranges(dst)
    assert_list_is_the_guests_model(src, need(rig, MIG, "src-model"), need(rig, MIG, "src-tally"))
    assert_list_is_the_guests_model(dst, need(rig, MIG, "dst-model"), need(rig, MIG, "dst-tally"))
    assert need(rig, MIG, "dst-model") == need(rig, MIG, "src-model")
    assert info_values(dst)["ready"] == 1 and info_values(dst)["msr"] == 1


def test_migration_memory_equal(rig):
    assert "memory-equal" in need(rig, MIG, "memory")


def test_migration_guest_converted_pages_throughout_with_a_clean_tally(rig):
    c = tally(need(rig, MIG, "migrate-conversions"))
    assert c["conversions_at_switchover"] - c["conversions_before"] >= 300, c
    for name in ("src-tally", "dst-tally", "resumed-tally"):
        t = tally(need(rig, MIG, name))
        assert t["mismatches"] == 0 and t["stage"] == 1, (name, t)
    assert tally(need(rig, MIG, "src-tally")) == tally(need(rig, MIG, "dst-tally"))
    assert re.search(r'"status": *"completed"', need(rig, MIG, "migrate-query"))


def test_migration_sent_again_the_pages_converted_during_it(rig):
    total, missing, wrong, again = resend_check(need(rig, MIG, "trace-churn"))
    info = info_values(need(rig, MIG, "src-info"))
    m = re.search(r"pages sent encrypted (\d+), shared (\d+)", need(rig, MIG, "src-info"))
    assert m and int(m.group(1)) + int(m.group(2)) == total
    assert not missing, f"{len(missing)} pages converted during the migration were not sent " \
                        f"after their conversion, e.g. {[hex(p * PAGE) for p in missing[:5]]}"
    assert not wrong, f"pages last sent in a stale state: {[hex(p * PAGE) for p in wrong[:5]]}"
    assert again >= 100, f"only {again} pages were sent, converted, and sent again"
    assert info["hypercalls"] > 0


def test_guest_goes_on_converting_on_the_destination(rig):
    before, after = tally(need(rig, MIG, "dst-tally")), tally(need(rig, MIG, "resumed-tally"))
    assert after["conversions"] >= before["conversions"] + 100
    info = need(rig, MIG, "resumed-info")
    assert info_values(info)["hypercalls"] >= 100, "the destination's pagenc took the VMMCALLs"
    assert_list_is_the_guests_model(info, need(rig, MIG, "resumed-model"),
                                    need(rig, MIG, "resumed-tally"))
