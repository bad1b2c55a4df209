/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * A guest's page-encryption list, through the C API only: a Q35-like layout
 * (RAM 0..2 GiB and 4 GiB..6 GiB around the PCI hole), the calls a Linux SEV
 * guest under OVMF makes while it boots, then everything a VMM reads back:
 * the run iterator, the cursor walk, point queries, statistics, hotplug and
 * reset. The expected list is written out by hand below.
 */
#include <stdlib.h>

#include "check.h"

static const struct pagenc_ram_range q35[] = {
    { .gpa = 0, .size = 2 * GIB },
    { .gpa = 4 * GIB, .size = 2 * GIB },
};

/* The shared ranges the call sequence in main() must leave, ascending. */
struct range {
    uint64_t gpa, npages;
};
static const struct range expected[] = {
    { 0x3000000, 512 },           /* .bss..decrypted */
    { 0x70000000, 16384 },        /* swiotlb, 64 MiB in 2 MiB calls */
    { 0x7f000000, 2 },            /* per-CPU pages of CPUs 0..3 */
    { 0x7f040000, 2 },
    { 0x7f080000, 2 },
    { 0x7f0c0000, 2 },
    { 2 * GIB - 0x8000, 8 },      /* RAM part of a call across the PCI hole */
    { 4 * GIB, 8 },
    { 4 * GIB + 0x100000, 16 },   /* DMA buffer, re-encrypted in the middle */
    { 4 * GIB + 0x120000, 224 },
};
#define NEXPECTED (sizeof(expected) / sizeof(expected[0]))
#define EXPECTED_SHARED_PAGES (512 + 16384 + 8 + 8 + 8 + 16 + 224)

static int model_shared(uint64_t gpa)
{
    for (size_t i = 0; i < NEXPECTED; i++) {
        if (gpa >= expected[i].gpa && gpa < expected[i].gpa + expected[i].npages * PAGE)
            return 1;
    }
    return 0;
}

static uint64_t hypercalls;

static void share(pagenc_tracker *t, uint64_t gpa, uint64_t npages, uint64_t attrs)
{
    uint64_t ret = 0xdead;
    hypercalls++;
    CHECK_RC(pagenc_map_gpa_range(t, gpa, npages, attrs, &ret), PAGENC_RESULT_OK);
    CHECK_U64(ret, 0);
}

static void boot_sequence(pagenc_tracker *t)
{
    /* Linux marks every E820 RAM entry encrypted, one call each: no change. */
    share(t, 0, 2 * GIB / PAGE, KVM_MAP_GPA_RANGE_ENCRYPTED);
    share(t, 4 * GIB, 2 * GIB / PAGE, KVM_MAP_GPA_RANGE_ENCRYPTED);
    /* OVMF reports MMIO and absent memory as decrypted: the PCI hole, and a
     * range of 2^36 pages (256 TiB) far above RAM. Accepted, not stored. */
    share(t, 3 * GIB, GIB / PAGE, 0);
    share(t, 1ull << 44, 1ull << 36, 0);
    /* .bss..decrypted */
    share(t, 0x3000000, 512, 0);
    /* per-CPU pages (steal time, apf reason, ...), two adjacent calls each */
    for (uint64_t cpu = 0; cpu < 4; cpu++) {
        share(t, 0x7f000000 + cpu * 0x40000, 1, 0);
        share(t, 0x7f000000 + cpu * 0x40000 + PAGE, 1, 0);
    }
    /* swiotlb: 64 MiB in ascending 2 MiB calls, with the 4K hint Linux uses */
    for (uint64_t off = 0; off < 64 * MIB; off += 2 * MIB)
        share(t, 0x70000000 + off, 512, 0);
    /* a DMA buffer above 4 GiB, then 16 pages in its middle re-encrypted */
    share(t, 4 * GIB + 0x100000, 256, 0);
    share(t, 4 * GIB + 0x110000, 16, KVM_MAP_GPA_RANGE_ENCRYPTED | KVM_MAP_GPA_RANGE_PAGE_SZ_2M);
    /* one call across the PCI hole: only its RAM ends are stored */
    share(t, 2 * GIB - 0x8000, (2 * GIB + 0x10000) / PAGE, 0);
}

