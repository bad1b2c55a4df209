"""The KVM_HC_MAP_GPA_RANGE calls a booting Linux SEV guest makes, as data.

Modelled on Linux 6.x (arch/x86/kernel/kvm.c, arch/x86/mm/mem_encrypt_amd.c,
kernel/dma/): every call is (gpa, npages, attrs) in 4 KiB pages with the 4K
page-size hint, one call per page-table leaf of the range whose encryption
changed (notify_range_enc_status_changed walks the leaves: 2 MiB leaves give
512-page calls, leaves split to 4 KiB give 1-page calls). Addresses are laid
out for a small q35 guest; they are plausible, not taken from a real boot.

Order (non-EFI boot):
  1. kvm_init_platform: every E820 RAM entry re-encrypted, .bss..decrypted
     decrypted, then MSR_KVM_MIGRATION_CONTROL = READY;
  2. per-CPU decrypted variables (apf_reason, steal_time, apic_eoi) for every
     possible CPU: 3 one-page calls each;
  3. swiotlb: the bounce pool decrypted in ascending leaves: 4K head, 2M body,
     4K tail;
  4. DMA atomic pools (DMA, DMA32, kernel), 4K leaves;
  5. dma_alloc_coherent from drivers: tens of small decrypted buffers;
  6. free_initmem: the unused tail of .bss..decrypted re-encrypted.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

PAGE = 4096
MiB = 1 << 20
ATTR_4K = 0
ATTR_ENCRYPTED = 1 << 4


@dataclass(frozen=True)
class Call:
    stage: str
    gpa: int
    npages: int
    encrypted: bool

    @property
    def attrs(self) -> int:
        return ATTR_4K | (ATTR_ENCRYPTED if self.encrypted else 0)


def _leaves(stage: str, start: int, end: int, encrypted: bool, large_ok: bool) -> list[Call]:
    """One call per page-table leaf of [start, end): 2 MiB leaves where aligned and allowed."""
    calls = []
    a = start
    while a < end:
        if large_ok and a % (2 * MiB) == 0 and a + 2 * MiB <= end:
            calls.append(Call(stage, a, 512, encrypted))
            a += 2 * MiB
        else:
            calls.append(Call(stage, a, 1, encrypted))
            a += PAGE
    return calls


def e820_ram(mem_bytes: int) -> list[tuple[int, int]]:
    """SeaBIOS's E820 RAM entries for a q35 guest below 4 GiB: low 639 KiB, then 1 MiB up."""
    return [(0, 0x9FC00), (0x100000, mem_bytes - 0x100000)]


def boot_sequence(mem_bytes: int, possible_cpus: int = 4, coherent: int = 40,
                  seed: int = 1) -> tuple[list[Call], list[Call]]:
    """The calls before READY and the calls after it, for a guest with `mem_bytes` of RAM."""
    assert mem_bytes >= 128 * MiB, "the layout below needs at least 128 MiB"
    rng = random.Random(seed)
    before: list[Call] = []
    for addr, size in e820_ram(mem_bytes):
        pfn = addr // PAGE
        before.append(Call("e820 re-encrypt", pfn * PAGE, -(-size // PAGE), True))
    # .bss..decrypted: 2 MiB aligned section in the kernel image (loaded at 16 MiB).
    bss_dec = 0x03A00000
    bss_dec_size = 2 * MiB
    before.append(Call(".bss..decrypted", bss_dec, bss_dec_size // PAGE, False))

    after: list[Call] = []
    # Per-CPU areas near the top of RAM, 256 KiB units.
    percpu_base = mem_bytes - 16 * MiB
    for cpu in range(possible_cpus):
        unit = percpu_base + cpu * 0x40000
        for off in (0x1000, 0x2000, 0x3000):  # apf_reason, steal_time, apic_eoi
            after.append(Call(f"per-cpu {cpu}", unit + off, 1, False))
    # swiotlb: 6 % of RAM clamped to [64 MiB, 1 GiB] in Linux; a small demo guest
    # gets RAM/8 (what fits) of 2M body, with 4 pages on either side so the pool has
    # a 4K head and a 4K tail around its ascending 2M calls.
    pool_size = max(4 * MiB, min(max(mem_bytes * 6 // 100, 64 * MiB), 1 << 30, mem_bytes // 8))
    pool_size -= pool_size % (2 * MiB)
    pool_start = mem_bytes // 2 - 4 * PAGE
    pool_end = mem_bytes // 2 + pool_size + 4 * PAGE
    after += _leaves("swiotlb", pool_start, pool_end, False, large_ok=True)
    # DMA atomic pools: 128 KiB each, direct map split to 4K leaves.
    for i, name in enumerate(("dma pool DMA", "dma pool DMA32", "dma pool kernel")):
        base = 0x05000000 + i * 0x100000
        after += _leaves(name, base, base + 128 * 1024, False, large_ok=False)
    # Coherent allocations: 1..16 pages each in a driver heap.
    heap = 0x06000000
    for i in range(coherent):
        n = rng.choice((1, 1, 2, 4, 8, 16))
        after += _leaves(f"coherent #{i}", heap, heap + n * PAGE, False, large_ok=False)
        heap += (n + rng.randrange(1, 8)) * PAGE
    # free_initmem: the unused tail of .bss..decrypted goes back to encrypted.
    used = 0x1C0000
    after += _leaves(".bss..decrypted tail", bss_dec + used, bss_dec + bss_dec_size, True,
                     large_ok=False)
    return before, after


class Churn:
    """Coherent alloc/free churn for the live phase: decrypt a buffer, later re-encrypt it.

    Keeps a model of what it made shared so the final expected list is known.
    """

    def __init__(self, base: int, size: int, seed: int = 7):
        self.base = base
        self.pages = size // PAGE
        self.rng = random.Random(seed)
        self.live: list[tuple[int, int]] = []

    def next_call(self) -> Call:
        if self.live and (len(self.live) > 24 or self.rng.random() < 0.45):
            gpa, n = self.live.pop(self.rng.randrange(len(self.live)))
            return Call("churn free", gpa, n, True)
        n = self.rng.choice((1, 1, 1, 2, 4, 8))
        gpa = self.base + self.rng.randrange(self.pages - n) * PAGE
        self.live.append((gpa, n))
        return Call("churn alloc", gpa, n, False)


def expected_shared(calls: list[Call]) -> list[tuple[int, int]]:
    """Apply calls in order to a page model; the shared ranges as (start, end) gpa pairs."""
    shared: set[int] = set()
    for c in calls:
        pfns = range(c.gpa // PAGE, c.gpa // PAGE + c.npages)
        if c.encrypted:
            shared.difference_update(pfns)
        else:
            shared.update(pfns)
    out: list[tuple[int, int]] = []
    for pfn in sorted(shared):
        if out and out[-1][1] == pfn * PAGE:
            out[-1] = (out[-1][0], (pfn + 1) * PAGE)
        else:
            out.append((pfn * PAGE, (pfn + 1) * PAGE))
    return out
