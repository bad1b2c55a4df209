/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Every bad input a C caller or a hostile guest can hand pagenc: the right
 * pagenc_result, the right hypercall.ret for the guest, a last-error message
 * naming the offending value, nothing changed, and the refusal counted.
 */
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include "check.h"

static const struct pagenc_ram_range q35[] = {
    { .gpa = 0, .size = 2 * GIB },
    { .gpa = 4 * GIB, .size = 2 * GIB },
};

static uint64_t rejected[PAGENC_REJECT_REASONS];

/* A refused MAP_GPA_RANGE: GUEST_REJECTED, hc_ret, the message, counted. */
#define REFUSED(t, nr, a0, a1, a2, want_ret, reason, needle)                     \
    do {                                                                         \
        uint64_t ret_ = 0x5a5a;                                                  \
        CHECK_RC(pagenc_hypercall((t), (nr), (a0), (a1), (a2), &ret_),          \
                 PAGENC_RESULT_GUEST_REJECTED);                                  \
        CHECK_U64(ret_, (want_ret));                                             \
        CHECK_MSG((t), needle);                                                  \
        rejected[(reason)]++;                                                    \
    } while (0)

static void bad_hypercalls(pagenc_tracker *t)
{
    const uint64_t nr = KVM_HC_MAP_GPA_RANGE;
    uint64_t ret = 0x5a5a;

    REFUSED(t, nr, 0x1234, 1, 0, RET_EINVAL, PAGENC_REJECT_REASON_UNALIGNED, "0x1234");
    REFUSED(t, nr, 0x100000 + 8, 1, KVM_MAP_GPA_RANGE_ENCRYPTED, RET_EINVAL,
            PAGENC_REJECT_REASON_UNALIGNED, "0x100008");
    REFUSED(t, nr, 0x200000, 0, 0, RET_EINVAL, PAGENC_REJECT_REASON_ZERO_LENGTH, "npages 0");
    /* gfn + npages wraps around 2^64 */
    REFUSED(t, nr, 0x1000, UINT64_MAX, 0, RET_EINVAL, PAGENC_REJECT_REASON_OUT_OF_RANGE,
            "18446744073709551615 pages");
    /* ends one page past the 52-bit limit */
    REFUSED(t, nr, PAGENC_GPA_LIMIT - PAGE, 2, 0, RET_EINVAL,
            PAGENC_REJECT_REASON_OUT_OF_RANGE, "0xffffffffff000 + 2 pages");
    /* starts past it */
    REFUSED(t, nr, PAGENC_GPA_LIMIT, 1, 0, RET_EINVAL, PAGENC_REJECT_REASON_OUT_OF_RANGE,
            "0x10000000000000");
    REFUSED(t, nr, 0x0, 1, 1ull << 5, RET_EINVAL, PAGENC_REJECT_REASON_RESERVED_ATTRS,
            "0x20");
    REFUSED(t, nr, 0x0, 1, 1ull << 63 | KVM_MAP_GPA_RANGE_ENCRYPTED, RET_EINVAL,
            PAGENC_REJECT_REASON_RESERVED_ATTRS, "0x8000000000000000");
    REFUSED(t, nr, 0x0, 1, 3, RET_EINVAL, PAGENC_REJECT_REASON_BAD_PAGE_SIZE_HINT, "hint 3");
    REFUSED(t, nr, 0x0, 1, 0xf | KVM_MAP_GPA_RANGE_ENCRYPTED, RET_EINVAL,
            PAGENC_REJECT_REASON_BAD_PAGE_SIZE_HINT, "hint 15");
    REFUSED(t, 11, 0x0, 1, 0, RET_ENOSYS, PAGENC_REJECT_REASON_UNKNOWN_HYPERCALL, "nr 11");
    REFUSED(t, UINT64_MAX, 0x0, 1, 0, RET_ENOSYS, PAGENC_REJECT_REASON_UNKNOWN_HYPERCALL,
            "nr 18446744073709551615");

    /* pagenc_map_gpa_range is the same call without nr */
    CHECK_RC(pagenc_map_gpa_range(t, 0x3001, 1, 0, &ret), PAGENC_RESULT_GUEST_REJECTED);
    CHECK_U64(ret, RET_EINVAL);
    CHECK_MSG(t, "0x3001");
    rejected[PAGENC_REJECT_REASON_UNALIGNED]++;
    /* hc_ret may be NULL */
    CHECK_RC(pagenc_map_gpa_range(t, 0x0, 0, 0, NULL), PAGENC_RESULT_GUEST_REJECTED);
    rejected[PAGENC_REJECT_REASON_ZERO_LENGTH]++;
}

