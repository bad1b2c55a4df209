/*
 * W3 as QEMU runs it: the RAM loop's per-page path of the pagenc series
 * (qemu-patches/0007, backends/pagenc.c: qemu_pagenc_ram_page_sent and
 * qemu_pagenc_ram_classify), from C, against libpagenc.a through its C ABI,
 * the way QEMU links it.  The Rust bench (qemu_path.rs) writes the guest's
 * RAM layout, the guest calls and the dirty bitmaps to a file, compiles this
 * program against the staticlib it just built, runs it, and reads one line
 * per dirty fraction back.
 *
 * Modelled from the series, per page (kept in a separate, non-inlined
 * function, since migration/ram.c calls into backends/pagenc.c):
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
 * ns per queried page, best of the repetitions, thread CPU time; shared/sum
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
} State;

static _Atomic(State *) instance;
static __thread unsigned int rcu_depth;
static volatile bool trace_on;

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

/* migration/ram.c calls it in another translation unit: not inlined */
__attribute__((noinline)) int qemu_pagenc_ram_page_sent(RAMBlock *rb,
                                                        uint64_t offset)
{
    State *s = atomic_load_explicit(&instance, memory_order_relaxed);
    const char *id;
    uint64_t gpa = -1;
    int page;

    if (!s || !s->ram.cursor) {
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

typedef struct Dirty {
    uint64_t pct;
    uint64_t nwords;
    uint64_t *words;        /* one bitmap over the RAMBlock's pages */
} Dirty;

/* What the loop does per page: 0 walk alone, 1 bit test, 2 series, 3 C ABI */
static double scan(int kind, const Dirty *d, RAMBlock *rb, const uint64_t *b0,
                   pagenc_cursor *abi, int reps, uint64_t *out_shared,
                   uint64_t *out_sum)
{
    State *s = atomic_load(&instance);
    double best = 1e300;

    for (int r = 0; r < reps; r++) {
        uint64_t shared = 0, sum = 0;
        double t0;

        s->ram.encrypted = s->ram.shared = 0;
        s->ram.run_generation = 0;
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
    atomic_store(&instance, &state);
    ndirty = rd(f);
    for (uint64_t i = 0; i < ndirty; i++) {
        Dirty d = { .pct = rd(f), .nwords = rd(f) };
        uint64_t q = 0, sh[4], sum[4];
        double ns[4];

        d.words = calloc(d.nwords, sizeof(uint64_t));
        if (fread(d.words, sizeof(uint64_t), d.nwords, f) != d.nwords) {
            fprintf(stderr, "qemu_path: input file truncated\n");
            return 2;
        }
        for (uint64_t w = 0; w < d.nwords; w++) {
            q += __builtin_popcountll(d.words[w]);
        }
        for (int k = 0; k < 4; k++) {
            ns[k] = scan(k, &d, &pc_ram, b0, abi, (int)reps, &sh[k], &sum[k]);
        }
        if (sh[1] != sh[2] || sum[1] != sum[2] || sh[1] != sh[3] ||
            sum[1] != sum[3]) {
            fprintf(stderr, "qemu_path: %llu%%: the series' path found %llu shared "
                    "pages, the C ABI %llu, the bitmap %llu\n",
                    (unsigned long long)d.pct, (unsigned long long)sh[2],
                    (unsigned long long)sh[3], (unsigned long long)sh[1]);
            return 1;
        }
        printf("pct=%llu pages=%llu loop=%.4f b0=%.4f qemu=%.4f abi=%.4f "
               "shared=%llu sum=%llu\n", (unsigned long long)d.pct,
               (unsigned long long)q, ns[0] / q, ns[1] / q, ns[2] / q,
               ns[3] / q, (unsigned long long)sh[1], (unsigned long long)sum[1]);
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
