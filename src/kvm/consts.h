/* The kernel uapi headers pagenc takes its KVM paravirt constants from (see build.rs). */
#include <errno.h>
#include <linux/kvm_para.h>
