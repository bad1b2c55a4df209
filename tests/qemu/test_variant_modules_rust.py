"""The second QEMU build, scripts/build-qemu.sh --variant modules-rust: QEMU with
--enable-modules (pagenc is the module backends-pagenc) and --enable-rust (QEMU's
own Rust: the HPET is the Rust device).  A focused set, run by
`make check-qemu-modules-rust` with that build's binary:

- without -object pagenc the module is not mapped (/proc/PID/maps), not even
  after query-pagenc, and the binary itself has no libpagenc symbol;
- -object pagenc loads it, and the object works through the core's ops vector;
- the HPET, a Rust device in this build, is there and counts;
- a live migration with the list between two QEMUs of this build.

The full suite (tests/qemu) runs on the default build (builtin, Rust off); these
tests skip there unless PAGENC_QEMU_VARIANT=modules-rust says the binary is
this variant's.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from conftest import QEMU, ROOT, Qtest, migrate_list_between_two_qemus

VARIANT = os.environ.get("PAGENC_QEMU_VARIANT", "builtin")
MODULE = "backends-pagenc.so"
PAGE = 4096
MiB = 1 << 20
HPET_BASE = 0xFED00000

pytestmark = pytest.mark.skipif(
    VARIANT != "modules-rust",
    reason="for the modules-rust build (make check-qemu-modules-rust sets PAGENC_QEMU_VARIANT)")

# The modules of a build tree are found through QEMU_MODULE_DIR (an installed
# QEMU looks in its configured module directory instead).
os.environ.setdefault("QEMU_MODULE_DIR", str(QEMU.parent))


def maps(q) -> str:
    with open(f"/proc/{q.proc.pid}/maps") as f:
        return f.read()


def ranges(info):
    return [(r["gpa"], r["size"]) for r in info["ranges"]]


def link_args(target: str) -> list[str]:
    """The link arguments meson wrote for @target into the build's build.ninja."""
    lines = (QEMU.parent / "build.ninja").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"build {target}: "))
    for line in lines[start + 1:]:
        if line.startswith("build "):
            break
        if line.strip().startswith("LINK_ARGS = "):
            return line.split(" = ", 1)[1].split()
    raise AssertionError(f"no LINK_ARGS for {target} in build.ninja")


def whole_archived(args: list[str]) -> list[str]:
    inside, out = False, []
    for a in args:
        if a == "-Wl,--whole-archive":
            inside = True
        elif a == "-Wl,--no-whole-archive":
            inside = False
        elif inside:
            out.append(a)
    return out


def test_libpagenc_is_linked_into_the_module_only_and_never_whole_archive():
    """The binary's link does not name libpagenc at all (only QEMU's own Rust
    staticlib is whole-archived there); the module's names it plainly."""
    binary = link_args("qemu-system-x86_64")
    assert [a for a in binary if "pagenc" in a] == [], "the binary's link names libpagenc"
    assert any("librust_x86_64_softmmu.a" in a for a in whole_archived(binary))
    module = link_args(MODULE)
    assert any(a.endswith("libpagenc.a") or a == "-lpagenc" for a in module), module
    assert [a for a in whole_archived(module) if "pagenc" in a] == []


def test_this_is_the_modules_rust_build():
    """The premise of the other tests, checked instead of assumed: the module
    exists beside the binary, and only the module carries libpagenc."""
    assert (QEMU.parent / MODULE).is_file(), f"no {MODULE} beside {QEMU}"
    out = subprocess.run(["nm", "-D", "--defined-only", str(QEMU)], check=True,
                         capture_output=True, text=True).stdout
    lib = [line for line in out.splitlines() if re.search(r" pagenc_\w+$", line)]
    assert lib == [], f"{QEMU} defines libpagenc symbols: {lib[:5]}"
    # the core's side of the interface is in the binary
    assert re.search(r" qemu_pagenc_register$", out, re.M)
    mod = subprocess.run(["nm", "-D", "--defined-only", str(QEMU.parent / MODULE)],
                         check=True, capture_output=True, text=True).stdout
    assert re.search(r" pagenc_tracker_new$", mod, re.M)
    # QEMU's own Rust: the HPET is the Rust device, and its code is in the binary
    devices = (QEMU.parent / "x86_64-softmmu-config-devices.mak").read_text()
    assert re.search(r"^CONFIG_X_HPET_RUST=y$", devices, re.M), "Rust HPET not configured"
    syms = subprocess.run(["nm", str(QEMU)], check=True, capture_output=True, text=True).stdout
    assert re.search(r" _(ZN|R)\w*4hpet\w*", syms), "no Rust hpet symbol in the binary"


# Symbols every Rust std copy defines without a crate hash in the name: what two
# runtimes in one process would share by name (rustc's allocator shims, the
# unwinder's personality routine).
RUST_RUNTIME = re.compile(r" (rust_eh_personality|__rust_\w+|__rdl_\w+|__rg_\w+|_ZN3std\w*|_ZN4core\w*|_ZN5alloc\w*)$", re.M)


