"""pagenc inside the patched QEMU: the object, the guest interface driven over
QMP (x-pagenc-*), query-pagenc / info pagenc, the migration blocker and
section, and QEMU without the object.  See conftest.py for the harness."""

from __future__ import annotations

import re
import struct

import pytest

from conftest import ACCEL, migrate_list_between_two_qemus, run_qemu_expect_failure

PAGE = 4096
MiB = 1 << 20
GiB = 1 << 30
EINVAL = -22
ATTR_ENC = 1 << 4
ATTR_2M = 1
ATTR_1G = 2
GPA_LIMIT = 1 << 52

REJECT_KEYS = ["unknown-hypercall", "unaligned", "zero-length", "out-of-range",
               "reserved-attrs", "bad-page-size", "reserved-msr-bits"]


def ranges(info):
    return [(r["gpa"], r["size"]) for r in info["ranges"]]


# --------------------------------------------------------------------------
# The object and its state
# --------------------------------------------------------------------------

def test_initial_state(vm):
    info = vm.pagenc()
    assert info["id"] == "pe0"
    assert info["ready"] is False
    assert info["migration-control"] == 0
    assert info["migration-blocked"] is True
    assert info["hypercalls"] == 0
    assert info["shared-ranges"] == 0 and info["shared-bytes"] == 0
    assert info["ranges"] == []
    assert all(v == 0 for v in info["rejected"].values())
    assert set(info["rejected"]) == set(REJECT_KEYS)
    # The layout is the guest RAM: pc.ram, not the BIOS ROMs (review finding 6).
    assert info["ram-bytes"] == 256 * MiB      # guest RAM only: no ROM counted
    assert info["memory-used"] > 0


