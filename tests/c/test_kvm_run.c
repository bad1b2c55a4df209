/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * pagenc_handle_exit on a real struct kvm_run from <linux/kvm.h>, filled the
 * way KVM fills it: hypercall exits (accepted, refused, unknown nr, 32-bit
 * guest), MSR_KVM_MIGRATION_CONTROL reads and writes, other MSRs and other
 * exits, which must come back untouched.
 *
 * linux-libc-dev 6.1 has hypercall.longmode; newer headers put it in a union
 * with flags (bit 0 = KVM_EXIT_HYPERCALL_LONG_MODE). `longmode` is in both.
 */
#include <stdlib.h>

#include "check.h"

static struct kvm_run *new_run(uint32_t exit_reason)
{
    /* A vCPU's run area is a page (or more) of mmapped memory. */
    struct kvm_run *run = calloc(1, 4096);
    if (run)
        run->exit_reason = exit_reason;
    return run;
}

static struct kvm_run *hypercall_run(uint64_t nr, uint64_t a0, uint64_t a1, uint64_t a2,
                                     int longmode)
{
    struct kvm_run *run = new_run(KVM_EXIT_HYPERCALL);
    if (run) {
        run->hypercall.nr = nr;
        run->hypercall.args[0] = a0;
        run->hypercall.args[1] = a1;
        run->hypercall.args[2] = a2;
        run->hypercall.longmode = longmode;
        run->hypercall.ret = 0x5a5a5a5a; /* stale value: must be overwritten */
    }
    return run;
}

static struct kvm_run *msr_run(uint32_t exit_reason, uint32_t index, uint64_t data,
                               uint32_t reason)
{
    struct kvm_run *run = new_run(exit_reason);
    if (run) {
        run->msr.index = index;
        run->msr.data = data;
        run->msr.reason = reason;
        run->msr.error = 0x5a;
    }
    return run;
}

static void hypercalls(pagenc_tracker *t)
{
    struct kvm_run *run;

    /* accepted: ret 0, the pages are shared */
    run = hypercall_run(KVM_HC_MAP_GPA_RANGE, 0x200000, 16, 0, 1);
    if (CHECK(run != NULL)) {
        CHECK_RC(pagenc_handle_exit(t, run), PAGENC_RESULT_OK);
        CHECK_U64(run->hypercall.ret, 0);
        CHECK(!pagenc_is_encrypted(t, 0x200000 + 15 * PAGE));
        CHECK(pagenc_is_encrypted(t, 0x200000 + 16 * PAGE));
        free(run);
    }

    /* refused: ret -KVM_EINVAL, nothing changed, the message names the value */
    run = hypercall_run(KVM_HC_MAP_GPA_RANGE, 0x200010, 16, KVM_MAP_GPA_RANGE_ENCRYPTED, 1);
    if (CHECK(run != NULL)) {
        CHECK_RC(pagenc_handle_exit(t, run), PAGENC_RESULT_GUEST_REJECTED);
        CHECK_U64(run->hypercall.ret, RET_EINVAL);
        CHECK_MSG(t, "0x200010");
        CHECK(!pagenc_is_encrypted(t, 0x200000));
        free(run);
    }
    run = hypercall_run(KVM_HC_MAP_GPA_RANGE, 0x0, 1, 1ull << 7, 1);
    if (CHECK(run != NULL)) {
        CHECK_RC(pagenc_handle_exit(t, run), PAGENC_RESULT_GUEST_REJECTED);
        CHECK_U64(run->hypercall.ret, RET_EINVAL);
        CHECK_MSG(t, "0x80");
        free(run);
    }
    run = hypercall_run(KVM_HC_MAP_GPA_RANGE, 0x0, 0, 0, 1);
    if (CHECK(run != NULL)) {
        CHECK_RC(pagenc_handle_exit(t, run), PAGENC_RESULT_GUEST_REJECTED);
        CHECK_U64(run->hypercall.ret, RET_EINVAL);
        CHECK_MSG(t, "npages 0");
        free(run);
    }

    /* another hypercall number: the guest gets -KVM_ENOSYS */
    run = hypercall_run(KVM_HC_SEND_IPI, 1, 2, 3, 1);
    if (CHECK(run != NULL)) {
        CHECK_RC(pagenc_handle_exit(t, run), PAGENC_RESULT_GUEST_REJECTED);
        CHECK_U64(run->hypercall.ret, RET_ENOSYS);
        CHECK_MSG(t, "nr 10");
        free(run);
    }

    /* a 32-bit guest passes 32-bit registers: the upper halves are not
     * part of the call (KVM clears them; a run that has them is read the
     * same way) */
    run = hypercall_run(0xdead00000000ull | KVM_HC_MAP_GPA_RANGE, 0xbeef000000400000ull,
                        0xffffffff00000002ull, 0x1234567800000000ull, 0);
    if (CHECK(run != NULL)) {
        CHECK_RC(pagenc_handle_exit(t, run), PAGENC_RESULT_OK);
        CHECK_U64(run->hypercall.ret, 0);
        CHECK(!pagenc_is_encrypted(t, 0x401000));
        CHECK(pagenc_is_encrypted(t, 0x402000));
        free(run);
    }
    /* ... and re-encrypting it in long mode */
    run = hypercall_run(KVM_HC_MAP_GPA_RANGE, 0x400000, 2, KVM_MAP_GPA_RANGE_ENCRYPTED, 1);
    if (CHECK(run != NULL)) {
        CHECK_RC(pagenc_handle_exit(t, run), PAGENC_RESULT_OK);
        CHECK_U64(run->hypercall.ret, 0);
        CHECK(pagenc_is_encrypted(t, 0x400000));
        free(run);
    }
}

