/*
 * W3 as QEMU runs it: the RAM loop's per-page path of the pagenc series
 * (qemu-patches/0007), from C, against libpagenc.a through its C ABI, the
 * way QEMU links it.  The Rust bench (qemu_path.rs) writes the guest's RAM
 * layout, the guest calls and the dirty bitmaps to a file, compiles this
 * program against the staticlib it just built, runs it, and reads one line
 * per dirty fraction back.
 *
 * "qemu": the series as it is (include/system/pagenc-tracking.h's
 * qemu_pagenc_ram_page()): the RAM loop keeps pagenc's last answer, a run of
 * pages of one kind, in its own state (QemuPagencRun in RAMState) and answers
 * a page inside it inline: two comparisons, a relaxed load of the global
 * generation, a count per kind in the run, plus migration/ram.c's test of the
 * per-page trace point's state.  Only past the run's end does it call
 * qemu_pagenc_ram_lookup() (system/pagenc-tracking.c, another translation
 * unit): read the generation (acquire), the instance, and through the ops
 * vector (an indirect call, as into the module) the object's lookup: RCU
 * read section (nested), the map, the mapping check, pagenc_cursor_query()
 * through the C ABI, and the run trace point's state.  The counts go to the
 * Stat64 counters (atomic adds) when migration measures what is pending and
 * at the end: here once per scan.
 *
 * "call": the series' first version, kept to measure the change: a call per
 * page from migration/ram.c into backends/pagenc.c
 * (qemu_pagenc_ram_page_sent and qemu_pagenc_ram_classify), per page:
 *   - qemu_pagenc_get(): an atomic read of the instance pointer;
 *   - RCU_READ_LOCK_GUARD(): nested inside the RAM loop's own read section,
 *     so a thread-local depth increment and decrement;
 *   - qatomic_read() of the change generation, qatomic_rcu_read() of the
 *     RAMBlock -> guest-physical map, the mapping check, and the series'
 *     run cache; on a miss pagenc_cursor_query() through the C ABI;
 *   - trace_pagenc_ram_page(qemu_ram_get_idstr(rb), ...): the argument is a
 *     call into another translation unit, made whether tracing is on or not;
 *     the trace point itself is a test of a global flag (off);
 *   - the per-kind counters: plain fields, no atomic operation per page
 *     (the series publishes them to Stat64 counters outside the loop).
 * Beside it, in the same process: the dirty-bitmap walk alone, the walk with
 * a bitmap bit test (B0), and the walk with pagenc_cursor_is_encrypted()
 * called on every page (the C ABI without the series' cache).
 *
 * Output, one line per dirty fraction:
 *   pct=<p> pages=<n> loop=<ns> b0=<ns> qemu=<ns> abi=<ns> shared=<n> sum=<n>
 * ns per queried page, best of the repetitions (interleaved), thread CPU time; shared/sum
 * are the shared pages found and the sum of their gfns, which the bench
 * checks against its own structures.
 */
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "pagenc.h"

#define PAGE_SIZE 4096ULL

typedef struct RAMBlock {
    char idstr[256];
} RAMBlock;

/* backends/pagenc.c's PagencMapping and PagencMap, reduced to what the loop reads */
typedef struct Mapping {
    RAMBlock *rb;
    uint64_t offset;
    uint64_t gpa;
    uint64_t size;
} Mapping;

typedef struct Map {
    size_t n;
    Mapping *by_block;
    unsigned int generation;
} Map;

typedef struct RamCache {
    pagenc_cursor *cursor;
    unsigned int map_generation;
    const Mapping *m;
    unsigned int run_generation;
    uint64_t run_start;
    uint64_t run_end;
    bool run_encrypted;
    uint64_t encrypted;
    uint64_t shared;
} RamCache;

typedef struct State {
    _Atomic(Map *) map;
    _Atomic unsigned int change_generation;
    RamCache ram;
    _Atomic uint64_t sent_encrypted;    /* Stat64 */
    _Atomic uint64_t sent_shared;
} State;