def test_share_merge_split_and_reencrypt(vm):
    base = 16 * MiB
    assert vm.map(base, 4, 0) == 0
    assert vm.map(base + 4 * PAGE, 4, 0) == 0          # adjacent: coalesced
    info = vm.pagenc()
    assert ranges(info) == [(base, 8 * PAGE)]
    assert info["shared-bytes"] == 8 * PAGE and info["pages-flipped"] == 8

    assert vm.map(base + 2 * PAGE, 1, ATTR_ENC) == 0  # split
    info = vm.pagenc()
    assert ranges(info) == [(base, 2 * PAGE), (base + 3 * PAGE, 5 * PAGE)]
    assert info["shared-ranges"] == 2 and info["shared-bytes"] == 7 * PAGE

    # Re-marking an encrypted range encrypted changes nothing.
    flipped = info["pages-flipped"]
    assert vm.map(64 * MiB, 512, ATTR_ENC | ATTR_2M) == 0
    assert vm.pagenc()["pages-flipped"] == flipped

    # A 2M-hinted shared call, then everything back to encrypted.
    assert vm.map(32 * MiB, 512, ATTR_2M) == 0
    assert ranges(vm.pagenc())[-1] == (32 * MiB, 2 * MiB)
    assert vm.map(0, 256 * MiB // PAGE, ATTR_ENC) == 0
    info = vm.pagenc()
    assert info["ranges"] == [] and info["shared-bytes"] == 0
    assert info["hypercalls"] == 6
    assert all(v == 0 for v in info["rejected"].values())


def test_outside_ram_is_clipped(vm):
    # The PCI hole / MMIO: accepted (OVMF reports such ranges) but not stored.
    assert vm.map(0xfec00000, 4, 0) == 0
    info = vm.pagenc()
    assert info["clipped-pages"] == 4
    assert info["ranges"] == []


@pytest.mark.parametrize("name,gpa,npages,attrs", [
    ("unaligned", 0x1001, 1, 0),
    ("zero-length", 0x1000, 0, 0),
    ("out-of-range", 0xfffffffffffff000, 2, 0),        # wraps
    ("out-of-range", GPA_LIMIT, 1, 0),                 # past 52 bits
    ("reserved-attrs", 0x1000, 1, 1 << 5),
    ("reserved-attrs", 0x1000, 1, 1 << 63),
    ("bad-page-size", 0x1000, 1, 3),
    ("bad-page-size", 0x1000, 1, 0xf | ATTR_ENC),
])
def test_hypercall_rejections(vm, name, gpa, npages, attrs):
    assert vm.map(16 * MiB, 1, 0) == 0
    before = vm.pagenc()
    assert vm.map(gpa, npages, attrs) == EINVAL
    after = vm.pagenc()
    for k in REJECT_KEYS:
        assert after["rejected"][k] == before["rejected"][k] + (k == name), k
    assert after["hypercalls"] == before["hypercalls"] + 1
    assert after["ranges"] == before["ranges"]           # nothing changed
    assert after["pages-flipped"] == before["pages-flipped"]


def test_msr_readiness_and_blocker(vm):
    # Blocked: migrate fails with pagenc's reason.
    err = vm.error("migrate", uri="exec:cat >/dev/null")
    assert "pagenc 'pe0'" in err.desc and "KVM_MIGRATION_READY" in err.desc, err.desc

    # Reserved bits: #GP, counted, nothing changes.
    for bad in (2, 0x80, 1 << 63, 3):
        assert vm.set_mc(bad) is False
    info = vm.pagenc()
    assert info["rejected"]["reserved-msr-bits"] == 4
    assert info["ready"] is False and info["msr-writes"] == 0
    assert info["hypercalls"] == 0            # MSR writes are not hypercalls

    assert vm.set_mc(1) is True
    vm.wait_for(lambda: not vm.pagenc()["migration-blocked"], "blocker removed")
    info = vm.pagenc()
    assert info["ready"] is True and info["migration-control"] == 1
    assert info["msr-writes"] == 1

    # The guest takes it back (kexec, CPU offline): blocked again.
    assert vm.set_mc(0) is True
    vm.wait_for(lambda: vm.pagenc()["migration-blocked"], "blocker back")
    assert vm.pagenc()["ready"] is False
    err = vm.error("migrate", uri="exec:cat >/dev/null")
    assert "KVM_MIGRATION_READY" in err.desc


def test_require_ready_off_has_no_blocker(vms):
    q = vms("src", ["-object", "pagenc,id=pe0,require-ready=off,x-testing=on"])
    assert q.pagenc()["migration-blocked"] is False


def test_info_pagenc_matches_query(vm):
    vm.map(16 * MiB, 3, 0)
    vm.map(0x100000, 1, 0)
    vm.map(0x1001, 1, 0)
    vm.map(0x1000, 1, 0x40)
    vm.set_mc(4)
    vm.set_mc(1)
    info = vm.pagenc()
    text = vm.hmp("info pagenc")
    assert "pagenc pe0: guest ready" in text
    assert f"shared: {info['shared-bytes']} bytes in {info['shared-ranges']} ranges" in text
    assert f"hypercalls: {info['hypercalls']}," in text
    for k in REJECT_KEYS:
        assert f"{k} {info['rejected'][k]}" in text, k
    shown = re.findall(r"0x([0-9a-f]{16})-0x([0-9a-f]{16}) \((\d+) pages\)", text)
    assert [(int(a, 16), int(b, 16) - int(a, 16) + 1) for a, b, _ in shown] == ranges(info)
    assert [(0x100000, PAGE), (16 * MiB, 3 * PAGE)] == ranges(info)


def test_guest_reset_forgets_everything(vm):
    vm.map(16 * MiB, 8, 0)
    vm.set_mc(1)
    vm.cmd("system_reset")
    vm.wait_for(lambda: vm.pagenc()["ranges"] == [], "ranges cleared by reset")
    vm.wait_for(lambda: vm.pagenc()["migration-blocked"], "blocker back after reset")
    assert vm.pagenc()["ready"] is False


def test_layout_follows_memory_map_above_4g(vms):
    # 4 GiB on q35: pc.ram below 2 GiB and, through an alias, from 4 GiB up.
    q = vms("big", ["-object", "pagenc,id=pe0,x-testing=on"], mem="4G")
    info = q.pagenc()
    assert 4 * GiB <= info["ram-bytes"] < 4 * GiB + 4 * MiB
    assert q.map(4 * GiB + 8 * MiB, 16, 0) == 0
    assert q.map(3 * GiB, 16, 0) == 0            # the PCI hole: clipped
    info = q.pagenc()
    assert ranges(info) == [(4 * GiB + 8 * MiB, 16 * PAGE)]
    assert info["clipped-pages"] == 16


# --------------------------------------------------------------------------
# Objects and command line
# --------------------------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["-object", "pagenc,id=pe0,x-testing=on", "-object", "pagenc,id=pe1,x-testing=on"],
     "only one pagenc object is allowed, 'pe0' already exists"),
    (["-object", "pagenc,id=pe0,cpuid=maybe,x-testing=on"], "Parameter 'cpuid' expects 'on' or 'off'"),
    (["-object", "pagenc,id=pe0,require-ready=2,x-testing=on"],
     "Parameter 'require-ready' expects 'on' or 'off'"),
    (["-object", "pagenc,id=pe0,bogus=1,x-testing=on"], "Invalid parameter 'bogus'"),
    (["-object", "pagenc"], "Parameter 'id' is missing"),
])
def test_bad_object_arguments(args, message):
    rc, err = run_qemu_expect_failure(args)
    assert rc != 0
    assert message in err, err


