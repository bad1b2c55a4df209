#include <stdio.h>
#include <pagenc.h>
int main(void)
{
    pagenc_tracker *t = NULL;
    struct pagenc_ram_range r = { 0, 1 << 20 };
    uint64_t ret = 1;
    if (pagenc_tracker_new(&r, 1, &t) != PAGENC_RESULT_OK) return 1;
    pagenc_map_gpa_range(t, 4096, 1, 0, &ret);
    printf("cpuid 0x%x ret %llu encrypted(4096)=%d\n", pagenc_kvm_cpuid_features(), (unsigned long long)ret, pagenc_is_encrypted(t, 4096));
    pagenc_tracker_free(t);
    return 0;
}
