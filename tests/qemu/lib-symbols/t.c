/* Calls the library through its C ABI; linked beside other_rust.c. */
#include <stdio.h>
#include <pagenc.h>

int main(void)
{
    pagenc_tracker *t = NULL;
    struct pagenc_ram_range r = { 0, 1 << 20 };
    uint64_t ret = 1;

    if (pagenc_tracker_new(&r, 1, &t) != PAGENC_RESULT_OK || !t) {
        fprintf(stderr, "pagenc_tracker_new failed\n");
        return 1;
    }
    pagenc_map_gpa_range(t, 4096, 1, 0, &ret);
    if (ret != 0 || pagenc_is_encrypted(t, 4096) != 0) {
        fprintf(stderr, "map_gpa_range(4096, shared): ret %llu\n", (unsigned long long)ret);
        return 1;
    }
    pagenc_tracker_free(t);
    printf("ok: pagenc linked beside another Rust runtime\n");
    return 0;
}
