/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The migration stream through the C API: pagenc_save / pagenc_save_to on a
 * source, pagenc_load on a destination, and every kind of corrupted stream,
 * each refused with PAGENC_RESULT_BAD_STREAM, a message naming the problem,
 * the destination unchanged and no callback called.
 *
 * The streams are written out by hand from docs/stream-format.md, so this
 * also checks that the library writes what the document says. The CRC32C
 * below is the bitwise textbook form, written here from the definition so that
 * the test does not share the library's implementation.
 */
#include <stdlib.h>

#include "check.h"

static const struct pagenc_ram_range q35[] = {
    { .gpa = 0, .size = 2 * GIB },
    { .gpa = 4 * GIB, .size = 2 * GIB },
};
#define Q35_PAGES (4 * GIB / PAGE)
#define Q35_END (6 * GIB / PAGE)

struct hdr {
    const char *magic;
    uint16_t version, flags;
    uint64_t ram_pages, ram_end, msr, shared_pages, range_count, record_count;
};

static size_t put_be(uint8_t *p, uint64_t v, int n)
{
    for (int i = 0; i < n; i++)
        p[i] = (uint8_t)(v >> (8 * (n - 1 - i)));
    return (size_t)n;
}

/* CRC32C (Castagnoli, reflected polynomial 0x82f63b78), bit by bit. */
static uint32_t crc32c(const uint8_t *p, size_t n)
{
    uint32_t crc = 0xffffffffu;
    for (size_t i = 0; i < n; i++) {
        crc ^= p[i];
        for (int k = 0; k < 8; k++)
            crc = (crc >> 1) ^ (0x82f63b78u & (0u - (crc & 1)));
    }
    return ~crc;
}

/* The RAM ranges a stream names (its layout block), in gfns [start, end). */
static const uint64_t q35_gfns[][2] = {
    { 0, 2 * GIB / PAGE },
    { 4 * GIB / PAGE, 6 * GIB / PAGE },
};
static const uint64_t (*layout_block)[2] = q35_gfns;
static size_t layout_n = 2;

/* A stream: the 56-byte big-endian header, the layout block (be32 count, then
 * be64 start and end gfn per range), `rec_len` record bytes, the be32 CRC32C
 * of everything before it. */
static size_t build(uint8_t *out, const struct hdr *h, const uint8_t *rec, size_t rec_len)
{
    size_t n = 0;
    memcpy(out, h->magic, 4);
    n += 4;
    n += put_be(out + n, h->version, 2);
    n += put_be(out + n, h->flags, 2);
    n += put_be(out + n, h->ram_pages, 8);
    n += put_be(out + n, h->ram_end, 8);
    n += put_be(out + n, h->msr, 8);
    n += put_be(out + n, h->shared_pages, 8);
    n += put_be(out + n, h->range_count, 8);
    n += put_be(out + n, h->record_count, 8);
    n += put_be(out + n, layout_n, 4);
    for (size_t i = 0; i < layout_n; i++) {
        n += put_be(out + n, layout_block[i][0], 8);
        n += put_be(out + n, layout_block[i][1], 8);
    }
    memcpy(out + n, rec, rec_len);
    n += rec_len;
    return n + put_be(out + n, crc32c(out, n), 4);
}

/* The source's list: gfn 0x100 + 16 pages and gfn 0x200 + 1 page; ready. */
static const struct hdr good = { "PGEL", 2, 0, Q35_PAGES, Q35_END, 1, 17, 2, 2 };
/* header 56 + layout block 4 + 2 * 16 + records 8 + checksum 4 */
#define GOOD_LEN 104
/* range records: tag 0x01, LEB128 start, LEB128 len */
static const uint8_t good_rec[] = { 0x01, 0x80, 0x02, 0x10, 0x01, 0x80, 0x04, 0x01 };

struct counters {
    int changes, readiness;
    bool last_ready;
};

static void on_change(void *opaque, uint64_t gpa, uint64_t npages, bool encrypted)
{
    (void)gpa;
    (void)npages;
    (void)encrypted;
    ((struct counters *)opaque)->changes++;
}

static void on_readiness(void *opaque, bool ready, uint64_t msr)
{
    (void)msr;
    ((struct counters *)opaque)->readiness++;
    ((struct counters *)opaque)->last_ready = ready;
}