def test_second_object_over_qmp_and_deletion(vm):
    err = vm.error("object-add", **{"qom-type": "pagenc", "id": "pe1", "x-testing": True})
    assert "only one pagenc object is allowed, 'pe0' already exists" in err.desc
    props = vm.cmd("qom-list-properties", typename="pagenc")
    descs = {p["name"]: p.get("description", "") for p in props}
    assert "KVM_FEATURE_MIGRATION_CONTROL" in descs["cpuid"]
    assert "KVM_MIGRATION_READY" in descs["require-ready"]
    if ACCEL == "kvm":
        # KVM sends the guest's exits to the object for the VM's life.
        err = vm.error("object-del", id="pe0")
        assert "pe0" in err.desc and "in use" in err.desc
    else:
        vm.cmd("object-del", id="pe0")
        assert "no pagenc object" in vm.error("query-pagenc").desc
        vm.cmd("object-add", **{"qom-type": "pagenc", "id": "pe2", "x-testing": True})
        assert vm.pagenc()["id"] == "pe2"


def test_without_object_qemu_is_unchanged(vms, workdir):
    q = vms("plain", [])
    for cmd, args in [("query-pagenc", {}),
                      ("x-pagenc-map-gpa-range", {"gpa": 0, "npages": 1, "attrs": 0}),
                      ("x-pagenc-set-migration-control", {"value": 1})]:
        err = q.error(cmd, **args)
        assert "there is no pagenc object" in err.desc
        assert "-object pagenc,id=" in err.desc
    assert "there is no pagenc object" in q.hmp("info pagenc")
    # No pagenc migration section, no blocker.
    path = workdir / "plain.mig"
    q.cmd("migrate", uri=f"file:{path}")
    assert q.wait_migration()["status"] == "completed"
    assert b"pagenc" not in path.read_bytes()


@pytest.mark.skipif(ACCEL != "kvm", reason="KVM capability and CPUID set-up only with -accel kvm")
@pytest.mark.parametrize("args,init,cpuid", [
    (["-object", "pagenc,id=pe0,x-testing=on"], True, True),
    (["-object", "pagenc,id=pe0,cpuid=off,x-testing=on"], True, False),
    ([], False, False),
])
def test_kvm_cap_and_cpuid(vms, args, init, cpuid):
    q = vms("kvm", args + ["-trace", "kvm_pagenc_*"])
    # The bits are CPU features of the vCPUs (test_cpu_model.py has the rest)
    path = q.cmd("query-cpus-fast")[0]["qom-path"]
    for bit in ("kvm-hc-map-gpa-range", "kvm-migration-control"):
        assert q.cmd("qom-get", path=path, property=bit) is cpuid
    q.kill()
    err = q.stderr()
    assert ("kvm_pagenc_init KVM_CAP_EXIT_HYPERCALL mask 0x1000, MSR 0x4b564d08" in err) == init, err


# --------------------------------------------------------------------------
# Migration
# --------------------------------------------------------------------------

def find_list_record(data: bytes) -> int:
    """Offset of the pagenc list (be32 length, then libpagenc's stream) in a migration
    file: the "pagenc" device section (QEMU_VM_SECTION_FULL, idstr, be32 instance_id,
    be32 version_id, then the VMStateDescription's fields)."""
    start = data.index(b"\x06pagenc\x00\x00\x00\x00\x00\x00\x00\x01")
    assert data[start - 5] == 0x04                # QEMU_VM_SECTION_FULL
    return start + 7 + 8