static void bad_msrs(pagenc_tracker *t)
{
    uint64_t v = 0x77;

    CHECK_RC(pagenc_msr_write(t, MSR_KVM_MIGRATION_CONTROL, 2), PAGENC_RESULT_GUEST_REJECTED);
    CHECK_MSG(t, "0x2");
    rejected[PAGENC_REJECT_REASON_RESERVED_MSR_BITS]++;
    CHECK_RC(pagenc_msr_write(t, MSR_KVM_MIGRATION_CONTROL, KVM_MIGRATION_READY | 1ull << 40),
             PAGENC_RESULT_GUEST_REJECTED);
    CHECK_MSG(t, "0x10000000001");
    rejected[PAGENC_REJECT_REASON_RESERVED_MSR_BITS]++;
    CHECK(!pagenc_is_ready(t));

    /* another MSR is not pagenc's */
    CHECK_RC(pagenc_msr_write(t, 0x10, 0), PAGENC_RESULT_UNHANDLED_EXIT);
    CHECK_MSG(t, "MSR 0x10 ");
    CHECK_RC(pagenc_msr_read(t, 0x4b564d07, &v), PAGENC_RESULT_UNHANDLED_EXIT);
    CHECK_MSG(t, "0x4b564d07");
    CHECK_U64(v, 0x77); /* outputs only on success */
}

static void check_layout(const struct pagenc_ram_range *ram, size_t n, const char *needle,
                         int line)
{
    char msg[256] = "";
    pagenc_tracker *t = (pagenc_tracker *)&msg; /* must stay untouched */
    pagenc_tracker *ok = NULL;

    int rc = pagenc_tracker_new(ram, n, &t);
    check_(rc == PAGENC_RESULT_INVALID_LAYOUT, "tracker_new refuses the layout", __FILE__, line);
    check_(t == (pagenc_tracker *)&msg, "*out untouched", __FILE__, line);
    rc = pagenc_layout_check(ram, n, msg, sizeof(msg));
    check_(rc == PAGENC_RESULT_INVALID_LAYOUT && strstr(msg, needle) != NULL,
           "pagenc_layout_check names the bad value", __FILE__, line);
    if (!strstr(msg, needle))
        fprintf(stderr, "    wanted \"%s\" in \"%s\"\n", needle, msg);

    /* set_layout refuses it too, keeps the old layout and says why */
    CHECK_RC(pagenc_tracker_new(q35, 2, &ok), PAGENC_RESULT_OK);
    CHECK_RC(pagenc_map_gpa_range(ok, 0x1000, 1, 0, NULL), PAGENC_RESULT_OK);
    rc = pagenc_tracker_set_layout(ok, ram, n);
    check_(rc == PAGENC_RESULT_INVALID_LAYOUT, "set_layout refuses the layout", __FILE__, line);
    pagenc_last_error(ok, msg, sizeof(msg));
    check_(strstr(msg, needle) != NULL, "set_layout's last error names the bad value",
           __FILE__, line);
    struct pagenc_stats s;
    CHECK_RC(pagenc_tracker_stats(ok, &s), PAGENC_RESULT_OK);
    CHECK_U64(s.ram_pages, 4 * GIB / PAGE);
    CHECK(!pagenc_is_encrypted(ok, 0x1000));
    pagenc_tracker_free(ok);
}

