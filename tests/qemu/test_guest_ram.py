"""The tracked layout is the guest's RAM, not the flat view of what is mapped now
(review findings 1, 6, 13 of docs/qemu-integration.md): guests that change their memory
map (q35 TSEG, a default VGA device, OVMF with and without SMM) migrate, and ROMs and
VRAM are not guest RAM.  Each of these fails on v1 of the series (flat view)."""

from __future__ import annotations

import re
import shutil

import pytest

from conftest import ACCEL, OVMF_DIR, Qtest

PAGE = 4096
MiB = 1 << 20
ENCRYPTED, SHARED, NOT_RAM = 0, 1, 2       # QemuPagencPage, as traced by pagenc_ram_page


def ranges(info):
    return [(r["gpa"], r["size"]) for r in info["ranges"]]


def migrate_through_file(src, vms, workdir, dst_args, **dst_kw):
    """Migrate src to a file and load it into a new destination; returns (dst, status)."""
    path = workdir / "vm.mig"
    src.cmd("migrate", uri=f"file:{path}")
    st = src.wait_migration()
    assert st["status"] == "completed", st
    dst = vms("dst", dst_args + ["-incoming", "defer"], **dst_kw)
    dst.cmd("migrate-incoming", uri=f"file:{path}", **{"exit-on-error": False})

    def final():
        s = dst.cmd("query-migrate")
        return s if s.get("status") in ("completed", "failed") else None
    st = dst.wait_for(final, "the incoming migration to end", 90)
    return dst, st


def share_and_get_ready(q):
    q.map(16 * MiB, 8, 0)
    q.map(0x100000, 1, 0)
    q.set_mc(1)
    q.wait_for(lambda: not q.pagenc()["migration-blocked"], "source unblocked")
    return q.pagenc()


def test_tseg_enabled_source_migrates(vms, workdir):
    # Finding 1's reproduction: enable q35's 1 MiB TSEG as OVMF with SMM does,
    # through qtest (ESMRAMC T_EN), then migrate to a fresh destination.
    qt = workdir / "qtest.sock"
    args = ["-object", "pagenc,id=pe0,x-testing=on"]
    src = vms("src", args + ["-S", "-qtest", f"unix:{qt},server=on,wait=off"], accel="tcg")
    q = Qtest(qt)
    for line in ("outl 0xcf8 0x8000009c", "outb 0xcfd 0x0a", "outb 0xcfe 0x01"):
        q.cmd(line)
    q.close()
    assert "tseg-blackhole" in src.hmp("info mtree -f")    # TSEG now hides low RAM
    src.map(255 * MiB + 16 * PAGE, 4, 0)                    # under TSEG: still guest RAM
    want = share_and_get_ready(src)
    assert want["ram-bytes"] == 256 * MiB
    dst, st = migrate_through_file(src, vms, workdir, args, accel="tcg")
    assert st["status"] == "completed", (st, dst.stderr())
    got = dst.pagenc()
    assert ranges(got) == ranges(want) and (255 * MiB + 16 * PAGE, 4 * PAGE) in ranges(got)
    assert got["ram-bytes"] == 256 * MiB and got["ready"] is True


def test_default_devices_migrate(vms, workdir):
    # No -nodefaults: std VGA (vga.vram behind a BAR SeaBIOS programs), e1000e with its
    # option ROM, ... The destination loads the list before any of that device state.
    args = ["-object", "pagenc,id=pe0,x-testing=on"]
    src = vms("src", args, defaults=True)
    src.wait_for(lambda: "vga.vram" in src.hmp("info mtree -f"), "SeaBIOS to map VGA's VRAM", 60)
    want = share_and_get_ready(src)
    assert want["ram-bytes"] == 256 * MiB                   # VRAM and ROMs not counted
    dst, st = migrate_through_file(src, vms, workdir, args, defaults=True)
    assert st["status"] == "completed", (st, dst.stderr())
    got = dst.pagenc()
    assert ranges(got) == ranges(want) and got["ready"] is True


