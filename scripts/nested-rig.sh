#!/usr/bin/env bash
# The nested-KVM rig (issue 11, docs/nested.md): an L1 Debian kernel booted under the patched
# QEMU in TCG with an emulated AMD SVM CPU, where Debian's own kvm.ko/kvm-amd.ko run a guest
# (L2) whose VMMCALLs reach pagenc through Linux's real KVM_EXIT_HYPERCALL path.
#
#   scripts/nested-rig.sh fetch                  download + unpack the Debian parts (cached)
#   scripts/nested-rig.sh initramfs              build/nested/initrd.gz (QEMU, libs, payload, tests)
#   scripts/nested-rig.sh run KERNEL [ARGS...]   boot L1 (KERNEL: 6.1 or 6.12) and run the scenario
#                                                named by ARGS (nested.run=...), bounded by a timeout
#   scripts/nested-rig.sh shell [KERNEL]         boot L1 with kvm-amd loaded and a shell on the console
#   scripts/nested-rig.sh check                  all of the above that `make check-nested` needs:
#                                                two L1 boots, results in build/nested/out
#
# Parts (all Debian packages, fetched with `apt-get download` through a private apt
# configuration under build/nested/apt (scripts/lib/debian-fetch.sh), unpacked with `dpkg-deb`;
# nothing is installed):
#   linux-image 6.1 (bookworm / bookworm-security) and 6.12 (bookworm-backports): vmlinuz and
#   the modules irqbypass, kvm, ccp, kvm-amd; busybox-static; cpio (to pack the initramfs).
# Versions are pinned below. Debian's mirror drops superseded kernel ABIs after security
# updates: when a pinned one is gone, the newest package of the same series in that suite is
# used instead, and this script says so loudly (NESTED-FALLBACK line).
#
# L0 is the patched QEMU itself (build/qemu-build/qemu-system-x86_64, -accel tcg, q35,
# -nodefaults): no other emulator is needed. L1's initramfs carries the same QEMU binary and the
# libraries `ldd` names, so the rig follows whatever QEMU version scripts/build-qemu.sh builds.
#
# Exit status 77 means "cannot run here" (packages unreachable, no QEMU binary, no TCG SVM):
# callers skip on it unless PAGENC_REQUIRE_NESTED=1.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
N=$ROOT/build/nested
QEMU=${PAGENC_QEMU:-$ROOT/build/qemu-build/qemu-system-x86_64}
BIOS_DIR=${PAGENC_BIOS_DIR:-/usr/share/seabios}

# Pinned parts: package=version@suite. The kernel series (for the fallback) is the package
# name pattern.
K61_PKG=linux-image-6.1.0-57-amd64 K61_VER=6.1.192-3 K61_SUITES="bookworm bookworm-security"
K61_SERIES='^linux-image-6\.1\.0-[0-9]+-amd64$'
K612_PKG=linux-image-6.12.95+deb12-amd64 K612_VER=6.12.95-1~bpo12+1 K612_SUITES="bookworm-backports"
K612_SERIES='^linux-image-6\.12\.[0-9]+\+deb12-amd64$'
BUSYBOX_PKG=busybox-static BUSYBOX_VER=1:1.35.0-4+deb12u1+b1
CPIO_PKG=cpio CPIO_VER=2.13+dfsg-7.1

T0=${NESTED_T0:-$(date +%s.%N)}
export NESTED_T0=$T0
el() { awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $T0}"; }
say() { printf '[nested %6ss] %s\n' "$(el)" "$*"; }
die() { printf '[nested %6ss] ERROR: %s\n' "$(el)" "$*" >&2; exit 1; }
cannot() { printf '[nested %6ss] NESTED-CANNOT-RUN: %s\n' "$(el)" "$*" >&2; exit 77; }

# ------------------------------------------------------------------------------------------
# apt, privately (scripts/lib/debian-fetch.sh): bookworm + updates + security + backports, lists
# under build/nested/apt.
# shellcheck source=scripts/lib/debian-fetch.sh
. "$ROOT/scripts/lib/debian-fetch.sh"
A=$N/apt
apt_ready=0
apt_update() {
    [ $apt_ready = 1 ] && return 0
    debfetch_init "$A" bookworm bookworm-updates bookworm-backports \
        "http://deb.debian.org/debian-security bookworm-security"
    # A stale list (a day old) is refreshed: the pinned kernel may have been superseded.
    if [ -z "$(find "$A/lists" -maxdepth 1 -name '*Packages*' -mmin -1440 2>/dev/null | head -1)" ]; then
        say "fetch: apt-get update (private lists in build/nested/apt)"
        debfetch_update || cannot "apt-get update failed: Debian's mirror is unreachable"
    fi
    apt_ready=1
}