static void bad_layouts(void)
{
    const struct pagenc_ram_range unaligned_gpa[] = { { 0x1800, 0x2000 } };
    const struct pagenc_ram_range unaligned_size[] = { { 0, 2 * GIB }, { 4 * GIB, 0x1801 } };
    const struct pagenc_ram_range empty[] = { { 0, 2 * GIB }, { 0x300000000, 0 } };
    const struct pagenc_ram_range overlap[] = { { 0, 2 * GIB }, { 0x7ff00000, 0x200000 } };
    const struct pagenc_ram_range past_52[] = { { PAGENC_GPA_LIMIT - PAGE, 2 * PAGE } };
    const struct pagenc_ram_range wraps[] = { { 0xfffffffffffff000, 0x2000 } };

    check_layout(unaligned_gpa, 1, "0x1800", __LINE__);
    check_layout(unaligned_size, 2, "0x1801", __LINE__);
    check_layout(empty, 2, "0x300000000", __LINE__);
    check_layout(overlap, 2, "0x7ff00000", __LINE__);
    check_layout(past_52, 1, "0xffffffffff000", __LINE__);
    check_layout(wraps, 1, "0xfffffffffffff000", __LINE__);

    /* more ranges than allowed: refused before they are read */
    size_t many = 5000;
    struct pagenc_ram_range *ram = calloc(many, sizeof(*ram));
    if (CHECK(ram != NULL)) {
        for (size_t i = 0; i < many; i++) {
            ram[i].gpa = i * 2 * PAGE;
            ram[i].size = PAGE;
        }
        check_layout(ram, many, "5000 ranges", __LINE__);
        free(ram);
    }

    /* NULL ranges with n > 0 are NULL_ARGUMENT, as documented, whatever n: also
     * an n that is too many ranges as well (issue 10: that gave INVALID_LAYOUT) */
    for (size_t i = 0; i < 3; i++) {
        const size_t ns[] = { 1, 4096, 5000 };
        pagenc_tracker *none = (pagenc_tracker *)0x1;
        char msg[128] = "";
        CHECK_RC(pagenc_tracker_new(NULL, ns[i], &none), PAGENC_RESULT_NULL_ARGUMENT);
        CHECK(none == (pagenc_tracker *)0x1);
        CHECK_RC(pagenc_layout_check(NULL, ns[i], msg, sizeof(msg)),
                 PAGENC_RESULT_NULL_ARGUMENT);
        CHECK(strstr(msg, "`ram` is NULL") != NULL);
    }

    /* an empty layout is fine (a guest without RAM yet) */
    pagenc_tracker *t = NULL;
    CHECK_RC(pagenc_tracker_new(NULL, 0, &t), PAGENC_RESULT_OK);
    CHECK_RC(pagenc_layout_check(NULL, 0, NULL, 0), PAGENC_RESULT_OK);
    pagenc_tracker_free(t);
}

