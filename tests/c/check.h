/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * A tiny test harness for the C tests of pagenc: every CHECK counts as passed
 * or failed (failures are printed with file and line and go on), and
 * check_summary() prints "N passed, M failed" and gives the exit status.
 */
#ifndef PAGENC_TEST_CHECK_H
#define PAGENC_TEST_CHECK_H

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include <linux/kvm_para.h> /* KVM_HC_*, KVM_E*, MSR_KVM_MIGRATION_CONTROL, ... */

#include "pagenc.h"

static int checks_passed;
static int checks_failed;

static int check_(int ok, const char *what, const char *file, int line)
{
    if (ok) {
        checks_passed++;
    } else {
        checks_failed++;
        fprintf(stderr, "%s:%d: FAILED: %s\n", file, line, what);
    }
    return ok;
}

#define CHECK(cond) check_(!!(cond), #cond, __FILE__, __LINE__)

#define CHECK_U64(actual, expected)                                          \
    do {                                                                     \
        uint64_t a_ = (uint64_t)(actual), e_ = (uint64_t)(expected);         \
        if (!check_(a_ == e_, #actual " == " #expected, __FILE__, __LINE__)) \
            fprintf(stderr, "    got 0x%" PRIx64 ", expected 0x%" PRIx64 "\n", \
                    a_, e_);                                                 \
    } while (0)

/* A call's pagenc_result, printed by name when it is not the expected one. */
#define CHECK_RC(call, expected)                                              \
    do {                                                                      \
        int r_ = (int)(call), e_ = (int)(expected);                           \
        if (!check_(r_ == e_, #call " == " #expected, __FILE__, __LINE__))    \
            fprintf(stderr, "    got %d (%s), expected %d (%s)\n", r_,        \
                    pagenc_result_str(r_), e_, pagenc_result_str(e_));        \
    } while (0)

/* The tracker's last error message contains `needle`. */
#define CHECK_MSG(t, needle)                                                  \
    do {                                                                      \
        char m_[512];                                                         \
        size_t n_ = pagenc_last_error((t), m_, sizeof(m_));                   \
        if (!check_(n_ > 0 && n_ < sizeof(m_) && strstr(m_, (needle)) != NULL, \
                    "last error mentions \"" needle "\"", __FILE__, __LINE__)) \
            fprintf(stderr, "    message: \"%s\"\n", m_);                     \
    } while (0)

static int check_summary(const char *program)
{
    printf("%s: %d passed, %d failed\n", program, checks_passed, checks_failed);
    return checks_failed ? 1 : 0;
}

/* hypercall.ret values, as the guest reads them in RAX */
#define RET_EINVAL ((uint64_t)-(int64_t)KVM_EINVAL)
#define RET_ENOSYS ((uint64_t)-(int64_t)KVM_ENOSYS)

#define GIB (1ull << 30)
#define MIB (1ull << 20)
#define PAGE 4096ull

#endif
