#!/bin/sh
# /init of the nested rig's L1 (busybox only; see docs/nested.md). Loads Debian's own KVM
# modules, then runs the scenarios named on the kernel command line (nested.run=a,b,...) from
# /l1.sh, or opens a shell (nested.run=shell). Progress goes to the console (ttyS0); results
# go to ttyS1 as "=== BEGIN name" ... "=== END name" sections for the host-side test
# (tests/nested/test_nested.py). Always powers off at the end: a hung L1 is killed by the
# host's timeout, never left running.
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu

say() { echo "[L1 $(cut -d' ' -f1 /proc/uptime)s] $*"; }
# Results channel: raw, so the host reads exactly what was written.
stty -F /dev/ttyS1 raw -echo 2>/dev/null
exec 3>/dev/ttyS1
result() { echo "$*" >&3; say "$*"; }
finish() {
    echo "=== L1 DONE" >&3
    sync
    say "powering off"
    poweroff -f
    sleep 10
}

run=""
for w in $(cat /proc/cmdline); do
    case "$w" in nested.run=*) run=${w#nested.run=} ;; esac
done
say "L1 up: $(uname -r), nested.run=$run"

if ! grep -qw svm /proc/cpuinfo; then
    result "NESTED-CANNOT-RUN: the L1 CPU has no svm flag (L0 does not emulate AMD SVM)"
    finish
fi
for m in irqbypass kvm ccp kvm-amd; do
    if ! insmod /modules/$m.ko 2>/tmp/insmod.err; then
        result "NESTED-CANNOT-RUN: insmod $m.ko failed: $(cat /tmp/insmod.err)"
        finish
    fi
done
if [ ! -c /dev/kvm ]; then
    result "NESTED-CANNOT-RUN: kvm-amd loaded but /dev/kvm is missing"
    finish
fi
p=/sys/module/kvm_amd/parameters
params="nested=$(cat $p/nested) npt=$(cat $p/npt) nrips=$(cat $p/nrips 2>/dev/null)"
say "kvm-amd loaded: $params"
result "L1 kernel=$(uname -r) kvm_amd $params"

if [ "$run" = shell ]; then
    say "shell: the patched QEMU is /usr/bin/qemu-system-x86_64, the QMP client /bin/qmpc, the guest /payload.elf,"
    say "       /l1.sh has the scenarios (e.g. 'sh /l1.sh single'); 'poweroff -f' leaves"
    setsid cttyhack sh -l
    finish
fi

for s in $(echo "$run" | tr ',' ' '); do
    say "=== scenario $s"
    if sh /l1.sh "$s"; then
        result "SCENARIO $s rc=0"
    else
        result "SCENARIO $s rc=$?"
    fi
done
finish
