/* The kernel uapi header the SEV firmware status codes (enum sev_ret_code) come from; see build.rs. */
#include <linux/psp-sev.h>