struct sink {
    uint8_t buf[1 << 16];
    size_t len;
    int calls;
    int fail_with;
};

static int collect(void *opaque, const uint8_t *data, size_t len)
{
    struct sink *s = opaque;
    s->calls++;
    if (s->fail_with)
        return s->fail_with;
    if (len > sizeof(s->buf) - s->len)
        return -1;
    memcpy(s->buf + s->len, data, len);
    s->len += len;
    return 0;
}

static pagenc_tracker *new_tracker(void)
{
    pagenc_tracker *t = NULL;
    CHECK_RC(pagenc_tracker_new(q35, 2, &t), PAGENC_RESULT_OK);
    return t;
}

static void save(pagenc_tracker *src, uint8_t *expected, size_t expected_len)
{
    uint8_t buf[256];
    size_t written = 0;
    struct sink *sink = calloc(1, sizeof(*sink));

    /* the size first, then a buffer that is too small: untouched */
    CHECK_RC(pagenc_save(src, NULL, 0, &written), PAGENC_RESULT_BUFFER_TOO_SMALL);
    CHECK_U64(written, expected_len);
    CHECK_MSG(src, "104 bytes are needed");
    memset(buf, 0xee, sizeof(buf));
    written = 0;
    CHECK_RC(pagenc_save(src, buf, 10, &written), PAGENC_RESULT_BUFFER_TOO_SMALL);
    CHECK_U64(written, expected_len);
    CHECK(buf[0] == 0xee && buf[9] == 0xee);

    CHECK_RC(pagenc_save(src, buf, sizeof(buf), &written), PAGENC_RESULT_OK);
    CHECK_U64(written, expected_len);
    CHECK(memcmp(buf, expected, expected_len) == 0);

    if (!CHECK(sink != NULL))
        return;
    CHECK_RC(pagenc_save_to(src, collect, sink), PAGENC_RESULT_OK);
    CHECK(sink->calls >= 1);
    CHECK_U64(sink->len, expected_len);
    CHECK(memcmp(sink->buf, expected, expected_len) == 0);

    memset(sink, 0, sizeof(*sink));
    sink->fail_with = -5;
    CHECK_RC(pagenc_save_to(src, collect, sink), PAGENC_RESULT_WRITE_FAILED);
    CHECK(sink->calls == 1);
    CHECK_MSG(src, "returned -5");
    free(sink);
}

/* dst holds gfn 0x300..0x303 shared, not ready: a refused stream leaves it so. */
static void refused(pagenc_tracker *dst, struct counters *cnt, const uint8_t *s, size_t len,
                    const char *needle, int line)
{
    struct pagenc_stats st;
    int rc = pagenc_load(dst, s, len);
    check_(rc == PAGENC_RESULT_BAD_STREAM, "PAGENC_RESULT_BAD_STREAM", __FILE__, line);
    if (rc != PAGENC_RESULT_BAD_STREAM)
        fprintf(stderr, "    got %d (%s)\n", rc, pagenc_result_str(rc));
    char msg[512] = "";
    pagenc_last_error(dst, msg, sizeof(msg));
    check_(strstr(msg, needle) != NULL, "the message names the problem", __FILE__, line);
    if (!strstr(msg, needle))
        fprintf(stderr, "    wanted \"%s\" in \"%s\"\n", needle, msg);
    int same = pagenc_tracker_stats(dst, &st) == PAGENC_RESULT_OK && st.shared_pages == 3 &&
               st.shared_ranges == 1 && st.msr_value == 0 &&
               !pagenc_is_encrypted(dst, 0x302000) && pagenc_is_encrypted(dst, 0x100000);
    check_(same, "the destination is unchanged", __FILE__, line);
    check_(cnt->changes == 0 && cnt->readiness == 0, "no callback", __FILE__, line);
}

#define REFUSED(s, len, needle) refused(dst, &cnt, (s), (len), (needle), __LINE__)

/* A stream from `h` and some record bytes, refused with `needle`. */
#define REFUSED_HDR(h, rec, needle)                                                   \
    do {                                                                              \
        uint8_t b_[512];                                                              \
        size_t n_ = build(b_, &(h), (rec), sizeof(rec));                              \
        REFUSED(b_, n_, needle);                                                      \
    } while (0)