# Which version of $pkg is available from one of $suites (the newest whose suite matches, the pin
# if it is served), or nothing.
available() {
    local pkg=$1 ver=$2 suites=$3
    # shellcheck disable=SC2086
    if [ -n "$ver" ]; then
        debfetch_served "$pkg" $suites | grep -xF -- "$ver" | head -1 || true
    else
        debfetch_served "$pkg" $suites | head -1
    fi
}

# Resolves a kernel pin to "package=version", falling back to the newest of the series (one
# `apt-cache madison` over every package of the series).
resolve_kernel() {
    local pkg=$1 ver=$2 suites=$3 series=$4 got best
    got=$(available "$pkg" "$ver" "$suites")
    if [ -n "$got" ]; then echo "$pkg=$got"; return; fi
    # shellcheck disable=SC2046
    best=$(apt-cache "${DEBFETCH_APTOPTS[@]}" madison \
               $(apt-cache "${DEBFETCH_APTOPTS[@]}" pkgnames linux-image- | grep -E "$series") 2>/dev/null |
        while IFS='|' read -r p v src; do
            p=$(echo "$p" | xargs); v=$(echo "$v" | xargs); src=$(echo "$src" | xargs)
            for s in $suites; do
                case "$src" in *" $s/"*|*" $s "*) echo "$p $v" ;; esac
            done
        done | sort -u | while read -r p v; do
            if [ -z "${bv:-}" ] || dpkg --compare-versions "$v" gt "$bv"; then bp=$p bv=$v; fi
            echo "$bp=$bv"
        done | tail -1)
    [ -n "$best" ] || cannot "neither $pkg=$ver nor any package matching $series is served in $suites"
    printf '[nested %6ss] NESTED-FALLBACK: %s=%s is no longer served by %s; using the newest of the series, %s\n' \
        "$(el)" "$pkg" "$ver" "$suites" "$best" >&2
    echo "$best"
}

# Downloads package=version into build/nested/debs (cached by file name).
download() {
    local spec=$1 pkg=${1%%=*} ver=${1#*=} f
    # apt writes an epoch's colon as %3a.
    f=$N/debs/${pkg}_${ver/:/%3a}_amd64.deb
    if [ ! -f "$f" ]; then
        apt_update
        f=$(debfetch_download "$N/debs" "$spec") || {
            [ $? = 2 ] && die "apt-get download $spec did not produce ${spec%%=*}_*.deb"
            cannot "apt-get download $spec failed"
        }
    fi
    echo "$f"
}

# Unpacks a kernel package's vmlinuz and the four KVM modules (decompressed) into $N/k-$tag.
unpack_kernel() {
    local tag=$1 deb=$2 d=$N/k-$1 tmp
    if [ -f "$d/.done" ] && [ "$(cat "$d/.done")" = "$(basename "$deb")" ]; then return; fi
    rm -rf "$d"; tmp=$d/x; mkdir -p "$tmp" "$d/modules"
    dpkg-deb --fsys-tarfile "$deb" | tar -C "$tmp" -x --wildcards './boot/vmlinuz-*' \
        '*/kernel/virt/lib/irqbypass.ko*' '*/kernel/arch/x86/kvm/kvm.ko*' \
        '*/kernel/arch/x86/kvm/kvm-amd.ko*' '*/kernel/drivers/crypto/ccp/ccp.ko*'
    cp "$tmp"/boot/vmlinuz-* "$d/vmlinuz"
    local m
    for m in irqbypass kvm ccp kvm-amd; do
        local f
        f=$(find "$tmp" -name "$m.ko*" | head -1)
        [ -n "$f" ] || die "$deb has no $m.ko"
        case "$f" in
            *.xz) xz -dc "$f" > "$d/modules/$m.ko" ;;
            *.zst) zstd -qdc "$f" > "$d/modules/$m.ko" ;;
            *) cp "$f" "$d/modules/$m.ko" ;;
        esac
    done
    basename "$(find "$tmp/lib/modules" -mindepth 1 -maxdepth 1 -type d | head -1)" > "$d/release"
    rm -rf "$tmp"
    basename "$deb" > "$d/.done"
}