/* include/system/pagenc-tracking.h */
typedef struct QemuPagencRun {
    RAMBlock *rb;
    uint64_t start;
    uint64_t end;
    uint64_t gpa;
    int kind;
    unsigned int generation;
    uint64_t pages[3];
} QemuPagencRun;

typedef struct Ops {
    int (*ram_lookup)(State *s, QemuPagencRun *run, RAMBlock *rb,
                      uint64_t offset);
    void (*ram_count)(State *s, int kind, uint64_t pages);
} Ops;

static _Atomic(State *) instance;
static const Ops *_Atomic ops;
static _Atomic unsigned int qemu_pagenc_generation;
static __thread unsigned int rcu_depth;
static volatile bool trace_on;
/* migration/trace-events: the per-page trace point's state, tested per page */
static volatile uint16_t trace_pagenc_ram_page_dstate;
static volatile uint16_t trace_pagenc_ram_run_dstate;

static uint64_t rd(FILE *f)
{
    uint64_t v;

    if (fread(&v, sizeof(v), 1, f) != 1) {
        fprintf(stderr, "qemu_path: input file truncated\n");
        exit(2);
    }
    return v;
}

static double cpu_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

/* physmem.c: another translation unit, so a real call */
__attribute__((noinline)) const char *qemu_ram_get_idstr(RAMBlock *rb)
{
    return rb->idstr;
}

static const Mapping *find_block(Map *map, RAMBlock *rb, uint64_t offset)
{
    size_t lo = 0, hi = map->n;

    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const Mapping *m = &map->by_block[mid];

        if (m->rb == rb && offset >= m->offset && offset - m->offset < m->size) {
            return m;
        }
        if ((uintptr_t)m->rb < (uintptr_t)rb ||
            (m->rb == rb && m->offset < offset)) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return NULL;
}

enum { PAGE_ERROR = -1, PAGE_NOT_RAM, PAGE_ENCRYPTED, PAGE_SHARED };

static inline int classify(State *s, RAMBlock *rb, uint64_t offset, uint64_t *gpa)
{
    RamCache *c = &s->ram;
    unsigned int gen = atomic_load_explicit(&s->change_generation,
                                            memory_order_relaxed);
    struct pagenc_run run;
    Map *map;
    int ret;

    rcu_depth++;                        /* RCU_READ_LOCK_GUARD, nested */
    map = atomic_load_explicit(&s->map, memory_order_consume);
    if (!map) {
        ret = PAGE_NOT_RAM;
        goto out;
    }
    if (c->map_generation != map->generation || !c->m || c->m->rb != rb ||
        offset < c->m->offset || offset - c->m->offset >= c->m->size) {
        c->m = find_block(map, rb, offset);
        c->map_generation = map->generation;
        c->run_generation = 0;
        if (!c->m) {
            ret = PAGE_NOT_RAM;
            goto out;
        }
    }
    *gpa = c->m->gpa + (offset - c->m->offset);
    if (c->run_generation == gen + 1 && *gpa >= c->run_start &&
        *gpa < c->run_end) {
        ret = c->run_encrypted ? PAGE_ENCRYPTED : PAGE_SHARED;
        goto out;
    }
    if (pagenc_cursor_query(c->cursor, *gpa, &run) != PAGENC_RESULT_OK) {
        c->run_generation = 0;
        ret = PAGE_ERROR;
        goto out;
    }
    c->run_encrypted = run.encrypted;
    c->run_start = *gpa;
    c->run_end = run.gpa + run.npages * PAGE_SIZE;
    if (c->run_end < *gpa + PAGE_SIZE) {
        c->run_end = *gpa + PAGE_SIZE;
    }
    c->run_generation = gen + 1;
    ret = c->run_encrypted ? PAGE_ENCRYPTED : PAGE_SHARED;
out:
    rcu_depth--;
    return ret;
}