static void null_arguments(pagenc_tracker *t)
{
    uint64_t ret = 0x5a5a, v = 0x77;
    pagenc_tracker *nt = NULL;
    pagenc_iter *it = NULL;
    pagenc_cursor *c = NULL;
    struct pagenc_run run;
    struct pagenc_stats st;
    struct kvm_run kr;
    char buf[16] = "junk";
    size_t written = 99;

    /* a NULL tracker: the code, and hc_ret still answers the guest */
    CHECK_RC(pagenc_map_gpa_range(NULL, 0, 1, 0, &ret), PAGENC_RESULT_NULL_ARGUMENT);
    CHECK_U64(ret, RET_EINVAL);
    ret = 0x5a5a;
    CHECK_RC(pagenc_hypercall(NULL, KVM_HC_MAP_GPA_RANGE, 0, 1, 0, &ret),
             PAGENC_RESULT_NULL_ARGUMENT);
    CHECK_U64(ret, RET_EINVAL);
    memset(&kr, 0, sizeof(kr));
    kr.exit_reason = KVM_EXIT_HYPERCALL;
    kr.hypercall.ret = 0x5a5a;
    CHECK_RC(pagenc_handle_exit(NULL, &kr), PAGENC_RESULT_NULL_ARGUMENT);
    CHECK_U64(kr.hypercall.ret, 0x5a5a);
    CHECK_RC(pagenc_msr_read(NULL, MSR_KVM_MIGRATION_CONTROL, &v), PAGENC_RESULT_NULL_ARGUMENT);
    CHECK_RC(pagenc_msr_write(NULL, MSR_KVM_MIGRATION_CONTROL, 0), PAGENC_RESULT_NULL_ARGUMENT);
    CHECK_RC(pagenc_tracker_set_layout(NULL, q35, 2), PAGENC_RESULT_NULL_ARGUMENT);
    CHECK_RC(pagenc_tracker_reset(NULL), PAGENC_RESULT_NULL_ARGUMENT);
    CHECK_RC(pagenc_tracker_stats(NULL, &st), PAGENC_RESULT_NULL_ARGUMENT);
    CHECK_RC(pagenc_tracker_set_change_callback(NULL, NULL, NULL), PAGENC_RESULT_NULL_ARGUMENT);
    CHECK_RC(pagenc_tracker_set_readiness_callback(NULL, NULL, NULL),
             PAGENC_RESULT_NULL_ARGUMENT);
    CHECK_RC(pagenc_iter_new(NULL, 0, PAGE, 0, &it), PAGENC_RESULT_NULL_ARGUMENT);
    CHECK_RC(pagenc_cursor_new(NULL, &c), PAGENC_RESULT_NULL_ARGUMENT);
    CHECK_RC(pagenc_save(NULL, NULL, 0, &written), PAGENC_RESULT_NULL_ARGUMENT);
    CHECK_RC(pagenc_save_to(NULL, NULL, NULL), PAGENC_RESULT_NULL_ARGUMENT);
    CHECK_RC(pagenc_load(NULL, NULL, 0), PAGENC_RESULT_NULL_ARGUMENT);
    CHECK(!pagenc_is_encrypted(NULL, 0));
    CHECK(!pagenc_is_ready(NULL));
    CHECK_U64(pagenc_last_error(NULL, buf, sizeof(buf)), 0);
    CHECK(buf[0] == '\0');
    CHECK(it == NULL && c == NULL && v == 0x77 && written == 99);

    /* NULL outputs and inputs of a live tracker, named in its message */
    CHECK_RC(pagenc_tracker_new(q35, 2, NULL), PAGENC_RESULT_NULL_ARGUMENT);
    CHECK_RC(pagenc_tracker_new(NULL, 2, &nt), PAGENC_RESULT_NULL_ARGUMENT);
    CHECK(nt == NULL);
    CHECK_RC(pagenc_tracker_set_layout(t, NULL, 1), PAGENC_RESULT_NULL_ARGUMENT);
    CHECK_MSG(t, "`ram`");
    CHECK_RC(pagenc_handle_exit(t, NULL), PAGENC_RESULT_NULL_ARGUMENT);
    CHECK_MSG(t, "`run`");
    CHECK_RC(pagenc_msr_read(t, MSR_KVM_MIGRATION_CONTROL, NULL), PAGENC_RESULT_NULL_ARGUMENT);
    CHECK_MSG(t, "`value`");
    CHECK_RC(pagenc_tracker_stats(t, NULL), PAGENC_RESULT_NULL_ARGUMENT);
    CHECK_MSG(t, "`out`");
    CHECK_RC(pagenc_iter_new(t, 0, PAGE, 0, NULL), PAGENC_RESULT_NULL_ARGUMENT);
    CHECK_RC(pagenc_cursor_new(t, NULL), PAGENC_RESULT_NULL_ARGUMENT);
    CHECK_RC(pagenc_save(t, NULL, 0, NULL), PAGENC_RESULT_NULL_ARGUMENT);
    CHECK_MSG(t, "`written`");
    CHECK_RC(pagenc_save_to(t, NULL, NULL), PAGENC_RESULT_NULL_ARGUMENT);
    CHECK_MSG(t, "`cb`");
    CHECK_RC(pagenc_load(t, NULL, 56), PAGENC_RESULT_NULL_ARGUMENT);
    CHECK_MSG(t, "`buf`");

    /* iterators and cursors */
    CHECK(!pagenc_iter_next(NULL, &run));
    CHECK_RC(pagenc_iter_result(NULL), PAGENC_RESULT_NULL_ARGUMENT);
    CHECK_RC(pagenc_iter_new(t, 0, PAGE, 0, &it), PAGENC_RESULT_OK);
    CHECK(!pagenc_iter_next(it, NULL));
    pagenc_iter_free(it);
    CHECK_RC(pagenc_cursor_query(NULL, 0, &run), PAGENC_RESULT_NULL_ARGUMENT);
    CHECK(!pagenc_cursor_is_encrypted(NULL, 0, NULL));
    CHECK_RC(pagenc_cursor_new(t, &c), PAGENC_RESULT_OK);
    CHECK_RC(pagenc_cursor_query(c, 0, NULL), PAGENC_RESULT_NULL_ARGUMENT);
    pagenc_cursor_free(c);

    /* freeing NULL is fine */
    pagenc_tracker_free(NULL);
    pagenc_iter_free(NULL);
    pagenc_cursor_free(NULL);
}