cmd_fetch() {
    mkdir -p "$N/debs"
    say "fetch: Debian parts (pinned; cached in build/nested/debs)"
    local k61 k612 bb cp
    local pins="$K61_PKG=$K61_VER $K612_PKG=$K612_VER $BUSYBOX_VER $CPIO_VER"
    if [ -f "$N/k-6.1/.done" ] && [ -f "$N/k-6.12/.done" ] && [ -x "$N/busybox" ] && [ -x "$N/cpio" ] &&
       debfetch_stamp_is "$N/pins" "$pins" && [ -z "${NESTED_REFETCH:-}" ]; then
        say "fetch: cached: $(cat "$N/k-6.1/.done") $(cat "$N/k-6.12/.done")"
        return
    fi
    apt_update
    k61=$(resolve_kernel "$K61_PKG" "$K61_VER" "$K61_SUITES" "$K61_SERIES")
    k612=$(resolve_kernel "$K612_PKG" "$K612_VER" "$K612_SUITES" "$K612_SERIES")
    bb=$(available "$BUSYBOX_PKG" "$BUSYBOX_VER" "bookworm bookworm-updates bookworm-security")
    [ -n "$bb" ] || { bb=$(available "$BUSYBOX_PKG" "" "bookworm bookworm-updates bookworm-security")
        echo "[nested] NESTED-FALLBACK: $BUSYBOX_PKG=$BUSYBOX_VER gone, using $bb" >&2; }
    cp=$(available "$CPIO_PKG" "$CPIO_VER" "bookworm bookworm-updates bookworm-security")
    [ -n "$cp" ] || { cp=$(available "$CPIO_PKG" "" "bookworm bookworm-updates bookworm-security")
        echo "[nested] NESTED-FALLBACK: $CPIO_PKG=$CPIO_VER gone, using $cp" >&2; }
    local d61 d612 dbb dcp
    say "fetch: apt-get download $k61 $k612 $BUSYBOX_PKG=$bb $CPIO_PKG=$cp"
    d61=$(download "$k61"); d612=$(download "$k612")
    dbb=$(download "$BUSYBOX_PKG=$bb"); dcp=$(download "$CPIO_PKG=$cp")
    say "fetch: dpkg-deb: vmlinuz + irqbypass/kvm/ccp/kvm-amd modules"
    unpack_kernel 6.1 "$d61"
    unpack_kernel 6.12 "$d612"
    local t
    t=$(mktemp -d); dpkg-deb -x "$dbb" "$t"; cp "$t/bin/busybox" "$N/busybox"; rm -rf "$t"
    t=$(mktemp -d); dpkg-deb -x "$dcp" "$t"; cp "$t/bin/cpio" "$N/cpio"; rm -rf "$t"
    echo "$pins" > "$N/pins"
    say "fetch: L1 kernels $(cat "$N/k-6.1/release") and $(cat "$N/k-6.12/release"), busybox $bb, cpio $cp"
}