static void corruptions(pagenc_tracker *dst, const uint8_t *valid, size_t valid_len)
{
    struct counters cnt = { 0, 0, false };
    uint8_t s[512];
    struct hdr h;

    CHECK_RC(pagenc_tracker_set_change_callback(dst, on_change, &cnt), PAGENC_RESULT_OK);
    CHECK_RC(pagenc_tracker_set_readiness_callback(dst, on_readiness, &cnt), PAGENC_RESULT_OK);

    /* truncated anywhere */
    REFUSED(valid, 0, "truncated");
    REFUSED(valid, 3, "magic");
    REFUSED(valid, 5, "version");
    REFUSED(valid, 55, "truncated");
    REFUSED(valid, 63, "truncated"); /* too short to hold a checksum */
    REFUSED(valid, 64, "damaged");   /* the last 4 bytes are no checksum of the rest */
    REFUSED(valid, valid_len - 1, "damaged");
    CHECK_RC(pagenc_load(dst, NULL, 0), PAGENC_RESULT_BAD_STREAM);
    /* any byte changed after the version: the checksum says so first */
    for (size_t i = 6; i < valid_len; i++) {
        memcpy(s, valid, valid_len);
        s[i] ^= 0x10;
        REFUSED(s, valid_len, "checksum");
    }

    h = good, h.magic = "PGEX";
    REFUSED_HDR(h, good_rec, "magic");
    h = good, h.version = 3;
    REFUSED_HDR(h, good_rec, "version 3 is newer");
    h = good, h.version = 1;
    REFUSED_HDR(h, good_rec, "version 1 is from an older pagenc");
    h = good, h.version = 0;
    REFUSED_HDR(h, good_rec, "version 0");
    h = good, h.flags = 0x8000;
    REFUSED_HDR(h, good_rec, "0x8000");
    h = good, h.ram_pages = Q35_PAGES + 1;
    REFUSED_HDR(h, good_rec, "RAM size");
    h = good, h.ram_end = Q35_END - 1;
    REFUSED_HDR(h, good_rec, "end of RAM");
    h = good, h.msr = 3;
    REFUSED_HDR(h, good_rec, "0x3");
    h = good, h.record_count = UINT64_MAX;
    REFUSED_HDR(h, good_rec, "18446744073709551615 records");
    h = good, h.record_count = 1; /* one record too few: the second is extra */
    REFUSED_HDR(h, good_rec, "bytes after");
    h = good, h.record_count = 2;
    {
        const uint8_t extra[] = { 0x01, 0x80, 0x02, 0x10, 0x01, 0x80, 0x04, 0x01, 0x00 };
        REFUSED_HDR(h, extra, "1 bytes after");
    }
    h = good, h.shared_pages = 18;
    REFUSED_HDR(h, good_rec, "shared pages");
    h = good, h.range_count = 3;
    REFUSED_HDR(h, good_rec, "shared ranges");

    h = good;
    {
        const uint8_t unknown_tag[] = { 0x07, 0x80, 0x02, 0x10, 0x01, 0x80, 0x04, 0x01 };
        REFUSED_HDR(h, unknown_tag, "unknown tag 0x07");
        const uint8_t empty[] = { 0x01, 0x80, 0x02, 0x00, 0x01, 0x80, 0x04, 0x01 };
        REFUSED_HDR(h, empty, "empty");
        const uint8_t unsorted[] = { 0x01, 0x80, 0x02, 0x10, 0x01, 0x80, 0x01, 0x01 };
        REFUSED_HDR(h, unsorted, "before the previous");
        const uint8_t overlap[] = { 0x01, 0x80, 0x02, 0x10, 0x01, 0x88, 0x02, 0x01 };
        REFUSED_HDR(h, overlap, "inside the previous");
        const uint8_t unmerged[] = { 0x01, 0x80, 0x02, 0x10, 0x01, 0x90, 0x02, 0x01 };
        REFUSED_HDR(h, unmerged, "merged");
        /* gfn 0x80000 (2 GiB) is in the PCI hole */
        const uint8_t hole[] = { 0x01, 0x80, 0x02, 0x10, 0x01, 0x80, 0x80, 0x20, 0x01 };
        REFUSED_HDR(h, hole, "not all RAM");
        /* a range running from RAM into the hole */
        const uint8_t into_hole[] = { 0x01, 0x80, 0x02, 0x10, 0x01, 0xff, 0xff, 0x1f, 0x02 };
        REFUSED_HDR(h, into_hole, "not all RAM");
        /* 0x90 0x00 is 16 in two bytes: not the shortest form */
        const uint8_t overlong[] = { 0x01, 0x80, 0x02, 0x90, 0x00, 0x01, 0x80, 0x04, 0x01 };
        REFUSED_HDR(h, overlong, "shortest");
        const uint8_t overflow[] = { 0x01, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                                     0xff, 0x7f, 0x01 };
        REFUSED_HDR(h, overflow, "64 bits");
        /* bitmap record: tag 0x02, start must be a multiple of 32768 pages */
        const uint8_t bitmap_unaligned[] = { 0x02, 0x80, 0x02, 0x01, 0x00, 0x00, 0x00 };
        REFUSED_HDR(h, bitmap_unaligned, "0x8000 pages");
        /* a bitmap of 2^40 chunks in 3 bytes */
        const uint8_t bitmap_huge[] = { 0x02, 0x00, 0x80, 0x80, 0x80, 0x80, 0x80, 0x20 };
        REFUSED_HDR(h, bitmap_huge, "truncated");
    }

    /* a layout block naming other ranges of the same size and end */
    {
        static const uint64_t other[][2] = {
            { 0, 1 * GIB / PAGE },
            { 3 * GIB / PAGE, 6 * GIB / PAGE },
        };
        h = good;
        layout_block = other;
        REFUSED_HDR(h, good_rec, "source RAM range 0 (byte 60) is gpa [0x0, 0x40000000)");
        layout_block = q35_gfns;
        layout_n = 1;
        REFUSED_HDR(h, good_rec, "source RAM range 1 (byte 76) is none");
        layout_n = 2;
    }

    /* another RAM layout at the destination */
    {
        const struct pagenc_ram_range bigger[] = { q35[0], q35[1], { 8 * GIB, GIB } };
        pagenc_tracker *other = NULL;
        CHECK_RC(pagenc_tracker_new(bigger, 3, &other), PAGENC_RESULT_OK);
        CHECK_RC(pagenc_load(other, valid, valid_len), PAGENC_RESULT_BAD_STREAM);
        CHECK_MSG(other, "another RAM layout");
        pagenc_tracker_free(other);
    }

    /* the unmodified stream still loads after all that */
    memcpy(s, valid, valid_len);
    CHECK_RC(pagenc_load(dst, s, valid_len), PAGENC_RESULT_OK);
    CHECK_U64(cnt.changes, 0);   /* the loaded list is the truth: nothing to re-send */
    CHECK_U64(cnt.readiness, 1); /* but readiness changed */
    CHECK(cnt.last_ready);
    CHECK(pagenc_is_ready(dst));
    CHECK(pagenc_is_encrypted(dst, 0x300000)); /* the old list is gone */
    CHECK(!pagenc_is_encrypted(dst, 0x10f000));
    CHECK(pagenc_is_encrypted(dst, 0x110000));
    CHECK(!pagenc_is_encrypted(dst, 0x200000));
    CHECK_RC(pagenc_tracker_set_change_callback(dst, NULL, NULL), PAGENC_RESULT_OK);
    CHECK_RC(pagenc_tracker_set_readiness_callback(dst, NULL, NULL), PAGENC_RESULT_OK);
}