static void check_runs(pagenc_tracker *t)
{
    pagenc_iter *it = NULL;
    struct pagenc_run run;
    uint64_t next = 0, nshared = 0;
    int last_encrypted = 0, first = 1, ok_runs = 1;
    size_t i = 0;

    /* every run of all guest-physical space: alternating, contiguous */
    CHECK_RC(pagenc_iter_new(t, 0, PAGENC_GPA_LIMIT, 0, &it), PAGENC_RESULT_OK);
    while (pagenc_iter_next(it, &run)) {
        ok_runs &= run.gpa == next && run.npages > 0;
        ok_runs &= first || run.encrypted != last_encrypted;
        if (!run.encrypted) {
            ok_runs &= i < NEXPECTED && run.gpa == expected[i].gpa &&
                       run.npages == expected[i].npages;
            i++;
            nshared += run.npages;
        }
        first = 0;
        last_encrypted = run.encrypted;
        next = run.gpa + run.npages * PAGE;
    }
    CHECK(ok_runs);
    CHECK_U64(i, NEXPECTED);
    CHECK_U64(nshared, EXPECTED_SHARED_PAGES);
    CHECK_U64(next, PAGENC_GPA_LIMIT);
    CHECK(last_encrypted);
    CHECK_RC(pagenc_iter_result(it), PAGENC_RESULT_OK);
    CHECK(!pagenc_iter_next(it, &run)); /* stays at its end */
    pagenc_iter_free(it);

    /* shared runs only: exactly the expected list */
    i = 0;
    ok_runs = 1;
    CHECK_RC(pagenc_iter_new(t, 0, 8 * GIB, PAGENC_ITER_SHARED_ONLY, &it), PAGENC_RESULT_OK);
    while (pagenc_iter_next(it, &run)) {
        ok_runs &= i < NEXPECTED && !run.encrypted && run.gpa == expected[i].gpa &&
                   run.npages == expected[i].npages;
        i++;
    }
    CHECK(ok_runs);
    CHECK_U64(i, NEXPECTED);
    pagenc_iter_free(it);

    /* a window that starts inside one shared run and ends inside another */
    static const struct pagenc_run window[] = {
        { 0x70005000, 16384 - 5, false },
        { 0x74000000, (0x7f000000 - 0x74000000) / PAGE, true },
        { 0x7f000000, 2, false },
        { 0x7f002000, (0x7f040000 - 0x7f002000) / PAGE, true },
        { 0x7f040000, 1, false },
    };
    i = 0;
    ok_runs = 1;
    CHECK_RC(pagenc_iter_new(t, 0x70005000, 0x7f041000, 0, &it), PAGENC_RESULT_OK);
    while (pagenc_iter_next(it, &run)) {
        ok_runs &= i < 5 && run.gpa == window[i].gpa && run.npages == window[i].npages &&
                   run.encrypted == window[i].encrypted;
        i++;
    }
    CHECK(ok_runs);
    CHECK_U64(i, 5);
    pagenc_iter_free(it);

    /* an empty range has no run */
    CHECK_RC(pagenc_iter_new(t, 0x5000, 0x5000, 0, &it), PAGENC_RESULT_OK);
    CHECK(!pagenc_iter_next(it, &run));
    CHECK_RC(pagenc_iter_result(it), PAGENC_RESULT_OK);
    pagenc_iter_free(it);
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void check_cursor(pagenc_tracker *t)
{
    pagenc_cursor *c = NULL;
    struct pagenc_run run;
    uint64_t end = 0, shared = 0, nruns = 0;

    CHECK_RC(pagenc_cursor_new(t, &c), PAGENC_RESULT_OK);

    /* The migration loop's walk: one query per run, skipping to its end. */
    for (uint64_t gpa = 0; gpa < 6 * GIB; gpa = end) {
        bool enc = pagenc_cursor_is_encrypted(c, gpa, &end);
        if (!CHECK(end > gpa))
            break;
        if (!enc) {
            shared += (end - gpa) / PAGE;
            nruns++;
        }
    }
    CHECK_U64(shared, EXPECTED_SHARED_PAGES);
    CHECK_U64(nruns, NEXPECTED);

    /* Page by page, ascending, on sampled pages: every page within 3 of a
     * range boundary plus every 97th page of RAM and of the hole. */
    size_t cap = NEXPECTED * 2 * 7 + 6 * GIB / PAGE / 97 + 1, n = 0;
    uint64_t *pages = malloc(cap * sizeof(*pages));
    if (!CHECK(pages != NULL))
        return;
    for (size_t i = 0; i < NEXPECTED; i++) {
        uint64_t b[2] = { expected[i].gpa / PAGE, expected[i].gpa / PAGE + expected[i].npages };
        for (int k = 0; k < 2; k++)
            for (uint64_t p = b[k] - 3; p <= b[k] + 3; p++)
                pages[n++] = p;
    }
    for (uint64_t p = 0; p < 6 * GIB / PAGE; p += 97)
        pages[n++] = p;
    qsort(pages, n, sizeof(*pages), cmp_u64);
    size_t mismatches = 0, checked = 0;
    for (size_t i = 0; i < n; i++) {
        if (i > 0 && pages[i] == pages[i - 1])
            continue;
        uint64_t gpa = pages[i] * PAGE + (i % 7) * 512; /* any byte of the page */
        bool by_cursor = pagenc_cursor_is_encrypted(c, gpa, NULL);
        bool by_point = pagenc_is_encrypted(t, gpa);
        mismatches += by_cursor != by_point || by_cursor != !model_shared(gpa);
        checked++;
    }
    free(pages);
    CHECK_U64(mismatches, 0);
    CHECK(checked > 16000);

    /* the structured form: the run from the page holding gpa */
    CHECK_RC(pagenc_cursor_query(c, 0x70000123, &run), PAGENC_RESULT_OK);
    CHECK_U64(run.gpa, 0x70000000);
    CHECK_U64(run.npages, 16384);
    CHECK(!run.encrypted);
    CHECK_RC(pagenc_cursor_query(c, 0x70001000, &run), PAGENC_RESULT_OK);
    CHECK_U64(run.npages, 16383);
    /* backwards is allowed too */
    CHECK_RC(pagenc_cursor_query(c, 0x1000, &run), PAGENC_RESULT_OK);
    CHECK_U64(run.gpa, 0x1000);
    CHECK_U64(run.npages, 0x3000000 / PAGE - 1);
    CHECK(run.encrypted);
    /* non-RAM reads as encrypted, up to the next shared page */
    CHECK_RC(pagenc_cursor_query(c, 3 * GIB, &run), PAGENC_RESULT_OK);
    CHECK(run.encrypted);
    CHECK_U64(run.gpa + run.npages * PAGE, 4 * GIB);

    /* a change is seen by the next query, even inside the cached run */
    CHECK(!pagenc_cursor_is_encrypted(c, 0x70000000, NULL));
    share(t, 0x70002000, 1, KVM_MAP_GPA_RANGE_ENCRYPTED);
    CHECK(pagenc_cursor_is_encrypted(c, 0x70002000, &end));
    CHECK_U64(end, 0x70003000);
    share(t, 0x70002000, 1, 0);
    CHECK(!pagenc_cursor_is_encrypted(c, 0x70002000, &end));
    CHECK_U64(end, 0x74000000);

    pagenc_cursor_free(c);
}

static void check_stats(pagenc_tracker *t)
{
    struct pagenc_stats s;
    memset(&s, 0xff, sizeof(s));
    CHECK_RC(pagenc_tracker_stats(t, &s), PAGENC_RESULT_OK);
    CHECK_U64(s.hypercalls, hypercalls);
    for (int i = 0; i < PAGENC_REJECT_REASONS; i++)
        CHECK_U64(s.rejected[i], 0);
    CHECK_U64(s.clipped_pages, (1ull << 36) + GIB / PAGE + 2 * GIB / PAGE);
    /* every flip counted once, the cursor test's two flips included */
    CHECK_U64(s.pages_flipped, 512 + 8 + 16384 + 256 + 16 + 16 + 2);
    CHECK_U64(s.shared_ranges, NEXPECTED);
    CHECK_U64(s.shared_pages, EXPECTED_SHARED_PAGES);
    CHECK_U64(s.ram_pages, 4 * GIB / PAGE);
    CHECK(s.heap_bytes > 0 && s.heap_bytes < 256 * 1024);
    CHECK_U64(s.msr_value, 1);
    CHECK_U64(s.msr_writes, 1);
}

static void check_hotplug(pagenc_tracker *t)
{
    const struct pagenc_ram_range with_dimm[] = {
        q35[1], q35[0], { .gpa = 8 * GIB, .size = GIB }, /* any order */
    };
    struct pagenc_stats s;

    CHECK(pagenc_is_encrypted(t, 8 * GIB));
    share(t, 8 * GIB, 16, 0); /* not RAM yet: not stored */
    CHECK(pagenc_is_encrypted(t, 8 * GIB));
    CHECK_RC(pagenc_tracker_set_layout(t, with_dimm, 3), PAGENC_RESULT_OK);
    share(t, 8 * GIB, 16, 0);
    CHECK(!pagenc_is_encrypted(t, 8 * GIB + 15 * PAGE));
    CHECK_RC(pagenc_tracker_stats(t, &s), PAGENC_RESULT_OK);
    CHECK_U64(s.ram_pages, 5 * GIB / PAGE);
    CHECK_U64(s.shared_pages, EXPECTED_SHARED_PAGES + 16);
    /* unplug: the DIMM's pages are forgotten, the rest stays */
    CHECK_RC(pagenc_tracker_set_layout(t, q35, 2), PAGENC_RESULT_OK);
    CHECK(pagenc_is_encrypted(t, 8 * GIB));
    CHECK_RC(pagenc_tracker_stats(t, &s), PAGENC_RESULT_OK);
    CHECK_U64(s.shared_pages, EXPECTED_SHARED_PAGES);
    CHECK_U64(s.shared_ranges, NEXPECTED);
}

/* An iterator and a cursor may outlive pagenc_tracker_free of their tracker. */
static void check_free_order(void)
{
    pagenc_tracker *t = NULL;
    pagenc_iter *it = NULL;
    pagenc_cursor *c = NULL;
    struct pagenc_run run;

    CHECK_RC(pagenc_tracker_new(q35, 2, &t), PAGENC_RESULT_OK);
    share(t, 0x100000, 4, 0);
    CHECK_RC(pagenc_iter_new(t, 0, 4 * GIB, PAGENC_ITER_SHARED_ONLY, &it), PAGENC_RESULT_OK);
    CHECK_RC(pagenc_cursor_new(t, &c), PAGENC_RESULT_OK);
    pagenc_tracker_free(t);
    CHECK(pagenc_iter_next(it, &run) && run.gpa == 0x100000 && run.npages == 4);
    CHECK(!pagenc_iter_next(it, &run));
    CHECK(!pagenc_cursor_is_encrypted(c, 0x101000, NULL));
    pagenc_iter_free(it);
    CHECK(pagenc_cursor_is_encrypted(c, 0x104000, NULL));
    pagenc_cursor_free(c);
}

int main(void)
{
    pagenc_tracker *t = NULL;
    uint64_t v = 7;

    CHECK_RC(pagenc_tracker_new(q35, 2, &t), PAGENC_RESULT_OK);
    if (!CHECK(t != NULL))
        return check_summary("test_guest_list");
    CHECK(pagenc_is_encrypted(t, 0));
    CHECK(!pagenc_is_ready(t));

    boot_sequence(t);
    /* the guest says it may be migrated (late, after reading an EFI variable) */
    CHECK_RC(pagenc_msr_write(t, MSR_KVM_MIGRATION_CONTROL, KVM_MIGRATION_READY),
             PAGENC_RESULT_OK);
    CHECK(pagenc_is_ready(t));
    CHECK_RC(pagenc_msr_read(t, MSR_KVM_MIGRATION_CONTROL, &v), PAGENC_RESULT_OK);
    CHECK_U64(v, KVM_MIGRATION_READY);

    check_runs(t);
    check_cursor(t);
    check_stats(t);
    check_hotplug(t);

    /* reboot: everything encrypted again, not ready */
    CHECK_RC(pagenc_tracker_reset(t), PAGENC_RESULT_OK);
    CHECK(!pagenc_is_ready(t));
    CHECK(pagenc_is_encrypted(t, 0x70000000));
    struct pagenc_stats s;
    CHECK_RC(pagenc_tracker_stats(t, &s), PAGENC_RESULT_OK);
    CHECK_U64(s.shared_pages, 0);
    CHECK_U64(s.shared_ranges, 0);
    CHECK_U64(s.msr_value, 0);

    /* no failure so far, so no message */
    char msg[8] = "junk";
    CHECK_U64(pagenc_last_error(t, msg, sizeof(msg)), 0);
    CHECK(msg[0] == '\0');

    pagenc_tracker_free(t);
    check_free_order();
    return check_summary("test_guest_list");
}