def test_migration_roundtrip_through_file(vms, workdir):
    src = vms("src", ["-object", "pagenc,id=pe0,x-testing=on"])
    src.map(16 * MiB, 8, 0)
    src.map(64 * MiB, 512, ATTR_2M)
    src.set_mc(1)
    src.wait_for(lambda: not src.pagenc()["migration-blocked"], "source unblocked")
    want = src.pagenc()
    path = workdir / "vm.mig"
    src.cmd("migrate", uri=f"file:{path}")
    st = src.wait_migration()
    assert st["status"] == "completed", st
    info = src.pagenc()
    # Every page went out once, and the shared ones were told apart.
    assert info["pages-sent-shared"] >= 8 + 512
    assert info["pages-sent-encrypted"] >= (256 * MiB // PAGE) - 8 - 512 - 64
    assert b"pagenc" in path.read_bytes()

    dst = vms("dst", ["-object", "pagenc,id=pe0,x-testing=on", "-incoming", "defer"])
    dst.cmd("migrate-incoming", uri=f"file:{path}")
    dst.wait_for(lambda: dst.cmd("query-status")["status"] in ("running", "paused",
                                                              "postmigrate"),
                 "incoming migration")
    dst.wait_for(lambda: dst.cmd("query-migrate").get("status") == "completed",
                 "incoming completed")
    got = dst.pagenc()
    assert ranges(got) == ranges(want)
    assert got["ready"] is True and got["migration-control"] == 1
    dst.wait_for(lambda: not dst.pagenc()["migration-blocked"], "destination unblocked")


def test_destination_without_object_refuses_stream(vms, workdir):
    src = vms("src", ["-object", "pagenc,id=pe0,require-ready=off,x-testing=on"])
    src.map(16 * MiB, 8, 0)
    path = workdir / "vm.mig"
    src.cmd("migrate", uri=f"file:{path}")
    assert src.wait_migration()["status"] == "completed"
    dst = vms("dst", ["-incoming", "defer"])
    dst.cmd("migrate-incoming", uri=f"file:{path}")
    dst.wait_for(lambda: "pagenc" in dst.stderr() or dst.proc.poll() is not None,
                 "the destination to refuse the stream")
    err = dst.stderr()
    assert "Unknown section or instance 'pagenc'" in err, err


@pytest.mark.parametrize("corrupt,message", [
    ("stream", "the page list"),
    ("length", "bytes long, more than the"),
])
def test_bad_section_fails_incoming_migration(vms, workdir, corrupt, message):
    src = vms("src", ["-object", "pagenc,id=pe0,x-testing=on"])
    src.map(16 * MiB, 8, 0)
    src.set_mc(1)
    src.wait_for(lambda: not src.pagenc()["migration-blocked"], "source unblocked")
    path = workdir / "vm.mig"
    src.cmd("migrate", uri=f"file:{path}")
    assert src.wait_migration()["status"] == "completed"
    data = bytearray(path.read_bytes())
    rec = find_list_record(bytes(data))
    (length,) = struct.unpack(">I", data[rec:rec + 4])
    assert 0 < length < 4096
    if corrupt == "stream":
        data[rec + 4] ^= 0xff                    # first byte of pagenc's stream
    else:
        data[rec:rec + 4] = struct.pack(">I", 0xf0000000)   # > what 256 MiB of RAM takes
    path.write_bytes(bytes(data))

    dst = vms("dst", ["-object", "pagenc,id=pe0,x-testing=on", "-incoming", "defer"])
    dst.cmd("migrate-incoming", uri=f"file:{path}", **{"exit-on-error": False})
    st = dst.wait_for(lambda: (lambda s: s if s.get("status") == "failed" else None)(
        dst.cmd("query-migrate")), "the incoming migration to fail")
    # The reason is printed or in query-migrate (the list's post_load reports there).
    err = dst.stderr() + st.get("error-desc", "")
    assert message in err, err
    assert "pagenc 'pe0': incoming migration" in err, err
    # The destination's list is unchanged and it did not start the guest.
    assert dst.pagenc()["ranges"] == []
    assert dst.cmd("query-status")["status"] != "running"


def test_postcopy_is_refused(vm):
    vm.set_mc(1)
    vm.wait_for(lambda: not vm.pagenc()["migration-blocked"], "unblocked")
    vm.cmd("migrate-set-capabilities",
           capabilities=[{"capability": "postcopy-ram", "state": True}])
    r = vm.raw("migrate", uri="exec:cat >/dev/null")
    if "error" not in r:
        st = vm.wait_migration()
        assert st["status"] == "failed", st
        desc = st.get("error-desc", "")
    else:
        desc = r["error"]["desc"]
    assert "postcopy-ram is not supported" in desc, desc
    assert vm.cmd("query-status")["status"] == "running"


def test_pages_converted_during_migration_are_sent_again(vms, workdir):
    # A paused guest dirties nothing: only pagenc's change callback can
    # make pages go out a second time.
    src = vms("src", ["-object", "pagenc,id=pe0,require-ready=off,x-testing=on", "-S"])
    src.cmd("migrate-set-capabilities",
            capabilities=[{"capability": "pause-before-switchover", "state": True}])
    path = workdir / "vm.mig"
    src.cmd("migrate", uri=f"file:{path}")
    src.wait_for(lambda: src.cmd("query-migrate")["status"] == "pre-switchover",
                 "pre-switchover")
    first = src.pagenc()
    enc1, sh1 = first["pages-sent-encrypted"], first["pages-sent-shared"]
    assert enc1 >= 256 * MiB // PAGE - 64      # the whole of pc.ram went out once

    n = 100
    assert src.map(32 * MiB, n, 0) == 0          # converted after being sent
    src.cmd("migrate-continue", state="pre-switchover")
    st = src.wait_migration()
    assert st["status"] == "completed", st
    last = src.pagenc()
    assert last["pages-sent-shared"] == sh1 + n, (first, last)
    assert last["pages-sent-encrypted"] == enc1, (first, last)


def test_memory_hotplug_updates_layout(vms):
    q = vms("hp", ["-object", "pagenc,id=pe0,x-testing=on"], mem="256,slots=2,maxmem=1G")
    before = q.pagenc()["ram-bytes"]
    q.cmd("object-add", **{"qom-type": "memory-backend-ram", "id": "m1",
                           "size": 128 * MiB})
    q.cmd("device_add", driver="pc-dimm", id="dimm1", memdev="m1")
    q.wait_for(lambda: q.pagenc()["ram-bytes"] == before + 128 * MiB, "layout grown")
    addr = q.cmd("qom-get", path="/machine/peripheral/dimm1", property="addr")
    assert addr >= 4 * GiB
    assert q.map(addr, 16, 0) == 0
    info = q.pagenc()
    assert ranges(info) == [(addr, 16 * PAGE)]
    assert info["clipped-pages"] == 0


# --------------------------------------------------------------------------
# A real guest: MSR_KVM_MIGRATION_CONTROL through KVM_EXIT_X86_{WR,RD}MSR
# (MSR exits work on this kind of host; hypercalls do not, so no VMMCALL).
# --------------------------------------------------------------------------

def msr_option_rom() -> bytes:
    """A 512-byte option ROM SeaBIOS runs at start (-option-rom), in real mode
    at CPL 0: CPUID 0x40000001 ('C' if EAX bits 16 and 17 are set, 'c' if
    not), WRMSR 2 (reserved: #GP; the handler prints 'G' and skips the
    instruction), WRMSR 1 (KVM_MIGRATION_READY), RDMSR and print 'R' if it
    reads 1 ('X' otherwise), on port 0xe9; then back to the BIOS."""
    code = bytearray([0x55, 0xAA, 0x01, 0xEB, 0x00])   # signature, 1 block, jmp entry
    fix = {}

    def emit(*b):
        code.extend(b)

    emit(0x66, 0x60, 0x1E, 0x06)                 # pushad; push ds; push es
    emit(0x66, 0xB8, 0x01, 0x00, 0x00, 0x40)     # mov eax,0x40000001
    emit(0x0F, 0xA2)                             # cpuid
    emit(0x66, 0xC1, 0xE8, 0x10)                 # shr eax,16
    emit(0x83, 0xE0, 0x03, 0x83, 0xF8, 0x03)     # and ax,3; cmp ax,3
    emit(0xB0, ord("c"), 0x75, 0x02)             # mov al,'c'; jne +2
    emit(0xB0, ord("C"), 0xE6, 0xE9)             # mov al,'C'; out 0xe9,al
    emit(0x31, 0xC0, 0x8E, 0xD8)                 # xor ax,ax; mov ds,ax
    emit(0xFF, 0x36, 0x34, 0x00, 0xFF, 0x36, 0x36, 0x00)   # save IVT[13]
    emit(0xC7, 0x06, 0x34, 0x00); fix["handler"] = len(code); emit(0, 0)
    emit(0x8C, 0x0E, 0x36, 0x00)                 # mov [0x36],cs
    emit(0x66, 0xB9, 0x08, 0x4D, 0x56, 0x4B)     # mov ecx,0x4b564d08
    emit(0x66, 0x31, 0xD2)                       # xor edx,edx
    emit(0x66, 0xB8, 0x02, 0, 0, 0, 0x0F, 0x30)  # mov eax,2; wrmsr  -> #GP
    emit(0x66, 0xB8, 0x01, 0, 0, 0, 0x0F, 0x30)  # mov eax,1; wrmsr
    emit(0x66, 0x31, 0xC0, 0x0F, 0x32)           # xor eax,eax; rdmsr
    emit(0x66, 0x83, 0xF8, 0x01)                 # cmp eax,1
    emit(0x75, 0x06)                             # jne bad
    emit(0xB0, ord("R"), 0xE6, 0xE9)             # mov al,'R'; out 0xe9,al
    emit(0xEB, 0x04)                             # jmp restore
    emit(0xB0, ord("X"), 0xE6, 0xE9)             # bad: mov al,'X'; out 0xe9,al
    emit(0x8F, 0x06, 0x36, 0x00, 0x8F, 0x06, 0x34, 0x00)   # restore IVT[13]
    emit(0x07, 0x1F, 0x66, 0x61, 0xCB)           # pop es; pop ds; popad; retf
    handler = len(code)
    emit(0xB0, ord("G"), 0xE6, 0xE9)             # handler: mov al,'G'; out 0xe9,al
    emit(0x55, 0x89, 0xE5)                       # push bp; mov bp,sp
    emit(0x83, 0x46, 0x02, 0x02)                 # add word [bp+2],2 (skip wrmsr)
    emit(0x5D, 0xCF)                             # pop bp; iret
    code[fix["handler"]:fix["handler"] + 2] = struct.pack("<H", handler)
    rom = bytearray(code) + bytearray(512 - len(code))
    rom[-1] = (-sum(rom)) & 0xFF                 # checksum
    return bytes(rom)


@pytest.mark.skipif(ACCEL != "kvm", reason="the MSR filter exists only with -accel kvm")
def test_guest_msr_writes_reach_pagenc(vms, workdir):
    rom = workdir / "msr.rom"
    rom.write_bytes(msr_option_rom())
    out = workdir / "debugcon.txt"
    q = vms("guest", ["-object", "pagenc,id=pe0,x-testing=on", "-option-rom", str(rom),
                      "-chardev", f"file,id=dbg,path={out}",
                      "-device", "isa-debugcon,iobase=0xe9,chardev=dbg",
                      "-trace", "pagenc_*msr"])
    q.wait_for(lambda: out.exists() and len(out.read_bytes()) >= 3, "the guest's output", 30)
    # CPUID bits set, #GP for bit 1, then READY read back.
    assert out.read_bytes() == b"CGR"
    info = q.pagenc()
    assert info["ready"] is True and info["migration-control"] == 1
    assert info["msr-writes"] == 1
    assert info["rejected"]["reserved-msr-bits"] == 1
    q.wait_for(lambda: not q.pagenc()["migration-blocked"], "blocker removed by the guest")
    q.kill()
    err = q.stderr()
    assert "pagenc_wrmsr id=pe0 value=0x2 result=3" in err, err
    assert "pagenc_wrmsr id=pe0 value=0x1 result=0" in err, err
    assert "pagenc_rdmsr id=pe0 result=0 value=0x1" in err, err


@pytest.mark.skipif(ACCEL != "kvm", reason="the MSR filter exists only with -accel kvm")
def test_guest_msr_without_object_is_unknown(vms, workdir):
    # Upstream behaviour: no CPUID bits, no filter: the MSR does not exist and
    # every access #GPs.
    rom = workdir / "msr.rom"
    rom.write_bytes(msr_option_rom())
    out = workdir / "debugcon.txt"
    q = vms("guest", ["-option-rom", str(rom),
                      "-chardev", f"file,id=dbg,path={out}",
                      "-device", "isa-debugcon,iobase=0xe9,chardev=dbg"])
    q.wait_for(lambda: out.exists() and len(out.read_bytes()) >= 5, "the guest's output", 30)
    assert out.read_bytes() == b"cGGGX"


@pytest.mark.skipif(ACCEL != "kvm", reason="the MSR filter exists only with -accel kvm")
@pytest.mark.parametrize("args", [
    ["-object", "pagenc,id=pe0,cpuid=off,x-testing=on"],
    # the CPU model turns one bit off (patch 17): the guest's CPUID follows it
    ["-object", "pagenc,id=pe0,x-testing=on", "-cpu", "qemu64,-kvm-migration-control"],
])
def test_guest_cpuid_off(vms, workdir, args):
    rom = workdir / "msr.rom"
    rom.write_bytes(msr_option_rom())
    out = workdir / "debugcon.txt"
    q = vms("guest", args + ["-option-rom", str(rom),
                             "-chardev", f"file,id=dbg,path={out}",
                             "-device", "isa-debugcon,iobase=0xe9,chardev=dbg"])
    q.wait_for(lambda: out.exists() and len(out.read_bytes()) >= 3, "the guest's output", 30)
    assert out.read_bytes() == b"cGR"             # bits hidden, the MSR still handled
    q.kill()
    assert "the guest will never report that it is ready" in q.stderr()


def test_refused_stream_leaves_source_running(vms, workdir):
    # Live migration over a socket with the return path: the destination
    # (no pagenc object) refuses the "pagenc" section, the source goes on.
    sock = workdir / "mig.sock"
    dst = vms("dst", ["-incoming", "defer"])
    dst.cmd("migrate-set-capabilities",
            capabilities=[{"capability": "return-path", "state": True}])
    dst.cmd("migrate-incoming", uri=f"unix:{sock}")
    src = vms("src", ["-object", "pagenc,id=pe0,require-ready=off,x-testing=on"])
    src.map(16 * MiB, 8, 0)
    src.cmd("migrate-set-capabilities",
            capabilities=[{"capability": "return-path", "state": True}])
    src.cmd("migrate", uri=f"unix:{sock}")
    st = src.wait_migration()
    assert st["status"] == "failed", st
    src.wait_for(lambda: src.cmd("query-status")["status"] == "running", "source running")
    assert ranges(src.pagenc()) == [(16 * MiB, 8 * PAGE)]
    dst.wait_exit()
    assert "Unknown section or instance 'pagenc'" in dst.stderr()


def test_live_migration_between_two_qemus(vms, workdir):
    migrate_list_between_two_qemus(vms, workdir)


@pytest.mark.skipif(ACCEL != "kvm", reason="only KVM sets up exits at VM creation")
def test_kvm_object_add_at_runtime_is_refused(vms):
    q = vms("plain", [])
    err = q.error("object-add", **{"qom-type": "pagenc", "id": "pe0"})
    assert "must be created on the command line" in err.desc, err.desc
    assert "no pagenc object" in q.error("query-pagenc").desc


# --------------------------------------------------------------------------
# query-pagenc stays bounded whatever the guest does (review finding 8)
# --------------------------------------------------------------------------

def test_query_is_bounded_and_pages_through_ranges(vm):
    # 5000 one-page ranges (every other page), more than one reply holds.
    n = 5000
    base = 16 * MiB
    for i in range(n):
        assert vm.map(base + 2 * i * PAGE, 1, 0) == 0
    plain = vm.cmd("query-pagenc")
    assert "ranges" not in plain and "ranges-next" not in plain   # opt-in
    assert plain["shared-ranges"] == n
    first = vm.pagenc()
    assert len(first["ranges"]) == 4096 and "ranges-next" in first
    got = [(r["gpa"], r["size"]) for r in first["ranges"]]
    info = first
    while "ranges-next" in info:
        info = vm.pagenc(start=info["ranges-next"], **{"max-ranges": 700})
        assert len(info["ranges"]) <= 700
        got += [(r["gpa"], r["size"]) for r in info["ranges"]]
    assert got == [(base + 2 * i * PAGE, PAGE) for i in range(n)]
    for bad in (0, 4097):
        err = vm.error("query-pagenc", ranges=True, **{"max-ranges": bad})
        assert "max-ranges is" in err.desc and "between 1 and 4096" in err.desc
    text = vm.hmp("info pagenc")              # at most one reply's worth, too
    assert text.count(" pages)") == 4096 and "query-pagenc pages through them" in text


# --------------------------------------------------------------------------
# Migration correctness (review findings 4, 5, 12, 15): the list is device
# state, saved with the VM stopped; the blocker follows the guest after a
# cancelled migration; pagenc's reasons reach query-migrate.
# --------------------------------------------------------------------------

def shared_and_ready(q):
    q.map(16 * MiB, 8, 0)
    q.map(64 * MiB, 512, ATTR_2M)
    q.set_mc(1)
    q.wait_for(lambda: not q.pagenc()["migration-blocked"], "unblocked")
    return ranges(q.pagenc())


def load_file(vms, workdir, path, name="dst", args=("-object", "pagenc,id=pe0,x-testing=on")):
    dst = vms(name, list(args) + ["-incoming", "defer"])
    dst.cmd("migrate-incoming", uri=f"file:{path}", **{"exit-on-error": False})
    st = dst.wait_for(lambda: (lambda s: s if s.get("status") in ("completed", "failed")
                               else None)(dst.cmd("query-migrate")), "incoming migration")
    assert st["status"] == "completed", (st, dst.stderr())
    return dst


def test_background_snapshot_carries_the_list(vms, workdir):
    src = vms("src", ["-object", "pagenc,id=pe0,x-testing=on"])
    want = shared_and_ready(src)
    src.cmd("migrate-set-capabilities",
            capabilities=[{"capability": "background-snapshot", "state": True}])
    path = workdir / "snap.mig"
    r = src.raw("migrate", uri=f"file:{path}")
    if "error" in r and "not supported" in r["error"]["desc"]:
        pytest.skip(f"background snapshots unsupported here: {r['error']['desc']}")
    assert "error" not in r, r
    st = src.wait_migration()
    assert st["status"] == "completed", st
    assert src.cmd("query-status")["status"] == "running"
    dst = load_file(vms, workdir, path)
    got = dst.pagenc()
    assert ranges(got) == want and got["ready"] is True


def test_savevm_loadvm_carries_the_list(vms, workdir):
    import subprocess
    disk = workdir / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    drive = ["-drive", f"if=none,id=d0,format=qcow2,file={disk}"]
    src = vms("src", ["-object", "pagenc,id=pe0,x-testing=on"] + drive)
    want = shared_and_ready(src)
    out = src.hmp("savevm s1")
    assert "Error" not in out, out
    src.kill()
    dst = vms("dst", ["-object", "pagenc,id=pe0,x-testing=on", "-S"] + drive)
    out = dst.hmp("loadvm s1")
    assert "Error" not in out, out
    got = dst.pagenc()
    assert ranges(got) == want and got["ready"] is True


def start_held_migration(vm, workdir):
    """A migration that waits before the switchover (pause-before-switchover)."""
    vm.cmd("migrate-set-capabilities",
           capabilities=[{"capability": "pause-before-switchover", "state": True}])
    vm.cmd("migrate", uri=f"file:{workdir / 'held.mig'}")
    vm.wait_for(lambda: vm.cmd("query-migrate")["status"] == "pre-switchover",
                "pre-switchover")


def test_blocker_comes_back_after_a_cancelled_migration(vms, workdir):
    src = vms("src", ["-object", "pagenc,id=pe0,x-testing=on"])
    shared_and_ready(src)
    start_held_migration(src, workdir)
    assert src.set_mc(0) is True               # withdrawn while the migration runs
    src.cmd("migrate_cancel")
    src.wait_for(lambda: src.cmd("query-migrate")["status"] == "cancelled", "cancelled")
    # v1 left no blocker here; the next migration then sent all RAM and failed late.
    src.wait_for(lambda: src.pagenc()["migration-blocked"], "blocker back after cancel")
    err = src.error("migrate", uri="exec:cat >/dev/null")
    assert "pagenc 'pe0'" in err.desc and "KVM_MIGRATION_READY" in err.desc, err.desc


def test_readiness_withdrawn_during_migration_fails_it_with_pagenc_reason(vms, workdir):
    src = vms("src", ["-object", "pagenc,id=pe0,x-testing=on"])
    shared_and_ready(src)
    start_held_migration(src, workdir)
    assert src.set_mc(0) is True
    src.cmd("migrate-continue", state="pre-switchover")
    st = src.wait_migration()
    assert st["status"] == "failed", st
    # query-migrate says why (v1: "Channel error: Device or resource busy" only).
    assert "pagenc 'pe0'" in st.get("error-desc", "") and \
        "KVM_MIGRATION_READY" in st["error-desc"], st
    assert src.cmd("query-status")["status"] == "running"
    src.wait_for(lambda: src.pagenc()["migration-blocked"], "blocker back")


def test_hostile_list_fits_the_derived_cap_and_goes_after_ram(vms, workdir):
    src = vms("src", ["-object", "pagenc,id=pe0,require-ready=off,x-testing=on", "-S",
                      "-trace", "savevm_section_start"])
    # A hostile list: every other page of 64 MiB shared (8192 ranges: bitmap chunks).
    for i in range(0, 16384, 2):
        src.map(i * PAGE, 1, 0)
    path = workdir / "vm.mig"
    src.cmd("migrate", uri=f"file:{path}")
    assert src.wait_migration()["status"] == "completed"
    data = path.read_bytes()
    rec = find_list_record(data)
    (length,) = struct.unpack(">I", data[rec:rec + 4])
    # One 32768-page chunk as a 4096-byte bitmap + headers, far below the cap the destination
    # derives for 256 MiB (several chunks' worth), which it then accepts below
    assert 4096 <= length < 2 * 4096
    dst = load_file(vms, workdir, path, args=("-object", "pagenc,id=pe0,require-ready=off,x-testing=on"))
    assert dst.pagenc()["shared-ranges"] == 8192
    # Finding 12: the list is device state, saved after the RAM section's last pages.
    src.kill()
    order = re.findall(r"savevm_section_start (\S+), section_id", src.stderr())
    assert "pagenc" in order and "ram" in order, order
    assert max(i for i, n in enumerate(order) if n == "ram") < order.index("pagenc"), order



# --------------------------------------------------------------------------
# Where the object may exist (review findings 7, 17, 18)
# --------------------------------------------------------------------------

@pytest.mark.parametrize("accel", ["kvm", "tcg"])
def test_object_needs_kvm_and_an_sev_guest(accel):
    if accel == "kvm" and ACCEL != "kvm":
        pytest.skip("no /dev/kvm")
    cmd = ["-object", "pagenc,id=pe0"]
    rc, err = run_qemu_expect_failure(cmd, accel=accel)
    assert rc != 0
    if accel == "kvm":
        assert "pagenc 'pe0': -object pagenc needs an SEV or SEV-ES guest" in err, err
    else:
        assert "pagenc 'pe0': -object pagenc needs KVM (accelerator 'tcg'" in err, err
    assert "x-testing=on allows it for tests" in err, err


def test_qtest_may_use_the_object_and_the_x_commands(vms):
    q = vms("qt", ["-object", "pagenc,id=pe0"], accel="qtest")
    assert q.map(16 * MiB, 2, 0) == 0
    assert q.set_mc(1) is True
    assert ranges(q.pagenc()) == [(16 * MiB, 2 * PAGE)]


def test_require_ready_changes_at_run_time(vm):
    # An operator evacuating a host overrides a guest that never became ready.
    assert vm.pagenc()["migration-blocked"] is True
    vm.cmd("qom-set", path="/objects/pe0", property="require-ready", value=False)
    assert vm.pagenc()["migration-blocked"] is False
    vm.cmd("qom-set", path="/objects/pe0", property="require-ready", value=True)
    assert vm.pagenc()["migration-blocked"] is True
    err = vm.error("migrate", uri="exec:cat >/dev/null")
    assert "KVM_MIGRATION_READY" in err.desc