def test_module_keeps_its_rust_runtime_to_itself():
    """The binary holds QEMU's Rust runtime and exports it (--export-dynamic, which
    modules need).  The module holds libpagenc's own copy, localized by
    scripts/localize-staticlib.sh: it exports none of it, and it imports none from
    the binary, so at dlopen nothing of one runtime binds to the other, whichever
    rustc built either side."""
    binary = subprocess.run(["nm", "-D", "--defined-only", str(QEMU)], check=True,
                            capture_output=True, text=True).stdout
    assert RUST_RUNTIME.search(binary), "the binary exports no Rust runtime symbol (Rust on?)"
    mod = QEMU.parent / MODULE
    exported = subprocess.run(["nm", "-D", "--defined-only", str(mod)], check=True,
                              capture_output=True, text=True).stdout
    imported = subprocess.run(["nm", "-D", "--undefined-only", str(mod)], check=True,
                              capture_output=True, text=True).stdout
    assert RUST_RUNTIME.findall(exported) == [], "the module exports Rust runtime symbols"
    assert RUST_RUNTIME.findall(imported) == [], "the module binds to the binary's Rust runtime"


def test_without_object_the_module_is_not_loaded(vms):
    q = vms("plain", [])
    assert MODULE not in maps(q)
    # the QMP command is core code: it answers without loading the module
    err = q.error("query-pagenc")
    assert "there is no pagenc object" in err.desc
    assert MODULE not in maps(q)


def test_object_loads_the_module_and_works(vms):
    q = vms("src", ["-object", "pagenc,id=pe0,x-testing=on"])
    assert MODULE in maps(q)
    assert q.map(16 * MiB, 2, 0) == 0
    assert ranges(q.pagenc()) == [(16 * MiB, 2 * PAGE)]
    assert q.set_mc(1) is True
    q.wait_for(lambda: not q.pagenc()["migration-blocked"], "unblocked")


def test_hpet_is_rust_and_counts(vms, workdir):
    """q35's HPET: in this build the Rust device (CONFIG_X_HPET_RUST).  Through
    qtest: the capabilities register, then the main counter runs once enabled."""
    sock = workdir / "qtest.sock"
    q = vms("hpet", ["-qtest", f"unix:{sock},server=on,wait=off"], accel="qtest")
    tree = q.hmp("info qtree")
    assert re.search(r'dev: hpet, id ""', tree), tree[:2000]
    t = Qtest(sock)
    try:
        cap = int(t.cmd(f"readl 0x{HPET_BASE:x}").split()[1], 16)
        assert cap & 0xFF != 0, f"HPET revision id is 0 (capabilities 0x{cap:x})"
        assert (cap >> 16) == 0x8086, f"HPET vendor id: capabilities 0x{cap:x}"
        period = int(t.cmd(f"readl 0x{HPET_BASE + 4:x}").split()[1], 16)
        assert 0 < period <= 0x05F5E100, f"counter period {period} fs"
        t.cmd(f"writel 0x{HPET_BASE + 0x10:x} 0x1")      # ENABLE_CNF
        c0 = int(t.cmd(f"readq 0x{HPET_BASE + 0xF0:x}").split()[1], 16)
        t.cmd("clock_step 1000000")                       # 1 ms of virtual time
        c1 = int(t.cmd(f"readq 0x{HPET_BASE + 0xF0:x}").split()[1], 16)
        assert c1 > c0, f"HPET main counter did not advance: {c0} -> {c1}"
        # 1 ms at `period` fs per tick
        assert c1 - c0 >= 10**12 // period - 1, (c0, c1, period)
    finally:
        t.close()


def test_live_migration_between_two_qemus_of_this_build(vms, workdir):
    dst = migrate_list_between_two_qemus(vms, workdir)
    assert MODULE in maps(dst)


def test_negative_control_unlocalized_archive_would_export_its_runtime(workdir):
    """What the previous test rules out, shown on cargo's unprocessed archive: a
    shared object linked from it the way the module is (plain -l, the library's
    entry points pulled) exports Rust runtime symbols; linked from the installed,
    localized archive it does not.  Without this, the previous test could pass
    because nm or the pattern saw nothing."""
    root = ROOT
    raw = root / "target/release/libpagenc.a"
    installed = root / "build/pagenc-prefix/lib/libpagenc.a"
    for lib in (raw, installed):
        assert lib.is_file(), lib

    def exported(lib):
        so = workdir / (lib.parent.name + ".so")
        subprocess.run(["cc", "-shared", "-o", str(so), "-Wl,-u,pagenc_tracker_new",
                        "-Wl,-u,pagenc_tracker_free", str(lib), "-lgcc_s", "-lpthread",
                        "-ldl", "-lc"], check=True, capture_output=True, text=True)
        return subprocess.run(["nm", "-D", "--defined-only", str(so)], check=True,
                              capture_output=True, text=True).stdout

    assert RUST_RUNTIME.search(exported(raw)), "cargo's archive no longer exports its runtime?"
    assert RUST_RUNTIME.findall(exported(installed)) == []
