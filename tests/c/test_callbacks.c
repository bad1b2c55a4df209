/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The change and readiness callbacks: the change callback hears exactly the
 * pages that flipped (merged into maximal ranges, ascending, only RAM), never
 * a no-op; the readiness callback hears every change of the MSR; a callback
 * that calls back into its tracker gets PAGENC_RESULT_REENTRANT instead of a
 * deadlock; and vCPU threads can update while another thread reads.
 */
#include <pthread.h>
#include <stdlib.h>

#include "check.h"

struct change {
    uint64_t gpa, npages;
    bool encrypted;
};

struct recorder {
    struct change changes[64];
    int nchanges;
    bool ready[16];
    uint64_t msr[16];
    int nready;
    /* re-entrance probe: what calls back into the tracker got */
    pagenc_tracker *tracker;
    int reenter;
    int reentrant_rc[4];
    uint64_t reentrant_hc_ret;
};

static void on_change(void *opaque, uint64_t gpa, uint64_t npages, bool encrypted)
{
    struct recorder *r = opaque;
    if (r->nchanges < 64)
        r->changes[r->nchanges] = (struct change){ gpa, npages, encrypted };
    r->nchanges++;
    if (r->reenter) {
        struct pagenc_stats s;
        r->reentrant_hc_ret = 0x5a5a;
        r->reentrant_rc[0] = pagenc_map_gpa_range(r->tracker, 0x5000, 1, 0,
                                                  &r->reentrant_hc_ret);
        r->reentrant_rc[1] = pagenc_tracker_stats(r->tracker, &s);
        r->reentrant_rc[2] = pagenc_tracker_set_change_callback(r->tracker, NULL, NULL);
        r->reentrant_rc[3] = pagenc_tracker_reset(r->tracker);
    }
}

static void on_readiness(void *opaque, bool ready, uint64_t msr_value)
{
    struct recorder *r = opaque;
    if (r->nready < 16) {
        r->ready[r->nready] = ready;
        r->msr[r->nready] = msr_value;
    }
    r->nready++;
    if (r->reenter)
        r->reentrant_rc[0] = pagenc_msr_write(r->tracker, MSR_KVM_MIGRATION_CONTROL, 0);
}

static void map(pagenc_tracker *t, uint64_t gpa, uint64_t npages, bool encrypted)
{
    CHECK_RC(pagenc_map_gpa_range(t, gpa, npages, encrypted ? KVM_MAP_GPA_RANGE_ENCRYPTED : 0,
                                  NULL),
             PAGENC_RESULT_OK);
}

/* The changes recorded since the last call are exactly `want`. */
static void expect_changes(struct recorder *r, const struct change *want, int n, int line)
{
    int ok = r->nchanges == n;
    for (int i = 0; ok && i < n; i++) {
        ok = r->changes[i].gpa == want[i].gpa && r->changes[i].npages == want[i].npages &&
             r->changes[i].encrypted == want[i].encrypted;
    }
    if (!check_(ok, "the change callback heard exactly the flipped ranges", __FILE__, line)) {
        for (int i = 0; i < r->nchanges && i < 64; i++)
            fprintf(stderr, "    heard 0x%" PRIx64 " +%" PRIu64 " %s\n", r->changes[i].gpa,
                    r->changes[i].npages, r->changes[i].encrypted ? "enc" : "shared");
    }
    r->nchanges = 0;
}

#define EXPECT(...)                                                                   \
    do {                                                                              \
        const struct change w_[] = { __VA_ARGS__ };                                   \
        expect_changes(&rec, w_, (int)(sizeof(w_) / sizeof(w_[0])), __LINE__);        \
    } while (0)
#define EXPECT_NONE() expect_changes(&rec, NULL, 0, __LINE__)

static const struct pagenc_ram_range q35[] = {
    { .gpa = 0, .size = 2 * GIB },
    { .gpa = 4 * GIB, .size = 2 * GIB },
};

static struct recorder rec;