static void msrs(pagenc_tracker *t)
{
    struct kvm_run *run;

    run = msr_run(KVM_EXIT_X86_RDMSR, MSR_KVM_MIGRATION_CONTROL, 0x77,
                  KVM_MSR_EXIT_REASON_FILTER);
    if (CHECK(run != NULL)) {
        CHECK_RC(pagenc_handle_exit(t, run), PAGENC_RESULT_OK);
        CHECK_U64(run->msr.data, 0);
        CHECK_U64(run->msr.error, 0);
        free(run);
    }

    run = msr_run(KVM_EXIT_X86_WRMSR, MSR_KVM_MIGRATION_CONTROL, KVM_MIGRATION_READY,
                  KVM_MSR_EXIT_REASON_FILTER);
    if (CHECK(run != NULL)) {
        CHECK_RC(pagenc_handle_exit(t, run), PAGENC_RESULT_OK);
        CHECK_U64(run->msr.error, 0);
        CHECK(pagenc_is_ready(t));
        free(run);
    }

    run = msr_run(KVM_EXIT_X86_RDMSR, MSR_KVM_MIGRATION_CONTROL, 0,
                  KVM_MSR_EXIT_REASON_FILTER);
    if (CHECK(run != NULL)) {
        CHECK_RC(pagenc_handle_exit(t, run), PAGENC_RESULT_OK);
        CHECK_U64(run->msr.data, KVM_MIGRATION_READY);
        CHECK_U64(run->msr.error, 0);
        free(run);
    }

    /* reserved bits: #GP for the guest (msr.error = 1), value kept */
    run = msr_run(KVM_EXIT_X86_WRMSR, MSR_KVM_MIGRATION_CONTROL, 0x3,
                  KVM_MSR_EXIT_REASON_FILTER);
    if (CHECK(run != NULL)) {
        CHECK_RC(pagenc_handle_exit(t, run), PAGENC_RESULT_GUEST_REJECTED);
        CHECK_U64(run->msr.error, 1);
        CHECK_MSG(t, "0x3");
        CHECK(pagenc_is_ready(t));
        free(run);
    }

    /* offline CPU / kexec: back to not ready */
    run = msr_run(KVM_EXIT_X86_WRMSR, MSR_KVM_MIGRATION_CONTROL, 0,
                  KVM_MSR_EXIT_REASON_FILTER);
    if (CHECK(run != NULL)) {
        CHECK_RC(pagenc_handle_exit(t, run), PAGENC_RESULT_OK);
        CHECK_U64(run->msr.error, 0);
        CHECK(!pagenc_is_ready(t));
        free(run);
    }
}

