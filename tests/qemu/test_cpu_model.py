"""pagenc's CPUID bits through the CPU model (review finding 16) and the
accelerator fallback (issue 13, section 3).

KVM_FEATURE_HC_MAP_GPA_RANGE (bit 16) and KVM_FEATURE_MIGRATION_CONTROL
(bit 17) of CPUID 0x40000001 EAX are the CPU features kvm-hc-map-gpa-range
and kvm-migration-control.  QEMU implements them (through pagenc), so KVM
reports them as supported only when the pagenc object is there with
cpuid=on (the default); named CPU models then have them on by default, and
-cpu ...,-kvm-migration-control, kvm=off or cpuid=off turn them off (with a
warning: the guest can then never say it is ready).
"""

from __future__ import annotations

import subprocess

import pytest

from conftest import ACCEL, BIOS, QEMU

BITS = ("kvm-hc-map-gpa-range", "kvm-migration-control")
KVM_ONLY = pytest.mark.skipif(ACCEL != "kvm", reason="KVM's supported CPUID only with -accel kvm")
OBJ = "pagenc,id=pe0,x-testing=on"
NO_READY_WARNING = "will never report that it is ready"


def expansion(q, model: str = "qemu64") -> dict:
    return q.cmd("query-cpu-model-expansion", type="full", model={"name": model})["model"]["props"]


def vcpu_props(q) -> dict:
    path = q.cmd("query-cpus-fast")[0]["qom-path"]
    return {b: q.cmd("qom-get", path=path, property=b) for b in BITS}


def run_qemu(args: list[str], accels: list[str], timeout: float = 30.0) -> tuple[int, str]:
    """QEMU with the given -accel options in order and -S: (exit code, stderr).
    A QEMU that starts is told to quit over HMP (stdin) after its checks."""
    cmd = [str(QEMU), "-machine", "q35", "-nographic", "-nodefaults", "-L", BIOS,
           "-m", "256", "-serial", "none", "-monitor", "stdio", "-S"]
    for a in accels:
        cmd += ["-accel", a]
    cmd += args
    p = subprocess.run(cmd, input=b"info status\nquit\n", capture_output=True,
                       timeout=timeout, start_new_session=True)
    return p.returncode, p.stderr.decode(errors="replace") + p.stdout.decode(errors="replace")


def test_bits_are_named_in_the_cpu_model(vms):
    # Named in feat_names of FEAT_KVM on every accelerator: the expansion
    # lists them (off where nothing implements them).
    q = vms("names", [])
    props = expansion(q)
    for b in BITS:
        assert props[b] is False, props


@KVM_ONLY
@pytest.mark.parametrize("args,want", [
    (["-object", OBJ], True),
    (["-object", "pagenc,id=pe0,cpuid=off,x-testing=on"], False),
    ([], False),
    (["-object", OBJ, "-cpu", "qemu64,-kvm-migration-control"], None),
    (["-object", OBJ, "-cpu", "host"], True),
])
def test_query_cpu_model_expansion(vms, args, want):
    q = vms("cm", args)
    props = expansion(q)
    if want is None:
        # -cpu flags are global properties of the model: the expansion sees them too
        only_map = {"kvm-hc-map-gpa-range": True, "kvm-migration-control": False}
        assert {b: props[b] for b in BITS} == only_map, props
        assert vcpu_props(q) == only_map
        q.kill()
        assert NO_READY_WARNING in q.stderr(), q.stderr()
        return
    for b in BITS:
        assert props[b] is want, (b, props)
    assert vcpu_props(q) == {b: want for b in BITS}
    if "cpuid=off" in " ".join(args):
        q.kill()
        assert NO_READY_WARNING in q.stderr(), q.stderr()


# A named model this (PVM) host runs with enforce: qemu64 and kvm64 ask for pni,
# which the host does not offer.
ENFORCE_MODEL = "pentium3"


@KVM_ONLY
def test_enforce_knows_the_bits():
    m = ENFORCE_MODEL
    rc, out = run_qemu(["-cpu", f"{m},enforce"], ["kvm"])
    assert rc == 0 and "VM status: paused" in out, out   # the control: the model runs here
    # Without the object nothing implements them: enforce refuses to start.
    rc, out = run_qemu(["-cpu", f"{m},+kvm-migration-control,enforce"], ["kvm"])
    assert rc != 0, out
    assert "kvm-migration-control" in out and "bit 17" in out, out
    # Without enforce they are filtered out with a warning.
    rc, out = run_qemu(["-cpu", f"{m},+kvm-hc-map-gpa-range"], ["kvm"])
    assert rc == 0, out
    assert "kvm-hc-map-gpa-range" in out and "bit 16" in out, out
    # With the object the same CPU starts, and the model's default is on.
    for cpu in (f"{m},+kvm-migration-control,+kvm-hc-map-gpa-range,enforce", f"{m},enforce",
                "host,enforce"):
        rc, out = run_qemu(["-object", OBJ, "-cpu", cpu], ["kvm"])
        assert rc == 0, (cpu, out)
        assert "VM status: paused" in out, out
        assert "warning" not in out, out


@KVM_ONLY
def test_kvm_off_hides_the_bits_and_says_so(vms):
    q = vms("kvmoff", ["-object", OBJ, "-cpu", "qemu64,kvm=off"])
    q.cmd("query-status")
    q.kill()
    assert NO_READY_WARNING in q.stderr(), q.stderr()


# --------------------------------------------------------------------------
# -accel kvm:tcg must not fall back to TCG with the object
# --------------------------------------------------------------------------

# KVM's initialisation fails on any host with this build: Xen emulation is
# not in its devices file, so kvm_arch_init() refuses xen-version
# ("Xen support not enabled in qemu") and QEMU tries the next accelerator.
KVM_FAILS = "kvm,xen-version=0x40011"


@KVM_ONLY
def test_kvm_tcg_fallback_control():
    # Negative control: without the object QEMU does fall back to TCG here.
    rc, out = run_qemu([], [KVM_FAILS, "tcg"])
    assert rc == 0, out
    assert "failed to initialize kvm" in out and "falling back to tcg" in out, out
    assert "VM status: paused" in out, out


@KVM_ONLY
@pytest.mark.parametrize("obj", [OBJ, "pagenc,id=pe0"])
def test_kvm_tcg_fallback_is_refused(obj):
    rc, out = run_qemu(["-object", obj], [KVM_FAILS, "tcg"])
    assert rc != 0, out
    assert ("pagenc 'pe0': accelerator 'kvm' could not be initialized and QEMU fell back "
            "to 'tcg'") in out, out
    assert "VM status" not in out, out


@KVM_ONLY
def test_legacy_kvm_tcg_with_an_sev_guest_on_a_host_without_sev():
    # The configuration pagenc is for, written with the legacy accel=kvm:tcg,
    # on a host without SEV: the sev-guest makes KVM's initialisation fail,
    # and QEMU must not run the guest on TCG.
    cmd = [str(QEMU), "-machine", "q35,accel=kvm:tcg,confidential-guest-support=sev0",
           "-nographic", "-nodefaults", "-L", BIOS, "-m", "256", "-serial", "none",
           "-monitor", "stdio", "-S",
           "-object", "sev-guest,id=sev0,cbitpos=47,reduced-phys-bits=1",
           "-object", "pagenc,id=pe0"]
    p = subprocess.run(cmd, input=b"info status\nquit\n", capture_output=True, timeout=30,
                       start_new_session=True)
    out = p.stderr.decode(errors="replace") + p.stdout.decode(errors="replace")
    assert p.returncode != 0, out
    assert "VM status" not in out, out
    assert "fell back to 'tcg'" in out, out
