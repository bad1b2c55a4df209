/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The encrypted-page transport through the C API, as QEMU would call it:
 * two simulated SEV firmwares (source and destination, each with its own
 * memory key), send setup -> session record -> receive setup, pages sent and
 * received from several threads (multifd channels), shared pages copied as
 * they are, finish on both sides; then every refusal and failure path with
 * its code and message.
 *
 * Memory check without reimplementing the cipher in C: the guest goes
 * A (key K1) -> B (key K2) -> C (key K1). Every page of C must equal A's
 * bytes exactly (encrypted pages were re-keyed twice, back to K1), and B's
 * encrypted pages must differ from A's (the keys did something).
 */
#include <pthread.h>
#include <stdlib.h>

#include <linux/psp-sev.h> /* SEV_RET_* */

#include "check.h"

#define CHECK_TRC(call, expected)                                             \
    do {                                                                      \
        int r_ = (int)(call), e_ = (int)(expected);                           \
        if (!check_(r_ == e_, #call " == " #expected, __FILE__, __LINE__))    \
            fprintf(stderr, "    got %d (%s), expected %d (%s)\n", r_,        \
                    pagenc_transport_result_str(r_), e_,                      \
                    pagenc_transport_result_str(e_));                         \
    } while (0)

/* The transport's last error message contains `needle`. */
#define CHECK_TMSG(t, needle)                                                 \
    do {                                                                      \
        char m_[512];                                                         \
        size_t n_ = pagenc_transport_last_error((t), m_, sizeof(m_));        \
        if (!check_(n_ > 0 && n_ < sizeof(m_) && strstr(m_, (needle)) != NULL, \
                    "last error mentions \"" needle "\"", __FILE__, __LINE__)) \
            fprintf(stderr, "    message: \"%s\"\n", m_);                     \
    } while (0)

#define OPT_IN "x-sev-simulated-firmware"
#define NPAGES 96
#define POLICY 0x1u /* NODBG */

struct vm {
    uint8_t *ram; /* NPAGES pages: gpa 0..64 pages, then gpa 4 GiB.. */
    pagenc_simfw *fw;
    pagenc_transport *t;
};

static uint64_t gpa_of(size_t i)
{
    return i < 64 ? i * PAGE : 4 * GIB + (i - 64) * PAGE;
}

static int is_shared(size_t i)
{
    return i % 4 == 2;
}

static void vm_init(struct vm *v, uint32_t role, uint8_t key, uint8_t id)
{
    v->ram = aligned_alloc(PAGE, NPAGES * PAGE);
    memset(v->ram, 0, NPAGES * PAGE);
    struct pagenc_memslot slots[2] = {
        { .gpa = 0, .size = 64 * PAGE, .host = v->ram },
        { .gpa = 4 * GIB, .size = (NPAGES - 64) * PAGE, .host = v->ram + 64 * PAGE },
    };
    struct pagenc_simfw_config cfg = { .role = role, .policy = POLICY };
    memset(cfg.memory_key, key, sizeof(cfg.memory_key));
    memset(cfg.platform_id, id, sizeof(cfg.platform_id));
    char msg[256];
    v->fw = NULL;
    v->t = NULL;
    CHECK_TRC(pagenc_simfw_new(OPT_IN, &cfg, slots, 2, &v->fw, msg, sizeof(msg)),
              PAGENC_TRANSPORT_RESULT_OK);
    CHECK_TRC(pagenc_transport_new_simfw(v->fw, &v->t), PAGENC_TRANSPORT_RESULT_OK);
}

static void vm_free(struct vm *v)
{
    pagenc_transport_free(v->t);
    pagenc_simfw_free(v->fw);
    free(v->ram);
}

static uint8_t *cert(pagenc_simfw *fw, uint32_t kind, size_t *len)
{
    size_t n = 0;
    CHECK_TRC(pagenc_simfw_cert(fw, kind, NULL, 0, &n), PAGENC_TRANSPORT_RESULT_BUFFER_TOO_SMALL);
    uint8_t *b = malloc(n);
    CHECK_TRC(pagenc_simfw_cert(fw, kind, b, n, len), PAGENC_TRANSPORT_RESULT_OK);
    CHECK_U64(*len, n);
    return b;
}

/* Source set-up towards `dst` and destination set-up from the record. */
static void setup(struct vm *src, struct vm *dst)
{
    size_t src_pdh_len, pdh_len, plat_len, amd_len;
    uint8_t *src_pdh = cert(src->fw, PAGENC_SIMFW_CERT_PDH, &src_pdh_len);
    uint8_t *pdh = cert(dst->fw, PAGENC_SIMFW_CERT_PDH, &pdh_len);
    uint8_t *plat = cert(dst->fw, PAGENC_SIMFW_CERT_PLATFORM, &plat_len);
    uint8_t *amd = cert(dst->fw, PAGENC_SIMFW_CERT_AMD, &amd_len);
    struct pagenc_transport_send_params p = {
        .policy = POLICY, .mode = PAGENC_SEV_MODE_SEV,
        .src_pdh = src_pdh, .src_pdh_len = src_pdh_len,
        .dst_pdh = pdh, .dst_pdh_len = pdh_len,
        .dst_plat_certs = plat, .dst_plat_certs_len = plat_len,
        .amd_certs = amd, .amd_certs_len = amd_len,
    };
    CHECK_TRC(pagenc_transport_send_setup(src->t, &p), PAGENC_TRANSPORT_RESULT_OK);
    size_t n = 0;
    CHECK_TRC(pagenc_transport_session_record(src->t, NULL, 0, &n),
              PAGENC_TRANSPORT_RESULT_BUFFER_TOO_SMALL);
    CHECK(n > 24 && n <= PAGENC_TRANSPORT_SESSION_MAX);
    uint8_t *rec = malloc(n);
    size_t w = 0;
    CHECK_TRC(pagenc_transport_session_record(src->t, rec, n, &w), PAGENC_TRANSPORT_RESULT_OK);
    CHECK_U64(w, n);
    CHECK(memcmp(rec, "PGTS", 4) == 0);
    CHECK_TRC(pagenc_transport_recv_setup(dst->t, POLICY, PAGENC_SEV_MODE_SEV, rec, n),
              PAGENC_TRANSPORT_RESULT_OK);
    free(rec);
    free(src_pdh);
    free(pdh);
    free(plat);
    free(amd);
}

struct channel {
    struct vm *src, *dst;
    size_t first, step;
    int failures;
};

/* A multifd channel: every `step`-th encrypted page from `first`, sent and
 * received at once (the stream between them is a buffer). */
static void *channel_run(void *arg)
{
    struct channel *c = arg;
    size_t cap = pagenc_transport_packet_len(c->src->t);
    uint8_t *pk = malloc(cap);
    for (size_t i = c->first; i < NPAGES; i += c->step) {
        if (is_shared(i))
            continue;
        size_t n = 0, total = 0;
        if (pagenc_transport_send_page(c->src->t, gpa_of(i), c->src->ram + i * PAGE, pk, cap, &n)
                != PAGENC_TRANSPORT_RESULT_OK ||
            pagenc_transport_packet_size(c->dst->t, pk, PAGENC_TRANSPORT_PACKET_PREFIX, &total)
                != PAGENC_TRANSPORT_RESULT_OK ||
            total != n ||
            pagenc_transport_recv_page(c->dst->t, gpa_of(i), c->dst->ram + i * PAGE, pk, n)
                != PAGENC_TRANSPORT_RESULT_OK)
            c->failures++;
    }
    free(pk);
    return NULL;
}

static void migrate(struct vm *src, struct vm *dst)
{
    setup(src, dst);
    CHECK(!pagenc_simfw_guest_may_run(dst->fw));
    struct channel ch[4];
    pthread_t th[4];
    for (int k = 0; k < 4; k++) {
        ch[k] = (struct channel){ src, dst, (size_t)k, 4, 0 };
        CHECK(pthread_create(&th[k], NULL, channel_run, &ch[k]) == 0);
    }
    for (int k = 0; k < 4; k++) {
        pthread_join(th[k], NULL);
        CHECK(ch[k].failures == 0);
    }
    for (size_t i = 0; i < NPAGES; i++)
        if (is_shared(i))
            memcpy(dst->ram + i * PAGE, src->ram + i * PAGE, PAGE);
    /* The destination confirms, then the source finishes. */
    CHECK_TRC(pagenc_transport_recv_finish(dst->t), PAGENC_TRANSPORT_RESULT_OK);
    CHECK(pagenc_simfw_guest_may_run(dst->fw));
    CHECK(pagenc_simfw_guest_may_run(src->fw)); /* SUPDATE: still running */
    CHECK_TRC(pagenc_transport_send_finish(src->t), PAGENC_TRANSPORT_RESULT_OK);
    CHECK(!pagenc_simfw_guest_may_run(src->fw));
    CHECK_U64(pagenc_simfw_guest_state(src->fw), 6); /* SENT */
}

static void test_round_trip_and_back(void)
{
    struct vm a, b, c;
    vm_init(&a, PAGENC_SIMFW_ROLE_SOURCE, 0x11, 1);
    vm_init(&b, PAGENC_SIMFW_ROLE_DESTINATION, 0x22, 2);
    vm_init(&c, PAGENC_SIMFW_ROLE_DESTINATION, 0x11, 3);
    for (size_t i = 0; i < NPAGES * PAGE; i++)
        a.ram[i] = (uint8_t)(i * 2654435761u >> 13);

    migrate(&a, &b);
    size_t encrypted = 0, differ = 0;
    for (size_t i = 0; i < NPAGES; i++) {
        int same = memcmp(a.ram + i * PAGE, b.ram + i * PAGE, PAGE) == 0;
        if (is_shared(i))
            CHECK(same);
        else {
            encrypted++;
            differ += !same;
        }
    }
    CHECK_U64(differ, encrypted);
    struct pagenc_simfw_stats s;
    CHECK_TRC(pagenc_simfw_get_stats(a.fw, &s), PAGENC_TRANSPORT_RESULT_OK);
    CHECK_U64(s.send_update_data, encrypted);
    CHECK_U64(s.send_start, 1);
    CHECK_U64(s.send_finish, 1);
    CHECK_TRC(pagenc_simfw_get_stats(b.fw, &s), PAGENC_TRANSPORT_RESULT_OK);
    CHECK_U64(s.receive_update_data, encrypted);

    /* B now runs as a source: a received guest is RUNNING. */
    migrate(&b, &c);
    CHECK(memcmp(a.ram, c.ram, NPAGES * PAGE) == 0);
    vm_free(&a);
    vm_free(&b);
    vm_free(&c);
}

static void test_failures(void)
{
    struct vm a, b;
    vm_init(&a, PAGENC_SIMFW_ROLE_SOURCE, 0x11, 1);
    vm_init(&b, PAGENC_SIMFW_ROLE_DESTINATION, 0x22, 2);
    uint8_t pk[PAGENC_TRANSPORT_PACKET_MAX];
    size_t n = 0;

    /* Out of order. */
    CHECK_TRC(pagenc_transport_send_page(a.t, 0, a.ram, pk, sizeof(pk), &n),
              PAGENC_TRANSPORT_RESULT_BAD_STATE);
    CHECK_TMSG(a.t, "send page");
    CHECK_TRC(pagenc_transport_recv_finish(b.t), PAGENC_TRANSPORT_RESULT_BAD_STATE);
    CHECK_TRC(pagenc_transport_send_cancel(a.t), PAGENC_TRANSPORT_RESULT_OK);

    /* Refusals, before the firmware. */
    struct pagenc_transport_send_params p = { .policy = POLICY | 0x8 };
    CHECK_TRC(pagenc_transport_send_setup(a.t, &p), PAGENC_TRANSPORT_RESULT_REFUSED);
    CHECK_TMSG(a.t, "NOSEND");
    p.policy = POLICY;
    p.mode = PAGENC_SEV_MODE_SEV_SNP;
    CHECK_TRC(pagenc_transport_send_setup(a.t, &p), PAGENC_TRANSPORT_RESULT_REFUSED);
    CHECK_TMSG(a.t, "SEV-SNP");
    p.mode = PAGENC_SEV_MODE_SEV_ES;
    CHECK_TRC(pagenc_transport_send_setup(a.t, &p), PAGENC_TRANSPORT_RESULT_REFUSED);
    CHECK_TMSG(a.t, "VMSA");
    p.mode = 7;
    CHECK_TRC(pagenc_transport_send_setup(a.t, &p), PAGENC_TRANSPORT_RESULT_INVALID_ARGUMENT);
    CHECK_TMSG(a.t, "mode 7");
    p.mode = PAGENC_SEV_MODE_SEV;
    p.dst_pdh_len = 40; /* with a NULL pointer */
    CHECK_TRC(pagenc_transport_send_setup(a.t, &p), PAGENC_TRANSPORT_RESULT_NULL_ARGUMENT);
    struct pagenc_simfw_stats s;
    CHECK_TRC(pagenc_simfw_get_stats(a.fw, &s), PAGENC_TRANSPORT_RESULT_OK);
    CHECK_U64(s.send_start + s.length_queries, 0);

    /* A malformed session record. */
    uint8_t junk[64] = "PGTS";
    CHECK_TRC(pagenc_transport_recv_setup(b.t, POLICY, 0, junk, sizeof(junk)),
              PAGENC_TRANSPORT_RESULT_BAD_STREAM);
    CHECK_TMSG(b.t, "session record");

    setup(&a, &b);
    size_t cap = pagenc_transport_packet_len(a.t);
    CHECK(cap > PAGE && cap <= PAGENC_TRANSPORT_PACKET_MAX);

    /* A buffer too small says how much is needed. */
    CHECK_TRC(pagenc_transport_send_page(a.t, 0, a.ram, pk, 10, &n),
              PAGENC_TRANSPORT_RESULT_BUFFER_TOO_SMALL);
    CHECK_U64(n, cap);
    /* An unaligned gpa. */
    CHECK_TRC(pagenc_transport_send_page(a.t, 0x123, a.ram, pk, sizeof(pk), &n),
              PAGENC_TRANSPORT_RESULT_INVALID_ARGUMENT);
    CHECK_TMSG(a.t, "0x123");
    /* A host address outside guest RAM: the kernel's EFAULT. */
    static uint8_t elsewhere[2 * PAGE];
    uint8_t *outside = (uint8_t *)(((uintptr_t)elsewhere + PAGE - 1) & ~(uintptr_t)(PAGE - 1));
    CHECK_TRC(pagenc_transport_send_page(a.t, 0, outside, pk, sizeof(pk), &n),
              PAGENC_TRANSPORT_RESULT_KERNEL_ERROR);
    CHECK_TMSG(a.t, "EFAULT");
    CHECK_U64(pagenc_transport_last_fw_status(a.t), 0);

    /* An injected firmware failure names the command and the code. */
    CHECK_TRC(pagenc_simfw_inject_failure(a.fw, KVM_SEV_SEND_UPDATE_DATA, SEV_RET_RESOURCE_LIMIT),
              PAGENC_TRANSPORT_RESULT_OK);
    CHECK_TRC(pagenc_transport_send_page(a.t, 0x1000, a.ram + PAGE, pk, sizeof(pk), &n),
              PAGENC_TRANSPORT_RESULT_FIRMWARE_ERROR);
    CHECK_TMSG(a.t, "KVM_SEV_SEND_UPDATE_DATA");
    CHECK_TMSG(a.t, "SEV_RET_RESOURCE_LIMIT");
    CHECK_U64(pagenc_transport_last_fw_status(a.t), SEV_RET_RESOURCE_LIMIT);

    /* A damaged packet: refused by the firmware, the page untouched. */
    CHECK_TRC(pagenc_transport_send_page(a.t, 0x1000, a.ram + PAGE, pk, sizeof(pk), &n),
              PAGENC_TRANSPORT_RESULT_OK);
    memset(b.ram + PAGE, 0x5a, PAGE);
    pk[n - 1] ^= 0x80;
    CHECK_TRC(pagenc_transport_recv_page(b.t, 0x1000, b.ram + PAGE, pk, n),
              PAGENC_TRANSPORT_RESULT_FIRMWARE_ERROR);
    CHECK_TMSG(b.t, "KVM_SEV_RECEIVE_UPDATE_DATA");
    CHECK_U64(pagenc_transport_last_fw_status(b.t), SEV_RET_BAD_MEASUREMENT);
    CHECK(b.ram[PAGE] == 0x5a && b.ram[2 * PAGE - 1] == 0x5a);
    pk[n - 1] ^= 0x80;
    /* The right packet at the wrong page. */
    CHECK_TRC(pagenc_transport_recv_page(b.t, 0x2000, b.ram + 2 * PAGE, pk, n),
              PAGENC_TRANSPORT_RESULT_BAD_STREAM);
    CHECK_TMSG(b.t, "delivered to gpa 0x2000");
    /* Truncated, and a hostile prefix. */
    CHECK_TRC(pagenc_transport_recv_page(b.t, 0x1000, b.ram + PAGE, pk, n - 1),
              PAGENC_TRANSPORT_RESULT_BAD_STREAM);
    uint8_t bad[PAGENC_TRANSPORT_PACKET_PREFIX];
    memcpy(bad, pk, sizeof(bad));
    bad[4] = 0xff; /* hdr_len 0xff0000xx */
    size_t total = 0;
    CHECK_TRC(pagenc_transport_packet_size(b.t, bad, sizeof(bad), &total),
              PAGENC_TRANSPORT_RESULT_BAD_STREAM);
    CHECK_TMSG(b.t, "16384");
    CHECK_TRC(pagenc_transport_recv_page(b.t, 0x1000, b.ram + PAGE, pk, n),
              PAGENC_TRANSPORT_RESULT_OK);

    /* Cancel: the source runs on; finishing is then refused. */
    CHECK_TRC(pagenc_transport_send_cancel(a.t), PAGENC_TRANSPORT_RESULT_OK);
    CHECK(pagenc_simfw_guest_may_run(a.fw));
    CHECK_U64(pagenc_simfw_guest_state(a.fw), 3); /* RUNNING */
    CHECK_TRC(pagenc_transport_send_finish(a.t), PAGENC_TRANSPORT_RESULT_BAD_STATE);
    CHECK(!pagenc_simfw_guest_may_run(b.fw));

    vm_free(&a);
    vm_free(&b);
}

static void test_construction_and_nulls(void)
{
    struct pagenc_simfw_config cfg = { .role = PAGENC_SIMFW_ROLE_SOURCE };
    pagenc_simfw *fw = NULL;
    char msg[256];
    CHECK_TRC(pagenc_simfw_new("sev", &cfg, NULL, 0, &fw, msg, sizeof(msg)),
              PAGENC_TRANSPORT_RESULT_INVALID_ARGUMENT);
    CHECK(strstr(msg, "for tests only") != NULL);
    CHECK(fw == NULL);
    cfg.role = 9;
    CHECK_TRC(pagenc_simfw_new(OPT_IN, &cfg, NULL, 0, &fw, msg, sizeof(msg)),
              PAGENC_TRANSPORT_RESULT_INVALID_ARGUMENT);
    CHECK(strstr(msg, "role 9") != NULL);
    cfg.role = PAGENC_SIMFW_ROLE_SOURCE;
    struct pagenc_memslot slot = { .gpa = 0x10, .size = PAGE, .host = (void *)0x10000 };
    CHECK_TRC(pagenc_simfw_new(OPT_IN, &cfg, &slot, 1, &fw, msg, sizeof(msg)),
              PAGENC_TRANSPORT_RESULT_INVALID_ARGUMENT);
    CHECK(strstr(msg, "memslot 0") != NULL);
    CHECK_TRC(pagenc_simfw_new(NULL, &cfg, NULL, 0, &fw, msg, sizeof(msg)),
              PAGENC_TRANSPORT_RESULT_NULL_ARGUMENT);
    CHECK_TRC(pagenc_simfw_new(OPT_IN, &cfg, NULL, 0, &fw, NULL, 0), PAGENC_TRANSPORT_RESULT_OK);
    pagenc_transport *t = NULL;
    CHECK_TRC(pagenc_transport_new_simfw(NULL, &t), PAGENC_TRANSPORT_RESULT_NULL_ARGUMENT);
    CHECK_TRC(pagenc_transport_new_simfw(fw, &t), PAGENC_TRANSPORT_RESULT_OK);
    /* The transport keeps the firmware alive after its free. */
    pagenc_simfw_free(fw);
    CHECK_U64(pagenc_transport_packet_len(t), 0);
    CHECK_TRC(pagenc_transport_send_setup(t, NULL), PAGENC_TRANSPORT_RESULT_NULL_ARGUMENT);
    CHECK_TRC(pagenc_transport_send_finish(NULL), PAGENC_TRANSPORT_RESULT_NULL_ARGUMENT);
    CHECK(!pagenc_simfw_guest_may_run(NULL));
    CHECK_U64(pagenc_simfw_guest_state(NULL), 0);
    CHECK_U64(pagenc_transport_last_fw_status(NULL), 0);
    CHECK_U64(pagenc_transport_last_error(NULL, NULL, 0), 0);
    CHECK_TRC(pagenc_transport_new_kvm(-1, -1, &t), PAGENC_TRANSPORT_RESULT_INVALID_ARGUMENT);
    pagenc_transport_free(t);
    pagenc_transport_free(NULL);
    pagenc_simfw_free(NULL);
    CHECK(strcmp(pagenc_transport_result_str(PAGENC_TRANSPORT_RESULT_FIRMWARE_ERROR),
                 "the SEV firmware failed the command") == 0);
    CHECK(strcmp(pagenc_transport_result_str(-1), "unknown pagenc_transport_result") == 0);
}

int main(void)
{
    test_construction_and_nulls();
    test_round_trip_and_back();
    test_failures();
    return check_summary("test_transport");
}