/* Both trackers report the same runs over all of RAM. */
static void same_runs(pagenc_tracker *a, pagenc_tracker *b)
{
    pagenc_iter *ia = NULL, *ib = NULL;
    struct pagenc_run ra, rb;
    int n = 0, diff = 0;
    CHECK_RC(pagenc_iter_new(a, 0, 6 * GIB, 0, &ia), PAGENC_RESULT_OK);
    CHECK_RC(pagenc_iter_new(b, 0, 6 * GIB, 0, &ib), PAGENC_RESULT_OK);
    for (;;) {
        bool ma = pagenc_iter_next(ia, &ra), mb = pagenc_iter_next(ib, &rb);
        if (ma != mb) {
            diff++;
            break;
        }
        if (!ma)
            break;
        diff += ra.gpa != rb.gpa || ra.npages != rb.npages || ra.encrypted != rb.encrypted;
        n++;
    }
    CHECK_U64(diff, 0);
    CHECK(n > 2);
    pagenc_iter_free(ia);
    pagenc_iter_free(ib);
}

/* A fragmented list (every other page of two chunks: written as a bitmap)
 * and ordinary ranges, round-tripped between two trackers. */
static void round_trip_fragmented(void)
{
    pagenc_tracker *src = new_tracker(), *dst = new_tracker();
    uint8_t *buf = NULL;
    size_t len = 0, written = 0;
    struct pagenc_stats s;

    for (uint64_t p = 0; p < 2 * 32768; p += 2)
        CHECK_RC(pagenc_map_gpa_range(src, 4 * GIB + p * PAGE, 1, 0, NULL), PAGENC_RESULT_OK);
    CHECK_RC(pagenc_map_gpa_range(src, 0x70000000, 16384, 0, NULL), PAGENC_RESULT_OK);
    /* the last page of low RAM, and two of the PCI hole (not stored) */
    CHECK_RC(pagenc_map_gpa_range(src, 2 * GIB - PAGE, 3, 0, NULL), PAGENC_RESULT_OK);

    CHECK_RC(pagenc_save(src, NULL, 0, &len), PAGENC_RESULT_BUFFER_TOO_SMALL);
    /* two 4 KiB bitmap chunks and a few ranges, not 32768 range records */
    CHECK(len > 2 * 4096 && len < 2 * 4096 + 200);
    buf = malloc(len);
    if (!CHECK(buf != NULL))
        return;
    CHECK_RC(pagenc_save(src, buf, len, &written), PAGENC_RESULT_OK);
    CHECK_U64(written, len);
    CHECK_RC(pagenc_load(dst, buf, len), PAGENC_RESULT_OK);
    same_runs(src, dst);
    CHECK_RC(pagenc_tracker_stats(dst, &s), PAGENC_RESULT_OK);
    CHECK_U64(s.shared_pages, 32768 + 16384 + 1);
    CHECK_U64(s.shared_ranges, 32768 + 2);

    /* a flipped byte anywhere, bitmaps included, is refused as damage: never
     * another code, never a crash or a leak */
    int refused_n = 0, tries = 0;
    for (size_t i = 6; i < len; i += 97) {
        enum pagenc_stream_problem p = PAGENC_STREAM_PROBLEM_NONE;
        buf[i] ^= 0x41;
        int rc = pagenc_load_detailed(dst, buf, len, &p);
        refused_n += rc == PAGENC_RESULT_BAD_STREAM && p == PAGENC_STREAM_PROBLEM_DAMAGED;
        tries++;
        buf[i] ^= 0x41;
    }
    CHECK_U64(refused_n, tries);
    free(buf);
    pagenc_tracker_free(src);
    pagenc_tracker_free(dst);
}