/* An exit that is not pagenc's comes back with every byte of the run as it was. */
static void untouched(pagenc_tracker *t, struct kvm_run *run, const char *needle, int line)
{
    struct kvm_run *copy = malloc(4096);
    if (!check_(run != NULL && copy != NULL, "allocation", __FILE__, line)) {
        free(run);
        free(copy);
        return;
    }
    memcpy(copy, run, 4096);
    int rc = pagenc_handle_exit(t, run);
    check_(rc == PAGENC_RESULT_UNHANDLED_EXIT, "PAGENC_RESULT_UNHANDLED_EXIT", __FILE__, line);
    check_(memcmp(copy, run, 4096) == 0, "run untouched", __FILE__, line);
    char msg[512];
    pagenc_last_error(t, msg, sizeof(msg));
    check_(strstr(msg, needle) != NULL, "message names the exit", __FILE__, line);
    if (!strstr(msg, needle))
        fprintf(stderr, "    wanted \"%s\" in \"%s\"\n", needle, msg);
    free(copy);
    free(run);
}

static void not_ours(pagenc_tracker *t)
{
    struct kvm_run *io = new_run(KVM_EXIT_IO);
    if (io) {
        io->io.direction = KVM_EXIT_IO_OUT;
        io->io.port = 0x3f8;
        io->io.size = 1;
        io->io.count = 1;
        io->io.data_offset = 1024;
    }
    untouched(t, io, "exit_reason 2 ", __LINE__);
    untouched(t, new_run(KVM_EXIT_MMIO), "exit_reason 6 ", __LINE__);
    untouched(t, new_run(KVM_EXIT_SHUTDOWN), "exit_reason 8 ", __LINE__);
    /* another MSR, read and write */
    untouched(t, msr_run(KVM_EXIT_X86_RDMSR, 0x10, 0, KVM_MSR_EXIT_REASON_FILTER), "MSR 0x10 ",
              __LINE__);
    untouched(t, msr_run(KVM_EXIT_X86_WRMSR, 0xc0010117, 5, KVM_MSR_EXIT_REASON_UNKNOWN),
              "MSR 0xc0010117", __LINE__);
    /* pagenc's MSR, but the exit comes from the VMM's own unknown-MSR
     * handling, not from a filter pagenc set up */
    untouched(t, msr_run(KVM_EXIT_X86_WRMSR, MSR_KVM_MIGRATION_CONTROL, 1,
                         KVM_MSR_EXIT_REASON_UNKNOWN),
              "reason 0x2 ", __LINE__);
}

int main(void)
{
    const struct pagenc_ram_range ram[] = { { 0, 2 * GIB }, { 4 * GIB, 2 * GIB } };
    pagenc_tracker *t = NULL;
    struct pagenc_stats s;

    CHECK_RC(pagenc_tracker_new(ram, 2, &t), PAGENC_RESULT_OK);
    if (!CHECK(t != NULL))
        return check_summary("test_kvm_run");

    hypercalls(t);
    msrs(t);
    not_ours(t);

    CHECK_RC(pagenc_tracker_stats(t, &s), PAGENC_RESULT_OK);
    CHECK_U64(s.hypercalls, 7);
    CHECK_U64(s.rejected[PAGENC_REJECT_REASON_UNALIGNED], 1);
    CHECK_U64(s.rejected[PAGENC_REJECT_REASON_RESERVED_ATTRS], 1);
    CHECK_U64(s.rejected[PAGENC_REJECT_REASON_ZERO_LENGTH], 1);
    CHECK_U64(s.rejected[PAGENC_REJECT_REASON_UNKNOWN_HYPERCALL], 1);
    CHECK_U64(s.rejected[PAGENC_REJECT_REASON_RESERVED_MSR_BITS], 1);
    CHECK_U64(s.shared_pages, 16);
    CHECK_U64(s.msr_writes, 2);

    pagenc_tracker_free(t);
    return check_summary("test_kvm_run");
}