/* backends/pagenc.c's qemu_pagenc_obj_ram_page_sent, in the module */
__attribute__((noinline)) static int obj_ram_page_sent(State *s, RAMBlock *rb,
                                                       uint64_t offset)
{
    const char *id;
    uint64_t gpa = -1;
    int page;

    if (!s->ram.cursor) {
        return 0;
    }
    page = classify(s, rb, offset, &gpa);
    id = qemu_ram_get_idstr(rb);
    if (trace_on) {
        fprintf(stderr, "pagenc_ram_page %s 0x%llx 0x%llx %d\n", id,
                (unsigned long long)offset, (unsigned long long)gpa, page);
    }
    switch (page) {
    case PAGE_ENCRYPTED:
        s->ram.encrypted++;
        return 0;
    case PAGE_SHARED:
    case PAGE_NOT_RAM:
        s->ram.shared++;
        return 0;
    default:
        return -1;
    }
}

static int (*const _Atomic v1_ram_page_sent)(State *, RAMBlock *, uint64_t) =
    obj_ram_page_sent;

/*
 * system/pagenc-tracking.c, which migration/ram.c calls in another
 * translation unit: the instance, then the object's function through the
 * ops vector (an indirect call)
 */
__attribute__((noinline)) int qemu_pagenc_ram_page_sent(RAMBlock *rb,
                                                        uint64_t offset)
{
    State *s = atomic_load_explicit(&instance, memory_order_acquire);

    return s ? atomic_load_explicit(&v1_ram_page_sent, memory_order_relaxed)(
                   s, rb, offset) : 0;
}

/* v2: backends/pagenc.c's qemu_pagenc_find_block(), a lower bound */
static const Mapping *find_block_next(Map *map, RAMBlock *rb, uint64_t offset,
                                      uint64_t *next)
{
    size_t lo = 0, hi = map->n;
    const Mapping *m;

    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;

        m = &map->by_block[mid];
        if ((uintptr_t)m->rb < (uintptr_t)rb ||
            (m->rb == rb && m->offset + m->size <= offset)) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    m = lo < map->n ? &map->by_block[lo] : NULL;
    if (m && m->rb == rb && m->offset <= offset) {
        return m;
    }
    *next = m && m->rb == rb ? m->offset : UINT64_MAX;
    return NULL;
}

/* v2: backends/pagenc.c's qemu_pagenc_obj_ram_lookup() (in the module) */
__attribute__((noinline)) static int obj_ram_lookup(State *s,
                                                    QemuPagencRun *run,
                                                    RAMBlock *rb,
                                                    uint64_t offset)
{
    RamCache *c = &s->ram;
    uint64_t next = UINT64_MAX, gpa, end, len;
    struct pagenc_run answer;
    Map *map;
    int ret;

    rcu_depth++;                        /* RCU_READ_LOCK_GUARD, nested */
    map = atomic_load_explicit(&s->map, memory_order_consume);
    run->rb = rb;
    run->start = offset;
    run->gpa = -1;
    run->kind = PAGE_NOT_RAM;
    if (!map || !c->cursor) {
        run->start = 0;
        run->end = UINT64_MAX;
        ret = run->kind;
        goto out;
    }
    if (c->map_generation != map->generation || !c->m || c->m->rb != rb ||
        offset < c->m->offset || offset - c->m->offset >= c->m->size) {
        c->m = find_block_next(map, rb, offset, &next);
        c->map_generation = map->generation;
        if (!c->m) {
            run->end = next;
            ret = run->kind;
            goto out;
        }
    }
    gpa = c->m->gpa + (offset - c->m->offset);
    if (pagenc_cursor_query(c->cursor, gpa, &answer) != PAGENC_RESULT_OK) {
        ret = PAGE_ERROR;
        goto out;
    }
    end = answer.gpa + answer.npages * PAGE_SIZE;
    if (end < gpa + PAGE_SIZE) {
        end = gpa + PAGE_SIZE;
    }
    len = c->m->size - (offset - c->m->offset);
    run->end = offset + (end - gpa < len ? end - gpa : len);
    run->gpa = gpa;
    run->kind = answer.encrypted ? PAGE_ENCRYPTED : PAGE_SHARED;
    /* qemu_pagenc_trace_run(): the block's name only when tracing */
    if (trace_pagenc_ram_run_dstate) {
        fprintf(stderr, "pagenc_ram_run %s 0x%llx\n", qemu_ram_get_idstr(rb),
                (unsigned long long)offset);
    }
    ret = run->kind;
out:
    rcu_depth--;
    return ret;
}