static void bad_iter_and_cursor(pagenc_tracker *t)
{
    pagenc_iter *it = NULL;
    pagenc_cursor *c = NULL;
    struct pagenc_run run = { 1, 2, true };
    uint64_t end = 0x77;

    CHECK_RC(pagenc_iter_new(t, 0x800, 4 * PAGE, 0, &it), PAGENC_RESULT_INVALID_ARGUMENT);
    CHECK_MSG(t, "0x800");
    CHECK_RC(pagenc_iter_new(t, 0, 0x4001, 0, &it), PAGENC_RESULT_INVALID_ARGUMENT);
    CHECK_MSG(t, "0x4001");
    CHECK_RC(pagenc_iter_new(t, 0x9000, 0x8000, 0, &it), PAGENC_RESULT_INVALID_ARGUMENT);
    CHECK_MSG(t, "0x9000");
    CHECK_RC(pagenc_iter_new(t, 0, PAGE, 0x6, &it), PAGENC_RESULT_INVALID_ARGUMENT);
    CHECK_MSG(t, "0x6");
    CHECK(it == NULL);

    CHECK_RC(pagenc_cursor_new(t, &c), PAGENC_RESULT_OK);
    CHECK_RC(pagenc_cursor_query(c, PAGENC_GPA_LIMIT, &run), PAGENC_RESULT_INVALID_ARGUMENT);
    CHECK_MSG(t, "0x10000000000000");
    CHECK(run.gpa == 1 && run.npages == 2 && run.encrypted);
    CHECK(!pagenc_cursor_is_encrypted(c, UINT64_MAX, &end));
    CHECK_U64(end, 0x77);
    CHECK_MSG(t, "0xffffffffffffffff");
    pagenc_cursor_free(c);
}