static void changes(pagenc_tracker *t)
{
    const uint64_t a = 0x100000;

    map(t, a, 16, false);
    EXPECT({ a, 16, false });
    /* overlapping: only the new part flips */
    map(t, a + 8 * PAGE, 16, false);
    EXPECT({ a + 16 * PAGE, 8, false });
    /* the same again, and encrypting what is encrypted: nothing */
    map(t, a, 24, false);
    map(t, a + 64 * PAGE, 100, true);
    map(t, 3 * GIB, 1000, false); /* not RAM */
    EXPECT_NONE();
    /* a hole in the middle */
    map(t, a + 4 * PAGE, 2, true);
    EXPECT({ a + 4 * PAGE, 2, true });
    /* re-encrypting a span that covers both pieces and more: each piece once */
    map(t, 0, 0x400, true);
    EXPECT({ a, 4, true }, { a + 6 * PAGE, 18, true });
    /* a call across the PCI hole flips only RAM, as two ranges */
    map(t, 2 * GIB - 4 * PAGE, (2 * GIB + 8 * PAGE) / PAGE, false);
    EXPECT({ 2 * GIB - 4 * PAGE, 4, false }, { 4 * GIB, 4, false });
    /* swiotlb-style ascending calls: one callback per call, each its own pages */
    for (uint64_t i = 0; i < 4; i++)
        map(t, 0x70000000 + i * 2 * MIB, 512, false);
    EXPECT({ 0x70000000, 512, false }, { 0x70200000, 512, false },
           { 0x70400000, 512, false }, { 0x70600000, 512, false });
    /* a refused call calls nothing */
    CHECK_RC(pagenc_map_gpa_range(t, 0x70000001, 1, KVM_MAP_GPA_RANGE_ENCRYPTED, NULL),
             PAGENC_RESULT_GUEST_REJECTED);
    EXPECT_NONE();
    /* reset: every shared range, encrypted */
    CHECK_RC(pagenc_tracker_reset(t), PAGENC_RESULT_OK);
    EXPECT({ 0x70000000, 2048, true }, { 2 * GIB - 4 * PAGE, 4, true }, { 4 * GIB, 4, true });
    CHECK_RC(pagenc_tracker_reset(t), PAGENC_RESULT_OK);
    EXPECT_NONE();
}

static void readiness(pagenc_tracker *t)
{
    CHECK_RC(pagenc_msr_write(t, MSR_KVM_MIGRATION_CONTROL, KVM_MIGRATION_READY),
             PAGENC_RESULT_OK);
    CHECK_RC(pagenc_msr_write(t, MSR_KVM_MIGRATION_CONTROL, KVM_MIGRATION_READY),
             PAGENC_RESULT_OK); /* unchanged: no call */
    CHECK_RC(pagenc_msr_write(t, MSR_KVM_MIGRATION_CONTROL, 4), PAGENC_RESULT_GUEST_REJECTED);
    CHECK_RC(pagenc_msr_write(t, MSR_KVM_MIGRATION_CONTROL, 0), PAGENC_RESULT_OK);
    CHECK_RC(pagenc_msr_write(t, MSR_KVM_MIGRATION_CONTROL, KVM_MIGRATION_READY),
             PAGENC_RESULT_OK);
    CHECK_RC(pagenc_tracker_reset(t), PAGENC_RESULT_OK); /* reboot clears it */
    CHECK_RC(pagenc_tracker_reset(t), PAGENC_RESULT_OK);
    if (CHECK(rec.nready == 4)) {
        CHECK(rec.ready[0] && rec.msr[0] == 1);
        CHECK(!rec.ready[1] && rec.msr[1] == 0);
        CHECK(rec.ready[2] && rec.msr[2] == 1);
        CHECK(!rec.ready[3] && rec.msr[3] == 0);
    }
    rec.nready = 0;
}

static void reentrance(pagenc_tracker *t)
{
    struct pagenc_stats before, after;
    CHECK_RC(pagenc_tracker_stats(t, &before), PAGENC_RESULT_OK);
    rec.tracker = t;
    rec.reenter = 1;
    map(t, 0x9000, 1, false);
    /* stats.hypercalls counts every call handed in: the outer one and the
     * re-entrant one that got PAGENC_RESULT_REENTRANT (issue 10: it was not) */
    CHECK_RC(pagenc_tracker_stats(t, &after), PAGENC_RESULT_OK);
    CHECK_U64(after.hypercalls - before.hypercalls, 2);
    EXPECT({ 0x9000, 1, false });
    CHECK_RC(rec.reentrant_rc[0], PAGENC_RESULT_REENTRANT);
    CHECK_U64(rec.reentrant_hc_ret, RET_EINVAL);
    CHECK_RC(rec.reentrant_rc[1], PAGENC_RESULT_REENTRANT);
    CHECK_RC(rec.reentrant_rc[2], PAGENC_RESULT_REENTRANT);
    CHECK_RC(rec.reentrant_rc[3], PAGENC_RESULT_REENTRANT);
    CHECK_MSG(t, "callbacks");
    /* none of them happened: 0x5000 is still encrypted, the callback still set */
    CHECK(pagenc_is_encrypted(t, 0x5000));
    CHECK(!pagenc_is_encrypted(t, 0x9000));

    rec.reentrant_rc[0] = -1;
    CHECK_RC(pagenc_msr_write(t, MSR_KVM_MIGRATION_CONTROL, KVM_MIGRATION_READY),
             PAGENC_RESULT_OK);
    CHECK_RC(rec.reentrant_rc[0], PAGENC_RESULT_REENTRANT);
    CHECK(rec.nready == 1);
    CHECK(pagenc_is_ready(t)); /* the nested write of 0 did not happen */
    rec.nready = 0;
    rec.reenter = 0;

    /* a thread other than the callback's may still use the tracker afterwards */
    map(t, 0x9000, 1, true);
    EXPECT({ 0x9000, 1, true });
}