__attribute__((noinline)) static void obj_ram_count(State *s, int kind,
                                                    uint64_t pages)
{
    atomic_fetch_add_explicit(kind == PAGE_ENCRYPTED ? &s->sent_encrypted :
                              &s->sent_shared, pages, memory_order_relaxed);
}

static const Ops obj_ops = {
    .ram_lookup = obj_ram_lookup,
    .ram_count = obj_ram_count,
};

/* v2: system/pagenc-tracking.c */
static State *qemu_pagenc_get(void)
{
    return atomic_load_explicit(&instance, memory_order_acquire);
}

__attribute__((noinline)) void qemu_pagenc_ram_publish(QemuPagencRun *run)
{
    State *s = qemu_pagenc_get();

    for (int kind = 0; kind < 3; kind++) {
        if (s && run->pages[kind]) {
            atomic_load_explicit(&ops, memory_order_relaxed)->ram_count(
                s, kind, run->pages[kind]);
        }
        run->pages[kind] = 0;
    }
}

__attribute__((noinline)) int qemu_pagenc_ram_lookup(QemuPagencRun *run,
                                                     RAMBlock *rb,
                                                     uint64_t offset)
{
    State *s = qemu_pagenc_get();
    int kind;

    run->generation = atomic_load_explicit(&qemu_pagenc_generation,
                                           memory_order_acquire);
    if (!s) {
        run->rb = rb;
        run->start = 0;
        run->end = UINT64_MAX;
        run->kind = PAGE_NOT_RAM;
        return run->kind;
    }
    kind = atomic_load_explicit(&ops, memory_order_relaxed)->ram_lookup(
        s, run, rb, offset);
    if (kind == PAGE_ERROR) {
        run->rb = NULL;
    }
    return kind;
}

/* v2: the inline function migration/ram.c calls per page */
static inline int qemu_pagenc_ram_page(QemuPagencRun *run, RAMBlock *rb,
                                       uint64_t offset, uint64_t *gpa)
{
    int kind = run->kind;

    if (__builtin_expect(run->rb != rb || offset < run->start ||
                         offset >= run->end ||
                         run->generation !=
                         atomic_load_explicit(&qemu_pagenc_generation,
                                              memory_order_relaxed), 0)) {
        kind = qemu_pagenc_ram_lookup(run, rb, offset);
        if (kind == PAGE_ERROR) {
            return kind;
        }
    }
    run->pages[kind]++;
    *gpa = run->gpa + (offset - run->start);
    return kind;
}

typedef struct Dirty {
    uint64_t pct;
    uint64_t nwords;
    uint64_t *words;        /* one bitmap over the RAMBlock's pages */
} Dirty;

/*
 * What the loop does per page: 0 walk alone, 1 bit test, 2 the series
 * (inline run), 3 the C ABI on every page, 4 the series' first version (a
 * call per page)
 */
