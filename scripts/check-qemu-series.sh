#!/usr/bin/env bash
# Builds every patch of qemu-patches/ on its own: checks out each commit of the series in a
# side worktree (build/qemu-percommit) and runs ninja in its own build directory
# (build/qemu-check). Run scripts/build-qemu.sh first (source tree, pagenc installed).
# The first commit costs a full build; each next one rebuilds what it changed.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
B=$ROOT/build
SRC=$B/qemu-src
WT=$B/qemu-percommit
BLD=$B/qemu-check
export PKG_CONFIG_PATH=$B/pagenc-prefix/lib/pkgconfig
say() { printf '[check-qemu-series] %s\n' "$*"; }

git -C "$SRC" rev-parse -q --verify pagenc-workaround >/dev/null ||
    { say "run scripts/build-qemu.sh first"; exit 1; }
[ -d "$WT" ] || git -C "$SRC" worktree add -q --detach "$WT" pagenc-workaround
fail=0
for c in $(git -C "$SRC" rev-list --reverse pagenc-workaround..HEAD); do
    git -C "$WT" checkout -q --detach "$c"
    subj=$(git -C "$SRC" log -1 --format=%s "$c")
    if [ ! -f "$BLD/build.ninja" ]; then
        mkdir -p "$BLD"
        (cd "$BLD" && "$WT/configure" --target-list=x86_64-softmmu --without-default-devices \
            --with-devices-x86_64=pagenc-q35 --disable-docs --disable-install-blobs \
            --disable-download --disable-tools --disable-guest-agent \
            --python="$(command -v python3)" --enable-pagenc > configure.log 2>&1) ||
            { say "configure failed at: $subj"; exit 1; }
    fi
    t0=$(date +%s)
    if ninja -C "$BLD" -j"${JOBS:-2}" qemu-system-x86_64 > "$BLD/ninja-$c.log" 2>&1; then
        say "OK   $(( $(date +%s) - t0 ))s $subj"
    else
        say "FAIL $subj (build/qemu-check/ninja-$c.log)"
        grep -m5 'error' "$BLD/ninja-$c.log" || true
        fail=1
    fi
done
exit $fail