static void removal(pagenc_tracker *t)
{
    CHECK_RC(pagenc_tracker_set_change_callback(t, NULL, NULL), PAGENC_RESULT_OK);
    CHECK_RC(pagenc_tracker_set_readiness_callback(t, NULL, NULL), PAGENC_RESULT_OK);
    map(t, 0xa000, 1, false);
    CHECK_RC(pagenc_msr_write(t, MSR_KVM_MIGRATION_CONTROL, 0), PAGENC_RESULT_OK);
    EXPECT_NONE();
    CHECK(rec.nready == 0);
    CHECK(!pagenc_is_encrypted(t, 0xa000));
}

/* vCPU threads update disjoint areas while this thread iterates and walks a
 * cursor; the change callback (under the tracker's lock) counts the flips. */
#define THREADS 4
#define CALLS 500

struct worker {
    pagenc_tracker *t;
    uint64_t base;
    int failures;
};

static void *vcpu(void *arg)
{
    struct worker *w = arg;
    for (uint64_t i = 0; i < CALLS; i++) {
        uint64_t ret = 1;
        /* share two pages, re-encrypt the second: one shared page per call */
        if (pagenc_map_gpa_range(w->t, w->base + i * 4 * PAGE, 2, 0, &ret) != PAGENC_RESULT_OK ||
            ret != 0)
            w->failures++;
        if (pagenc_map_gpa_range(w->t, w->base + i * 4 * PAGE + PAGE, 1,
                                 KVM_MAP_GPA_RANGE_ENCRYPTED, &ret) != PAGENC_RESULT_OK ||
            ret != 0)
            w->failures++;
    }
    return NULL;
}

static void count_flips(void *opaque, uint64_t gpa, uint64_t npages, bool encrypted)
{
    (void)gpa;
    (void)encrypted;
    *(uint64_t *)opaque += npages; /* the tracker's lock serialises us */
}

static void threads(void)
{
    pagenc_tracker *t = NULL;
    pthread_t tid[THREADS];
    struct worker w[THREADS];
    uint64_t flips = 0;

    CHECK_RC(pagenc_tracker_new(q35, 2, &t), PAGENC_RESULT_OK);
    CHECK_RC(pagenc_tracker_set_change_callback(t, count_flips, &flips), PAGENC_RESULT_OK);
    for (int i = 0; i < THREADS; i++) {
        w[i] = (struct worker){ t, (uint64_t)i * 256 * MIB, 0 };
        CHECK(pthread_create(&tid[i], NULL, vcpu, &w[i]) == 0);
    }
    /* the migration thread reads meanwhile: every run it sees is well formed */
    int bad = 0;
    for (int round = 0; round < 20; round++) {
        pagenc_iter *it = NULL;
        struct pagenc_run run;
        uint64_t next = 0;
        if (pagenc_iter_new(t, 0, 2 * GIB, 0, &it) != PAGENC_RESULT_OK) {
            bad++;
            continue;
        }
        while (pagenc_iter_next(it, &run)) {
            bad += run.gpa != next || run.npages == 0;
            next = run.gpa + run.npages * PAGE;
        }
        bad += next != 2 * GIB || pagenc_iter_result(it) != PAGENC_RESULT_OK;
        pagenc_iter_free(it);
    }
    CHECK_U64(bad, 0);
    for (int i = 0; i < THREADS; i++) {
        CHECK(pthread_join(tid[i], NULL) == 0);
        CHECK_U64(w[i].failures, 0);
    }
    struct pagenc_stats s;
    CHECK_RC(pagenc_tracker_stats(t, &s), PAGENC_RESULT_OK);
    CHECK_U64(s.shared_pages, THREADS * CALLS);
    CHECK_U64(s.shared_ranges, THREADS * CALLS);
    CHECK_U64(s.hypercalls, THREADS * CALLS * 2);
    CHECK_U64(flips, THREADS * CALLS * 3);
    CHECK_U64(s.pages_flipped, flips);
    pagenc_tracker_free(t);
}

int main(void)
{
    pagenc_tracker *t = NULL;

    CHECK_RC(pagenc_tracker_new(q35, 2, &t), PAGENC_RESULT_OK);
    if (!CHECK(t != NULL))
        return check_summary("test_callbacks");
    CHECK_RC(pagenc_tracker_set_change_callback(t, on_change, &rec), PAGENC_RESULT_OK);
    CHECK_RC(pagenc_tracker_set_readiness_callback(t, on_readiness, &rec), PAGENC_RESULT_OK);

    changes(t);
    readiness(t);
    EXPECT_NONE(); /* the MSR never calls the change callback */
    reentrance(t);
    removal(t);
    pagenc_tracker_free(t);

    threads();
    return check_summary("test_callbacks");
}