static double scan(int kind, const Dirty *d, RAMBlock *rb, const uint64_t *b0,
                   pagenc_cursor *abi, int reps, uint64_t *out_shared,
                   uint64_t *out_sum)
{
    State *s = atomic_load(&instance);
    double best = 1e300;

    for (int r = 0; r < reps; r++) {
        uint64_t shared = 0, sum = 0;
        QemuPagencRun run = { 0 };      /* RAMState's, new per migration */
        double t0;

        s->ram.encrypted = s->ram.shared = 0;
        s->ram.run_generation = 0;
        s->ram.m = NULL;
        t0 = cpu_ns();
        for (uint64_t w = 0; w < d->nwords; w++) {
            uint64_t x = d->words[w];

            while (x) {
                uint64_t page = w * 64 + __builtin_ctzll(x);
                bool sh = false;

                x &= x - 1;
                switch (kind) {
                case 0:
                    sh = page == (uint64_t)-1;
                    break;
                case 1:
                    sh = b0[page / 64] >> (page % 64) & 1;
                    break;
                case 2: {
                    uint64_t gpa;
                    int k = qemu_pagenc_ram_page(&run, rb, page * PAGE_SIZE,
                                                 &gpa);

                    if (trace_pagenc_ram_page_dstate) {
                        fprintf(stderr, "pagenc_ram_page 0x%llx\n",
                                (unsigned long long)gpa);
                    }
                    if (k == PAGE_ERROR) {
                        fprintf(stderr, "qemu_path: page %llu failed\n",
                                (unsigned long long)page);
                        exit(3);
                    }
                    sh = k != PAGE_ENCRYPTED;
                    break;
                }
                case 4: {
                    uint64_t enc = s->ram.encrypted;

                    if (qemu_pagenc_ram_page_sent(rb, page * PAGE_SIZE) < 0) {
                        fprintf(stderr, "qemu_path: page %llu failed\n",
                                (unsigned long long)page);
                        exit(3);
                    }
                    sh = s->ram.encrypted == enc;
                    break;
                }
                default: {
                    const Map *m = atomic_load(&s->map);
                    const Mapping *mp = find_block((Map *)m, rb, page * PAGE_SIZE);

                    sh = !pagenc_cursor_is_encrypted(
                        abi, mp->gpa + (page * PAGE_SIZE - mp->offset), NULL);
                    break;
                }
                }
                if (sh) {
                    shared++;
                    sum += page;
                }
            }
        }
        t0 = cpu_ns() - t0;
        if (t0 < best) {
            best = t0;
        }
        qemu_pagenc_ram_publish(&run);
        *out_shared = shared;
        *out_sum = sum;
    }
    return best;
}