/* pagenc_load_detailed names the class of each problem (issue 10, point 5):
 * what a VMM acts on differently, without parsing the message. */
static void problems(void)
{
    pagenc_tracker *src = new_tracker(), *dst = new_tracker();
    uint8_t b[GOOD_LEN + 64];
    size_t n;
    struct hdr h;
    enum pagenc_stream_problem p;

#define PROBLEM(t, bytes, len, want_rc, want)                                         \
    do {                                                                              \
        p = (enum pagenc_stream_problem)99;                                           \
        CHECK_RC(pagenc_load_detailed((t), (bytes), (len), &p), (want_rc));           \
        CHECK_U64(p, (want));                                                         \
    } while (0)

    n = build(b, &good, good_rec, sizeof(good_rec));
    PROBLEM(dst, b, n, PAGENC_RESULT_OK, PAGENC_STREAM_PROBLEM_NONE);
    CHECK(!pagenc_is_encrypted(dst, 0x100000));
    b[70] ^= 1;
    PROBLEM(dst, b, n, PAGENC_RESULT_BAD_STREAM, PAGENC_STREAM_PROBLEM_DAMAGED);
    PROBLEM(dst, b, 20, PAGENC_RESULT_BAD_STREAM, PAGENC_STREAM_PROBLEM_DAMAGED);
    h = good, h.magic = "GIF8";
    n = build(b, &h, good_rec, sizeof(good_rec));
    PROBLEM(dst, b, n, PAGENC_RESULT_BAD_STREAM, PAGENC_STREAM_PROBLEM_NOT_A_STREAM);
    h = good, h.version = 9;
    n = build(b, &h, good_rec, sizeof(good_rec));
    PROBLEM(dst, b, n, PAGENC_RESULT_BAD_STREAM, PAGENC_STREAM_PROBLEM_NEWER_VERSION);
    h = good, h.version = 1;
    n = build(b, &h, good_rec, sizeof(good_rec));
    PROBLEM(dst, b, n, PAGENC_RESULT_BAD_STREAM, PAGENC_STREAM_PROBLEM_OLD_VERSION);
    h = good, h.ram_end = Q35_END + 1;
    n = build(b, &h, good_rec, sizeof(good_rec));
    PROBLEM(dst, b, n, PAGENC_RESULT_BAD_STREAM, PAGENC_STREAM_PROBLEM_WRONG_LAYOUT);
    /* a right checksum over wrong content: not damage, an invalid writer */
    h = good, h.shared_pages = 99;
    n = build(b, &h, good_rec, sizeof(good_rec));
    PROBLEM(dst, b, n, PAGENC_RESULT_BAD_STREAM, PAGENC_STREAM_PROBLEM_INVALID);

    /* a stream the library saved, loaded where RAM is laid out otherwise */
    {
        const struct pagenc_ram_range other[] = {
            { .gpa = 0, .size = 1 * GIB },
            { .gpa = 3 * GIB, .size = 3 * GIB },
        };
        pagenc_tracker *o = NULL;
        size_t w = 0;
        CHECK_RC(pagenc_tracker_new(other, 2, &o), PAGENC_RESULT_OK);
        CHECK_RC(pagenc_map_gpa_range(src, 0x1000, 1, 0, NULL), PAGENC_RESULT_OK);
        CHECK_RC(pagenc_save(src, b, sizeof(b), &w), PAGENC_RESULT_OK);
        PROBLEM(o, b, w, PAGENC_RESULT_BAD_STREAM, PAGENC_STREAM_PROBLEM_WRONG_LAYOUT);
        CHECK_MSG(o, "another RAM layout");
        PROBLEM(dst, b, w, PAGENC_RESULT_OK, PAGENC_STREAM_PROBLEM_NONE);
        pagenc_tracker_free(o);
    }
    /* not the stream's fault: no problem class; NULL problem is fine */
    PROBLEM(NULL, b, 10, PAGENC_RESULT_NULL_ARGUMENT, PAGENC_STREAM_PROBLEM_NONE);
    CHECK_RC(pagenc_load_detailed(dst, b, 10, NULL), PAGENC_RESULT_BAD_STREAM);
#undef PROBLEM
    pagenc_tracker_free(src);
    pagenc_tracker_free(dst);
}

int main(void)
{
    pagenc_tracker *src = new_tracker(), *dst = new_tracker();
    uint8_t expected[128];
    size_t expected_len = build(expected, &good, good_rec, sizeof(good_rec));

    if (!CHECK(src != NULL && dst != NULL))
        return check_summary("test_stream");
    CHECK_U64(expected_len, GOOD_LEN);

    CHECK_RC(pagenc_map_gpa_range(src, 0x100000, 16, 0, NULL), PAGENC_RESULT_OK);
    CHECK_RC(pagenc_map_gpa_range(src, 0x200000, 1, 0, NULL), PAGENC_RESULT_OK);
    CHECK_RC(pagenc_msr_write(src, MSR_KVM_MIGRATION_CONTROL, KVM_MIGRATION_READY),
             PAGENC_RESULT_OK);
    save(src, expected, expected_len);

    CHECK_RC(pagenc_map_gpa_range(dst, 0x300000, 3, 0, NULL), PAGENC_RESULT_OK);
    corruptions(dst, expected, expected_len);
    same_runs(src, dst);

    pagenc_tracker_free(src);
    pagenc_tracker_free(dst);

    round_trip_fragmented();
    problems();
    return check_summary("test_stream");
}