@pytest.mark.parametrize("variant", ["plain", "smm-secboot"])
def test_ovmf_boot_manager_live_migration(vms, workdir, variant):
    # Real UEFI firmware (Debian's ovmf, TCG): boot to its boot manager, share pages,
    # live-migrate, lists equal.  The SMM build programs SMRAM/TSEG itself.
    code = OVMF_DIR / ("OVMF_CODE_4M.secboot.fd" if variant == "smm-secboot" else "OVMF_CODE_4M.fd")
    if not code.exists():
        pytest.fail(f"{code} is missing: scripts/build-qemu.sh fetches it (stage firmware)")
    machine = "q35,smm=on" if variant == "smm-secboot" else "q35"

    def args(side):
        vars_fd = workdir / f"{side}-vars.fd"
        shutil.copy(OVMF_DIR / "OVMF_VARS_4M.fd", vars_fd)
        a = ["-object", "pagenc,id=pe0,x-testing=on",
             "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
             "-drive", f"if=pflash,format=raw,unit=1,file={vars_fd}"]
        if variant == "smm-secboot":
            a += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
        return a

    out = workdir / "src-serial.txt"
    src = vms("src", args("src"), accel="tcg", machine=machine, serial=f"file:{out}")
    src.wait_for(lambda: out.exists() and b"BdsDxe" in out.read_bytes(),
                 "OVMF's boot manager", 150)
    if variant == "smm-secboot":
        assert "tseg-blackhole" in src.hmp("info mtree -f")  # OVMF enabled TSEG
    want = share_and_get_ready(src)
    sock = workdir / "mig.sock"
    dst = vms("dst", args("dst") + ["-incoming", f"unix:{sock}"], accel="tcg",
              machine=machine, serial=f"file:{workdir / 'dst-serial.txt'}")
    src.cmd("migrate", uri=f"unix:{sock}")
    st = src.wait_migration(120)
    assert st["status"] == "completed", (st, dst.stderr())
    dst.wait_for(lambda: dst.proc.poll() is not None or
                 dst.cmd("query-status")["status"] == "running", "destination running")
    assert dst.proc.poll() is None, dst.stderr()
    got = dst.pagenc()
    assert ranges(got) == ranges(want) and got["ready"] is True
    assert got["ram-bytes"] == want["ram-bytes"] == 256 * MiB


def test_roms_and_vram_are_not_guest_ram(vms, workdir):
    # Finding 6: every page the RAM loop sends, traced with its class.  ROMs and VRAM are
    # NOT_RAM (sent as they are), every pc.ram page is guest RAM at GPA == offset (256 MiB,
    # all below 4 GiB), including the pages the VGA window hides at 0xa0000.
    src = vms("src", ["-object", "pagenc,id=pe0,require-ready=off,x-testing=on", "-device", "VGA",
                      "-trace", "pagenc_ram_page"])
    src.wait_for(lambda: "vga.vram" in src.hmp("info mtree -f"), "SeaBIOS to map VGA's VRAM", 60)
    src.map(16 * MiB, 8, 0)
    path = workdir / "vm.mig"
    src.cmd("migrate", uri=f"file:{path}")
    assert src.wait_migration()["status"] == "completed"
    src.kill()
    pages = {}
    for m in re.finditer(r"pagenc_ram_page block=(\S+) offset=0x([0-9a-f]+) "
                         r"gpa=0x([0-9a-f]+) page=(\d+)", src.stderr()):
        pages.setdefault(m.group(1), []).append((int(m.group(2), 16), int(m.group(3), 16),
                                                 int(m.group(4))))
    # Every block but pc.ram: BIOS, option ROM area, VGA's VRAM and ROM, ACPI tables.
    others = [b for b in pages if b != "pc.ram"]
    for suffix in ("pc.bios", "pc.rom", "/vga.vram", "/vga.rom", "etc/acpi/tables"):
        assert any(b.endswith(suffix) for b in others), (suffix, others)
    for b in others:
        assert {p for _, _, p in pages[b]} == {NOT_RAM}, b
    ram = pages["pc.ram"]
    assert len({off for off, _, _ in ram}) == 256 * MiB // PAGE
    assert all(gpa == off for off, gpa, _ in ram)
    shared = {off for off, _, p in ram if p == SHARED}
    assert shared == {16 * MiB + i * PAGE for i in range(8)}
    assert all(p == ENCRYPTED for off, _, p in ram if 0xa0000 <= off < 0xc0000)