int main(int argc, char **argv)
{
    FILE *f;
    uint64_t nram, nops, ndirty, reps, pages = 0;
    struct pagenc_ram_range *ram;
    pagenc_tracker *t;
    pagenc_cursor *abi;
    static RAMBlock pc_ram = { .idstr = "pc.ram" };
    static State state;
    Map *map;
    uint64_t *b0;

    if (argc != 2 || !(f = fopen(argv[1], "rb"))) {
        fprintf(stderr, "usage: qemu_path INPUT (written by the bench)\n");
        return 2;
    }
    if (rd(f) != 0x706167656e633031ULL) {
        fprintf(stderr, "qemu_path: %s is not a bench input file\n", argv[1]);
        return 2;
    }
    reps = rd(f);
    nram = rd(f);
    ram = calloc(nram, sizeof(*ram));
    map = calloc(1, sizeof(*map));
    map->by_block = calloc(nram, sizeof(*map->by_block));
    map->n = nram;
    map->generation = 1;
    for (uint64_t i = 0; i < nram; i++) {
        ram[i].gpa = rd(f);
        ram[i].size = rd(f);
        /* pc.ram: one RAMBlock, below the PCI hole at offset 0, above it next */
        map->by_block[i] = (Mapping) {
            .rb = &pc_ram, .offset = pages * PAGE_SIZE,
            .gpa = ram[i].gpa, .size = ram[i].size,
        };
        pages += ram[i].size / PAGE_SIZE;
    }
    if (pagenc_tracker_new(ram, nram, &t) != PAGENC_RESULT_OK) {
        fprintf(stderr, "qemu_path: pagenc_tracker_new failed\n");
        return 1;
    }
    b0 = calloc((pages + 63) / 64, sizeof(uint64_t));
    nops = rd(f);
    for (uint64_t i = 0; i < nops; i++) {
        uint64_t gfn = rd(f), n = rd(f), shared = rd(f), hc_ret = 0;

        if (pagenc_hypercall(t, 12, gfn * PAGE_SIZE, n, shared ? 0 : 0x10,
                             &hc_ret) != PAGENC_RESULT_OK || hc_ret != 0) {
            fprintf(stderr, "qemu_path: call %llu refused\n",
                    (unsigned long long)i);
            return 1;
        }
        /* B0 over the RAMBlock's pages: clip the call to each mapping */
        for (size_t m = 0; m < map->n; m++) {
            uint64_t a = map->by_block[m].gpa / PAGE_SIZE;
            uint64_t b = a + map->by_block[m].size / PAGE_SIZE;
            uint64_t lo = gfn > a ? gfn : a, hi = gfn + n < b ? gfn + n : b;

            for (uint64_t g = lo; g < hi; g++) {
                uint64_t p = map->by_block[m].offset / PAGE_SIZE + (g - a);

                if (shared) {
                    b0[p / 64] |= 1ULL << (p % 64);
                } else {
                    b0[p / 64] &= ~(1ULL << (p % 64));
                }
            }
        }
    }
    if (pagenc_cursor_new(t, &state.ram.cursor) != PAGENC_RESULT_OK ||
        pagenc_cursor_new(t, &abi) != PAGENC_RESULT_OK) {
        fprintf(stderr, "qemu_path: pagenc_cursor_new failed\n");
        return 1;
    }
    atomic_store(&state.map, map);
    atomic_store(&ops, &obj_ops);
    atomic_store(&instance, &state);
    ndirty = rd(f);
    for (uint64_t i = 0; i < ndirty; i++) {
        Dirty d = { .pct = rd(f), .nwords = rd(f) };
        uint64_t q = 0, sh[5], sum[5];
        double ns[5];

        d.words = calloc(d.nwords, sizeof(uint64_t));
        if (fread(d.words, sizeof(uint64_t), d.nwords, f) != d.nwords) {
            fprintf(stderr, "qemu_path: input file truncated\n");
            return 2;
        }
        for (uint64_t w = 0; w < d.nwords; w++) {
            q += __builtin_popcountll(d.words[w]);
        }
        /*
         * Repetitions interleaved over the five loops, best of each: a cold
         * start or a slow moment of the machine hits one repetition of
         * every loop alike instead of all of one loop.
         */
        for (int k = 0; k < 5; k++) {
            ns[k] = 1e300;
        }
        for (uint64_t r = 0; r < reps; r++) {
            for (int k = 0; k < 5; k++) {
                double t = scan(k, &d, &pc_ram, b0, abi, 1, &sh[k], &sum[k]);

                ns[k] = t < ns[k] ? t : ns[k];
            }
        }
        if (sh[1] != sh[2] || sum[1] != sum[2] || sh[1] != sh[3] ||
            sum[1] != sum[3] || sh[1] != sh[4] || sum[1] != sum[4]) {
            fprintf(stderr, "qemu_path: %llu%%: the series' path found %llu shared "
                    "pages, its first version %llu, the C ABI %llu, the bitmap "
                    "%llu\n", (unsigned long long)d.pct,
                    (unsigned long long)sh[2], (unsigned long long)sh[4],
                    (unsigned long long)sh[3], (unsigned long long)sh[1]);
            return 1;
        }
        if (atomic_load(&state.sent_encrypted) + atomic_load(&state.sent_shared) !=
            q * reps) {
            fprintf(stderr, "qemu_path: %llu%%: the series counted %llu pages, "
                    "not %llu\n", (unsigned long long)d.pct,
                    (unsigned long long)(atomic_load(&state.sent_encrypted) +
                                         atomic_load(&state.sent_shared)),
                    (unsigned long long)(q * reps));
            return 1;
        }
        atomic_store(&state.sent_encrypted, 0);
        atomic_store(&state.sent_shared, 0);
        printf("pct=%llu pages=%llu loop=%.4f b0=%.4f qemu=%.4f abi=%.4f "
               "call=%.4f shared=%llu sum=%llu\n", (unsigned long long)d.pct,
               (unsigned long long)q, ns[0] / q, ns[1] / q, ns[2] / q,
               ns[3] / q, ns[4] / q, (unsigned long long)sh[1],
               (unsigned long long)sum[1]);
        fflush(stdout);
        free(d.words);
    }
    pagenc_cursor_free(abi);
    pagenc_cursor_free(state.ram.cursor);
    pagenc_tracker_free(t);
    free(b0);
    free(map->by_block);
    free(map);
    free(ram);
    return 0;
}