static void messages(pagenc_tracker *t)
{
    char small[8];
    char big[512];

    /* truncated but NUL-terminated, with the full length returned */
    CHECK_RC(pagenc_map_gpa_range(t, 0x1234, 1, 0, NULL), PAGENC_RESULT_GUEST_REJECTED);
    rejected[PAGENC_REJECT_REASON_UNALIGNED]++;
    size_t full = pagenc_last_error(t, NULL, 0);
    CHECK(full > 20);
    CHECK_U64(pagenc_last_error(t, small, sizeof(small)), full);
    CHECK(strlen(small) == sizeof(small) - 1);
    CHECK_U64(pagenc_last_error(t, big, sizeof(big)), full);
    CHECK_U64(strlen(big), full);
    CHECK(strncmp(small, big, sizeof(small) - 1) == 0);
    /* a success does not clear it */
    CHECK_RC(pagenc_map_gpa_range(t, 0x1000, 1, KVM_MAP_GPA_RANGE_ENCRYPTED, NULL),
             PAGENC_RESULT_OK);
    CHECK_U64(pagenc_last_error(t, NULL, 0), full);

    /* every code has a text; other values do not crash */
    for (int r = PAGENC_RESULT_OK; r <= PAGENC_RESULT_UNSUPPORTED; r++) {
        const char *s = pagenc_result_str(r);
        CHECK(s != NULL && s[0] != '\0' && strcmp(s, "unknown pagenc_result") != 0);
    }
    CHECK(strcmp(pagenc_result_str(-1), "unknown pagenc_result") == 0);
    CHECK(strcmp(pagenc_result_str(PAGENC_RESULT_UNSUPPORTED + 1), "unknown pagenc_result") == 0);
}

static void kvm_helpers(void)
{
    uint64_t mask = 0x77;
    int err = -1;

    CHECK_U64(pagenc_kvm_cpuid_features(), (1u << KVM_FEATURE_HC_MAP_GPA_RANGE) |
                                               (1u << KVM_FEATURE_MIGRATION_CONTROL));
    CHECK_RC(pagenc_kvm_enable_exit_hypercall(-1, 0, &mask, &err),
             PAGENC_RESULT_INVALID_ARGUMENT);
    CHECK(err == 0 && mask == 0x77);
    /* not a KVM fd: the ioctl fails and its errno comes back */
    int fd = open("/dev/null", O_RDWR);
    if (CHECK(fd >= 0)) {
        CHECK_RC(pagenc_kvm_enable_exit_hypercall(fd, 0, &mask, &err), PAGENC_RESULT_KVM_ERROR);
        CHECK(err == ENOTTY);
        CHECK_U64(mask, 0x77);
        CHECK_RC(pagenc_kvm_enable_exit_hypercall(fd, 0, NULL, NULL), PAGENC_RESULT_KVM_ERROR);
        close(fd);
    }
}

int main(void)
{
    pagenc_tracker *t = NULL;
    struct pagenc_stats s;

    CHECK_RC(pagenc_tracker_new(q35, 2, &t), PAGENC_RESULT_OK);
    if (!CHECK(t != NULL))
        return check_summary("test_bad_input");

    bad_hypercalls(t);
    bad_msrs(t);
    bad_layouts();
    null_arguments(t);
    bad_iter_and_cursor(t);
    messages(t);
    kvm_helpers();

    /* nothing was changed by any refusal, and each was counted by reason */
    CHECK_RC(pagenc_tracker_stats(t, &s), PAGENC_RESULT_OK);
    CHECK_U64(s.shared_pages, 0);
    CHECK_U64(s.pages_flipped, 0);
    CHECK_U64(s.msr_value, 0);
    CHECK_U64(s.msr_writes, 0);
    uint64_t total = 0;
    for (int i = 0; i < PAGENC_REJECT_REASONS; i++) {
        CHECK_U64(s.rejected[i], rejected[i]);
        if (i != PAGENC_REJECT_REASON_RESERVED_MSR_BITS)
            total += rejected[i];
    }
    /* accepted: the one re-encrypt in messages() */
    CHECK_U64(s.hypercalls, total + 1);

    pagenc_tracker_free(t);
    return check_summary("test_bad_input");
}