# ------------------------------------------------------------------------------------------
# The L1 initramfs: a common part (busybox, the patched QEMU and its ldd libraries, firmware,
# the guest payload, qmpc, the kvm_guest test binary, /init, /l1.sh) and one small part per
# kernel (its modules), concatenated (the kernel unpacks every cpio in the initrd).
copy_with_libs() { # binary destination-dir-in-root root
    local bin=$1 dest=$2 r=$3 lib
    mkdir -p "$r$dest" "$r/lib/x86_64-linux-gnu" "$r/lib64"
    cp "$bin" "$r$dest/"
    for lib in $(ldd "$bin" | awk '/=> \//{print $3} /^\t\/lib64\//{print $1}'); do
        case "$lib" in
            /lib64/*) cp -L "$lib" "$r/lib64/" ;;
            *) [ -f "$r/lib/x86_64-linux-gnu/$(basename "$lib")" ] || cp -L "$lib" "$r/lib/x86_64-linux-gnu/" ;;
        esac
    done
}

cmd_initramfs() {
    [ -x "$QEMU" ] || cannot "$QEMU does not exist: run scripts/build-qemu.sh"
    [ -x "$N/busybox" ] && [ -x "$N/cpio" ] || die "run '$0 fetch' first"
    say "initramfs: guest payload, option ROMs, qmpc, the kvm_guest test binary"
    make -s -C "$ROOT/guest" all nested-roms >/dev/null
    mkdir -p "$N/tools"
    gcc -static -O2 -Wall -Wextra -Werror -o "$N/tools/qmpc" "$ROOT/tests/nested/qmpc.c"
    local testbin
    testbin=$(cd "$ROOT" && cargo test -q --no-run --test kvm_guest --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable"): print(m["executable"])' | tail -1)
    [ -n "$testbin" ] && [ -x "$testbin" ] || die "cargo test --no-run --test kvm_guest gave no executable"

    local r=$N/root
    rm -rf "$r"; mkdir -p "$r"/{bin,usr/bin,fw,modules,proc,sys,dev,tmp}
    cp "$N/busybox" "$r/bin/busybox"
    ln -s busybox "$r/bin/sh"             # for /init's #!; it installs the other applets
    # The patched QEMU without its debug info (51 MB -> 13 MB), and what ldd says it needs.
    objcopy --strip-debug "$QEMU" "$N/tools/qemu-system-x86_64"
    copy_with_libs "$N/tools/qemu-system-x86_64" /usr/bin "$r"
    copy_with_libs "$testbin" / "$r"
    mv "$r/$(basename "$testbin")" "$r/kvm_guest"
    cp "$N/tools/qmpc" "$r/bin/qmpc"
    cp "$BIOS_DIR/bios-256k.bin" "$r/fw/"
    cp "$ROOT"/guest/build/roms/*.bin "$r/fw/"
    cp "$ROOT/guest/build/payload.elf" "$r/payload.elf"
    cp "$ROOT/tests/nested/init.sh" "$r/init"
    cp "$ROOT/tests/nested/l1.sh" "$r/l1.sh"
    chmod 755 "$r/init"
    (cd "$r" && find . | LC_ALL=C sort | "$N/cpio" --quiet -o -H newc -R 0:0 | gzip -1 > "$N/initrd-base.gz")
    local k
    for k in 6.1 6.12; do
        local m=$N/mods-$k
        rm -rf "$m"; mkdir -p "$m/modules"
        cp "$N/k-$k/modules/"*.ko "$m/modules/"
        (cd "$m" && find . | LC_ALL=C sort | "$N/cpio" --quiet -o -H newc -R 0:0 | gzip -1 > "$N/initrd-mods-$k.gz")
        cat "$N/initrd-base.gz" "$N/initrd-mods-$k.gz" > "$N/initrd-$k.img"
    done
    say "initramfs: build/nested/initrd-{6.1,6.12}.img ($(du -h "$N/initrd-6.1.img" | cut -f1); $(du -sh "$r" | cut -f1) unpacked)"
}

# run KERNEL RUN [TIMEOUT]: boots L1 with nested.run=RUN; console to stdout (prefixed), results
# (ttyS1) to build/nested/out/results-KERNEL.txt. A hung L1 is killed at TIMEOUT seconds.
cmd_run() {
    local k=$1 run=$2 limit=${3:-600} out=$N/out
    [ -f "$N/k-$k/vmlinuz" ] || die "no kernel $k: run '$0 fetch'"
    [ -f "$N/initrd-$k.img" ] || die "no initramfs: run '$0 initramfs'"
    mkdir -p "$out"
    # Only `check` writes status "ok": results of a run by hand are not what tests/nested expects.
    rm -f "$out/results-$k.txt" "$out/status"
    say "boot L1 $(cat "$N/k-$k/release") under TCG (-cpu $NESTED_CPU), nested.run=$run, limit ${limit}s"
    local rc=0
    set +e
    timeout -s KILL "$limit" nice -n 10 "$QEMU" -accel tcg -M q35 -cpu "$NESTED_CPU" -m 2G -smp 1 \
        -nodefaults -display none -no-reboot \
        -L "$ROOT/guest/build/roms" -L "$BIOS_DIR" \
        -kernel "$N/k-$k/vmlinuz" -initrd "$N/initrd-$k.img" \
        -append "console=ttyS0 panic=-1 quiet edd=off nested.run=$run" \
        -chardev stdio,id=con,signal=off -serial chardev:con \
        -serial "file:$out/results-$k.txt" 2>&1 < /dev/null |
        while IFS= read -r line; do
            # TCG lacks a few features of the EPYC model (nrip-save among them, docs/nested.md)
            case "$line" in *"TCG doesn't support requested feature"*) continue ;; esac
            printf '[nested %6ss] L1 %s| %s\n' "$(el)" "$k" "${line%$'\r'}"
        done
    rc=${PIPESTATUS[0]}
    set -e
    if [ "$rc" = 137 ]; then
        echo "NESTED-TIMEOUT: L1 $k killed after ${limit}s" >> "$out/results-$k.txt"
        die "L1 $k did not finish within ${limit}s (killed)"
    fi
    grep -q '^=== L1 DONE' "$out/results-$k.txt" || die "L1 $k ended (QEMU rc $rc) without finishing its scenarios"
    if grep -q '^NESTED-CANNOT-RUN' "$out/results-$k.txt"; then
        cannot "$(grep -m1 '^NESTED-CANNOT-RUN' "$out/results-$k.txt" | sed 's/^NESTED-CANNOT-RUN: //')"
    fi
    say "L1 $k done: $(grep -c '^SCENARIO .* rc=0' "$out/results-$k.txt") scenarios passed in L1, $(grep -c '^SCENARIO .* rc=[1-9]' "$out/results-$k.txt") failed"
}

cmd_shell() {
    local k=${1:-6.12}
    cmd_fetch
    cmd_initramfs
    say "shell: L1 $(cat "$N/k-$k/release") on this terminal; kvm-amd is loaded; 'sh /l1.sh single' runs a scenario; 'poweroff -f' leaves"
    exec nice -n 10 "$QEMU" -accel tcg -M q35 -cpu "$NESTED_CPU" -m 2G -smp 1 -nodefaults \
        -display none -no-reboot -L "$ROOT/guest/build/roms" -L "$BIOS_DIR" \
        -kernel "$N/k-$k/vmlinuz" -initrd "$N/initrd-$k.img" \
        -append "console=ttyS0 panic=-1 quiet edd=off nested.run=shell" \
        -chardev stdio,id=con,mux=on,signal=off -serial chardev:con -mon chardev=con,mode=readline \
        -serial "file:$N/out/shell-results.txt"
}

# check: what `make check-nested` runs. Two L1 boots: 6.1 (the library's KVM tests, the guest's
# boot sequence + churn + reset, the negative control) and 6.12 (the same tests in the newer
# hypercall exit layout, boot sequence + reset, the live migration). Writes
# build/nested/out/status: "ok", "cannot-run: why" (exit 0: tests/nested skips, or fails with
# PAGENC_REQUIRE_NESTED=1), or "failed: step" (exit 1).
cmd_check() {
    local out=$N/out step rc
    rm -rf "$out"; mkdir -p "$out"
    for step in "fetch" "initramfs" "run 6.1 kvmtests,single,negctl 420" \
                "run 6.12 kvmtests,single,migrate 600"; do
        rc=0
        # shellcheck disable=SC2086
        bash "$0" $step 2> >(tee -a "$out/rig.err" >&2) || rc=$?
        if [ $rc = 77 ]; then
            echo "cannot-run: $(sed -n 's/.*NESTED-CANNOT-RUN: //p' "$out/rig.err" | tail -1)" > "$out/status"
            say "$(cat "$out/status")"
            return 0
        fi
        if [ $rc != 0 ]; then
            echo "failed: $step (exit $rc): $(grep -v '^$' "$out/rig.err" | tail -1)" > "$out/status"
            say "$(cat "$out/status")"
            return 1
        fi
    done
    echo ok > "$out/status"
    say "check: both L1 boots done; results in build/nested/out (asserted by tests/nested)"
}

NESTED_CPU=${NESTED_CPU:-EPYC,+svm,+npt}
case "${1:-}" in
    check) cmd_check ;;
    fetch) cmd_fetch ;;
    initramfs) cmd_initramfs ;;
    run) shift; cmd_run "$@" ;;
    shell) shift; mkdir -p "$N/out"; cmd_shell "$@" ;;
    *) echo "usage: $0 check|fetch|initramfs|run KERNEL RUN [TIMEOUT]|shell [KERNEL]" >&2; exit 2 ;;
esac
