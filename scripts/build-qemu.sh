#!/usr/bin/env bash
# Builds a small x86_64-softmmu QEMU 10.2.2 with pagenc linked in.
#
#   scripts/build-qemu.sh            fetch, patch, build pagenc + QEMU (cached)
#   scripts/build-qemu.sh --no-deps  skip scripts/install-deps.sh
#   scripts/build-qemu.sh --variant V
#       builtin       (default) pagenc built into the binary, QEMU's Rust off:
#                     build/qemu-build
#       modules-rust  --enable-modules (pagenc is the module backends-pagenc,
#                     loaded by -object pagenc only) and --enable-rust (QEMU's
#                     own Rust: the HPET of the devices file is the Rust one):
#                     build/qemu-build-modules-rust
#     Both variants build from the same patched tree build/qemu-src; ccache
#     shares what it can between them.
#
# Source: Debian's `qemu` source package, pinned to $QEMU_DEB_VERSION (sid:
# the newest QEMU whose source Debian serves; 11.1.x is listed in the index
# but its files are not served), fetched with a private apt configuration
# under build/apt (the system apt configuration is not touched). Only the
# upstream orig tarball is unpacked (tar); Debian's own debian/patches are
# NOT applied: the tree is upstream QEMU 10.2.2 as Debian ships it (+ds =
# firmware blobs removed).
#
# The source becomes a git repository, build/qemu-src:
#   tag pagenc-pristine    the unpacked tarball
#   tag pagenc-workaround  build-environment workaround (not part of the series):
#                          no EDK2 unpacking (blobs absent), a q35-only devices
#                          file, and a CXL stub that devices file needs
#   HEAD                   + qemu-patches/*.patch applied with `git am` (no 3-way)
# The series is applied in a side worktree (build/qemu-am) and the main tree is
# then moved with `git reset --hard`, so only files whose content changed get
# touched and ninja rebuilds little. An unchanged series is skipped.
#
# The firmware the tests boot besides SeaBIOS (OVMF, the e1000e option ROM) is
# unpacked from pinned Debian packages into build/firmware.
#
# pagenc is built with cargo and installed with meson (install mode of this
# checkout's meson.build) into build/pagenc-prefix; QEMU finds it through
# pkg-config (PKG_CONFIG_PATH).
set -euo pipefail

NO_DEPS=""
VARIANT=builtin
while [ $# -gt 0 ]; do
    case "$1" in
    --no-deps) NO_DEPS=$1 ;;
    --variant) [ $# -ge 2 ] || { echo "build-qemu.sh: --variant needs builtin or modules-rust" >&2; exit 2; }
               VARIANT=$2; shift ;;
    --variant=*) VARIANT=${1#--variant=} ;;
    *) echo "build-qemu.sh: unknown argument '$1' (allowed: --no-deps, --variant builtin|modules-rust)" >&2
       exit 2 ;;
    esac
    shift
done
case "$VARIANT" in
builtin|modules-rust) ;;
*) echo "build-qemu.sh: unknown variant '$VARIANT' (allowed: builtin, modules-rust)" >&2; exit 2 ;;
esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
B=$ROOT/build
QEMU_DEB_VERSION=1:10.2.2+ds-1
QEMU_UPSTREAM=10.2.2
DEB_SUITE=sid
SRC=$B/qemu-src
AMTREE=$B/qemu-am
if [ "$VARIANT" = builtin ]; then BLD=$B/qemu-build; else BLD=$B/qemu-build-$VARIANT; fi
PREFIX=$B/pagenc-prefix
PATCHES=$ROOT/qemu-patches
DEVICES=pagenc-q35
FIRMWARE_PKGS=(ovmf=2022.11-6+deb12u2 ipxe-qemu=1.0.0+git-20190125.36a4c85-5.1)
export PATH="$HOME/.cargo/bin:$PATH"
# ccache's compiler links (Debian's ccache package) let a second QEMU configuration
# in the same run, or another checkout, reuse every object that did not change.
# base_dir makes the cache key independent of where the checkout lives.
if [ -d /usr/lib/ccache ] && [ -z "${PAGENC_NO_CCACHE:-}" ]; then
    export PATH="/usr/lib/ccache:$PATH"
    export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
    export CCACHE_NOHASHDIR=${CCACHE_NOHASHDIR:-1}
fi

T0=$(date +%s.%N)
STAGE_T=$T0
stage_end() {
    local now
    now=$(date +%s.%N)
    printf '[build-qemu] %-10s done in %ss\n' "$1" "$(awk "BEGIN{printf \"%.1f\", $now - $STAGE_T}")"
    STAGE_T=$now
}
say() { printf '[build-qemu] %s\n' "$*"; }
die() { printf '[build-qemu] ERROR: %s\n' "$*" >&2; exit 1; }

mkdir -p "$B"

# --------------------------------------------------------------------------
say "variant: $VARIANT -> ${BLD#$ROOT/}"
say "deps: scripts/install-deps.sh${NO_DEPS:+ (skipped: $NO_DEPS)}"
if [ -z "$NO_DEPS" ]; then
    bash "$ROOT/scripts/install-deps.sh"
fi
stage_end deps

# --------------------------------------------------------------------------
say "fetch: Debian source package qemu=$QEMU_DEB_VERSION"
DL=$B/src-dl
ORIG=$DL/qemu_${QEMU_UPSTREAM}+ds.orig.tar.xz
DSC=$DL/qemu_${QEMU_DEB_VERSION#1:}.dsc
if [ -f "$ORIG" ] && [ -f "$DSC" ]; then
    say "fetch: cached in build/src-dl"
else
    A=$B/apt
    mkdir -p "$A/etc" "$A/lists/partial" "$A/cache/archives/partial" "$DL"
    echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $DEB_SUITE main" \
        > "$A/etc/sources.list"
    touch "$A/status"
    APTOPTS=(-o "Dir::Etc::SourceList=$A/etc/sources.list"
             -o "Dir::Etc::SourceParts=$A/etc/none"
             -o "Dir::State::Lists=$A/lists"
             -o "Dir::State::status=$A/status"
             -o "Dir::Cache=$A/cache"
             -o "APT::Sandbox::User=root")
    apt-get "${APTOPTS[@]}" -qq update
    (cd "$DL" && apt-get "${APTOPTS[@]}" -qq source --download-only "qemu=$QEMU_DEB_VERSION")
    [ -f "$ORIG" ] || die "apt-get source did not produce $ORIG"
fi
stage_end fetch

# --------------------------------------------------------------------------
say "unpack: pristine git tree build/qemu-src"
git_q() { git -C "$SRC" -c user.name="pagenc build" -c user.email="build@pagenc.invalid" "$@"; }
if git -C "$SRC" rev-parse -q --verify pagenc-workaround >/dev/null 2>&1; then
    say "unpack: cached (tags pagenc-pristine, pagenc-workaround)"
else
    rm -rf "$SRC" "$AMTREE" "$B/qemu-unpack"
    mkdir -p "$B/qemu-unpack"
    tar -C "$B/qemu-unpack" --no-same-owner -xf "$ORIG"
    mv "$B/qemu-unpack/qemu-$QEMU_UPSTREAM" "$SRC"
    rmdir "$B/qemu-unpack"
    git -C "$SRC" init -q -b pagenc
    git_q config core.autocrlf false
    git_q config gc.auto 0
    git_q add -A -f .
    git_q commit -q -m "QEMU $QEMU_UPSTREAM from Debian qemu $QEMU_DEB_VERSION (orig tarball)"
    git_q tag pagenc-pristine

    # Build-environment workaround: NOT part of qemu-patches/.
    # 1. The +ds tarball has no EDK2 blobs; meson would unpack them whenever
    #    bzip2 exists, whatever --disable-install-blobs says.
    sed -i '2s/^if unpack_edk2_blobs$/if false # pagenc build: EDK2 blobs absent from +ds tarball/' \
        "$SRC/pc-bios/meson.build"
    grep -q '^if false # pagenc build' "$SRC/pc-bios/meson.build" || die "pc-bios/meson.build edit failed"
    # 2. 10.x boards are off with --without-default-devices: a q35-only set.
    cat > "$SRC/configs/devices/x86_64-softmmu/$DEVICES.mak" <<'EOF'
# pagenc build: the smallest x86_64 machine set for the tests (q35 only),
# plus SEV so that target/i386/sev.c is built, and q35's default devices
# (std VGA, e1000e, HPET) so that tests can run without -nodefaults.
CONFIG_Q35=y
CONFIG_ISA_DEBUG=y
CONFIG_SEV=y
CONFIG_VGA_PCI=y
CONFIG_E1000E_PCI_EXPRESS=y
CONFIG_HPET=y
EOF
    # 3. With that devices file, ACPI's CXL code is built (ACPI_CXL) but not
    #    hw/cxl (CXL): its stub file lacks cxl_fmws_get_all_sorted().
    cat >> "$SRC/hw/cxl/cxl-host-stubs.c" <<'EOF'

/* pagenc build environment: hw/acpi/cxl.c needs it without CONFIG_CXL */
GSList *cxl_fmws_get_all_sorted(void)
{
    return NULL;
}
EOF
    git_q add pc-bios/meson.build "configs/devices/x86_64-softmmu/$DEVICES.mak" \
        hw/cxl/cxl-host-stubs.c
    git_q commit -q -m "pagenc build environment: no EDK2 unpacking, q35 devices file, CXL stub

Not part of qemu-patches/: the Debian +ds tarball has no firmware blobs,
and a q35-only devices file links hw/acpi/cxl.c without hw/cxl."
    git_q tag pagenc-workaround
fi
stage_end unpack

# --------------------------------------------------------------------------
say "patch: qemu-patches/*.patch with git am"
shopt -s nullglob
series=()
for p in "$PATCHES"/*.patch; do
    # 0000-cover-letter.patch describes the series; it is no patch to apply
    case "$p" in *cover-letter.patch) ;; *) series+=("$p") ;; esac
done
shopt -u nullglob
series_sum=$( (echo "$QEMU_DEB_VERSION"; git_q rev-parse pagenc-workaround
               if [ ${#series[@]} -gt 0 ]; then cat "${series[@]}"; fi) | sha256sum | cut -d' ' -f1)
stamp=$SRC/.git/pagenc-series.sha256
if ! git_q diff --quiet HEAD && [ "${PAGENC_QEMU_DISCARD:-0}" != 1 ]; then
    die "build/qemu-src has uncommitted changes: commit them and regenerate the series
    (git -C build/qemu-src format-patch -o qemu-patches pagenc-workaround..), or rerun with
    PAGENC_QEMU_DISCARD=1 to throw them away"
fi
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$series_sum" ]; then
    say "patch: series unchanged (${#series[@]} patches), skipped"
else
    if [ ! -d "$AMTREE" ]; then
        git_q worktree prune
        git_q worktree add -q --detach "$AMTREE" pagenc-workaround
    fi
    gam() { git -C "$AMTREE" -c user.name="pagenc build" -c user.email="build@pagenc.invalid" "$@"; }
    gam am --abort >/dev/null 2>&1 || true
    gam reset -q --hard pagenc-workaround
    if [ ${#series[@]} -gt 0 ]; then
        gam am -q --no-3way --committer-date-is-author-date "${series[@]}" ||
            die "git am failed on the series (tree left in $AMTREE)"
    fi
    new=$(gam rev-parse HEAD)
    # Move the main tree: only files that differ get rewritten.
    git_q reset -q --hard "$new"
    echo "$series_sum" > "$stamp"
    say "patch: applied ${#series[@]} patches -> $(git_q log --oneline -1)"
fi
stage_end patch

# --------------------------------------------------------------------------
# Firmware the tests boot besides SeaBIOS: OVMF (UEFI, with and without SMM)
# and the e1000e option ROM q35's default NIC needs. Debian packages fetched
# with apt-get download (scripts/lib/debian-fetch.sh) and unpacked with
# dpkg-deb -x (not installed), pinned; if Debian no longer serves a pinned
# version, the newest served one is used and the script says so.
say "firmware: Debian packages ${FIRMWARE_PKGS[*]} into build/firmware"
# shellcheck source=scripts/lib/debian-fetch.sh
. "$ROOT/scripts/lib/debian-fetch.sh"
FW=$B/firmware
fw_stamp=$FW/.pagenc-firmware
if debfetch_stamp_is "$fw_stamp" "${FIRMWARE_PKGS[*]}"; then
    say "firmware: cached"
else
    rm -rf "$FW" && mkdir -p "$FW/debs"
    # Private apt config (build/firmware-apt, the suites this Debian 12 machine's own apt uses):
    # the system's lists may be stale or absent on a clean CI machine.
    debfetch_init "$B/firmware-apt" bookworm bookworm-updates \
        "http://deb.debian.org/debian-security bookworm-security"
    debfetch_update || die "apt-get update for the firmware packages failed (network? see above)"
    for pkg in "${FIRMWARE_PKGS[@]}"; do
        ver=$(debfetch_pick "${pkg%%=*}" "${pkg#*=}")
        [ -n "$ver" ] || die "Debian bookworm serves no package named ${pkg%%=*}"
        [ "${pkg%%=*}=$ver" = "$pkg" ] ||
            say "firmware: $pkg is no longer served, using the current ${pkg%%=*}"
        debfetch_download "$FW/debs" "${pkg%%=*}=$ver" >/dev/null ||
            die "apt-get download ${pkg%%=*}=$ver failed"
    done
    for deb in "$FW"/debs/*.deb; do dpkg-deb -x "$deb" "$FW"; done
    [ -f "$FW/usr/share/OVMF/OVMF_CODE_4M.fd" ] || die "no OVMF_CODE_4M.fd in $FW"
    echo "${FIRMWARE_PKGS[*]}" > "$fw_stamp"
fi
stage_end firmware

# --------------------------------------------------------------------------
say "pagenc: cargo build --release + meson install into build/pagenc-prefix"
(cd "$ROOT" && cargo build --release --lib -q)
LIBA=$ROOT/target/release/libpagenc.a
[ -f "$LIBA" ] || die "cargo did not produce $LIBA"
NATIVE_CACHE=$B/pagenc-native-libs
if [ ! -f "$NATIVE_CACHE" ] || [ "$LIBA" -nt "$NATIVE_CACHE" -a "$ROOT/Cargo.toml" -nt "$NATIVE_CACHE" ]; then
    # The link flags the Rust staticlib needs; they go into pagenc.pc (Libs.private).
    (cd "$ROOT" && cargo rustc -q --release --lib -- --print native-static-libs 2>&1) |
        sed -n 's/.*native-static-libs: //p' | tail -1 > "$NATIVE_CACHE.tmp"
    if [ -s "$NATIVE_CACHE.tmp" ]; then mv "$NATIVE_CACHE.tmp" "$NATIVE_CACHE"
    else rm -f "$NATIVE_CACHE.tmp"; echo "-lgcc_s -lutil -lrt -lpthread -lm -ldl -lc" > "$NATIVE_CACHE"; fi
fi
NATIVE=$(cat "$NATIVE_CACHE")
[ -f "$ROOT/include/pagenc.h" ] || die "include/pagenc.h is missing (generated by cbindgen, committed in include/)"
MB=$B/pagenc-meson
if [ ! -f "$MB/build.ninja" ]; then
    meson setup "$MB" "$ROOT" --prefix="$PREFIX" --libdir=lib \
        -Dnative_static_libs="$NATIVE" >/dev/null
else
    meson configure "$MB" -Dnative_static_libs="$NATIVE" >/dev/null
fi
meson install -C "$MB" --only-changed >"$B/pagenc-meson-install.log" 2>&1 || { cat "$B/pagenc-meson-install.log"; die "meson install of pagenc failed"; }
PC=$PREFIX/lib/pkgconfig
export PKG_CONFIG_PATH=$PC${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}
pkg-config --exists pagenc || die "pkg-config cannot find pagenc in $PC"
say "pagenc: $(pkg-config --modversion pagenc), static libs: $(pkg-config --static --libs pagenc)"
# QEMU's link step does not depend on the .a; relink when it changed.
lib_sum=$(sha256sum "$PREFIX/lib/libpagenc.a" "$PREFIX/include/pagenc.h" | sha256sum | cut -d' ' -f1)
if [ -f "$BLD/.pagenc-lib.sha256" ] && [ "$(cat "$BLD/.pagenc-lib.sha256")" != "$lib_sum" ]; then
    say "pagenc: library changed, QEMU will relink"
    rm -f "$BLD/qemu-system-x86_64" "$BLD/backends-pagenc.so"
fi
stage_end pagenc

# --------------------------------------------------------------------------
# --------------------------------------------------------------------------
# QEMU's own Rust crates (modules-rust only): pinned by subprojects/*-rs.wrap,
# fetched by cargo from crates.io, with generated meson overlays.
if [ "$VARIANT" = modules-rust ]; then
    say "rust: QEMU's crates (subprojects/*-rs.wrap) via cargo, overlays generated"
    command -v bindgen >/dev/null ||
        die "QEMU's Rust needs bindgen (Debian package bindgen, or cargo install bindgen-cli); scripts/install-deps.sh installs it"
    # shellcheck source=scripts/lib/qemu-rust-crates.sh
    . "$ROOT/scripts/lib/qemu-rust-crates.sh"
    qemu_rust_crates "$SRC" "$B/qemu-rust-crates"
    say "rust: $(rustc --version), $(bindgen --version 2>&1 | head -1)"
    stage_end rust
fi

say "configure: ${BLD#$ROOT/}"
PAGENC_OPT=""
if git_q grep -q "option('pagenc'" HEAD -- meson_options.txt 2>/dev/null; then
    PAGENC_OPT=--enable-pagenc
fi
CONF=(--target-list=x86_64-softmmu --without-default-devices "--with-devices-x86_64=$DEVICES"
      --disable-docs --disable-install-blobs --disable-download
      --disable-tools --disable-guest-agent --python="$(command -v python3)" $PAGENC_OPT)
TARGETS=(qemu-system-x86_64)
if [ "$VARIANT" = modules-rust ]; then
    CONF+=(--enable-modules --enable-rust)
    TARGETS+=(modules)
fi
conf_sum=$(echo "${CONF[*]} $PKG_CONFIG_PATH" | sha256sum | cut -d' ' -f1)
if [ -f "$BLD/build.ninja" ] && [ "$(cat "$BLD/.pagenc-configure" 2>/dev/null)" = "$conf_sum" ]; then
    say "configure: unchanged, skipped (ninja re-runs meson when meson files change)"
else
    rm -rf "$BLD"
    mkdir -p "$BLD"
    say "configure: ${CONF[*]}"
    (cd "$BLD" && "$SRC/configure" "${CONF[@]}" > configure.log 2>&1) ||
        { tail -30 "$BLD/configure.log"; die "configure failed (${BLD#$ROOT/}/configure.log)"; }
    echo "$conf_sum" > "$BLD/.pagenc-configure"
fi
stage_end configure

# --------------------------------------------------------------------------
say "build: ninja -j${JOBS:-2} ${TARGETS[*]} (progress every ${PROGRESS_EVERY:-15}s)"
# ninja writes "[done/total] step" lines to its log; a watcher prints the
# latest one so that a long build is never silent.
ninja -C "$BLD" -j"${JOBS:-2}" "${TARGETS[@]}" > "$BLD/ninja.log" 2>&1 &
ninja_pid=$!
while kill -0 "$ninja_pid" 2>/dev/null; do
    for _ in $(seq "${PROGRESS_EVERY:-15}"); do
        kill -0 "$ninja_pid" 2>/dev/null || break
        sleep 1
    done
    kill -0 "$ninja_pid" 2>/dev/null || break
    step=$(grep -o '^\[[0-9]*/[0-9]*\]' "$BLD/ninja.log" | tail -1 || true)
    printf '[build-qemu] build: %s after %ss\n' "${step:-[starting]}" \
        "$(awk "BEGIN{printf \"%.0f\", $(date +%s.%N) - $STAGE_T}")"
done
wait "$ninja_pid" ||
    { grep -B2 -A12 -m3 'error' "$BLD/ninja.log" || tail -40 "$BLD/ninja.log"; die "ninja failed (${BLD#$ROOT/}/ninja.log)"; }
echo "$lib_sum" > "$BLD/.pagenc-lib.sha256"
grep -m1 -o '\[[0-9]*/[0-9]*\]' <(tac "$BLD/ninja.log") >/dev/null && say "build: $(grep -c '^\[' "$BLD/ninja.log") steps"
"$BLD/qemu-system-x86_64" --version | head -1 | sed 's/^/[build-qemu] /'
if [ "$VARIANT" = modules-rust ]; then
    # What this variant is for: libpagenc (and its Rust runtime) only in the
    # module, QEMU's own Rust (the HPET) in the binary.
    [ -f "$BLD/backends-pagenc.so" ] || die "no module $BLD/backends-pagenc.so"
    if nm -D --defined-only "$BLD/qemu-system-x86_64" | grep -q ' pagenc_'; then
        die "qemu-system-x86_64 defines libpagenc's pagenc_* symbols: pagenc must be only in backends-pagenc.so"
    fi
    nm -D --defined-only "$BLD/backends-pagenc.so" | grep -q ' pagenc_tracker_new$' ||
        die "backends-pagenc.so does not contain libpagenc (pagenc_tracker_new)"
    grep -q '^CONFIG_X_HPET_RUST=y' "$BLD/x86_64-softmmu-config-devices.mak" ||
        die "QEMU's Rust HPET (CONFIG_X_HPET_RUST) is not in this build"
    say "check: libpagenc only in backends-pagenc.so; CONFIG_X_HPET_RUST=y"
fi
stage_end build

printf '[build-qemu] all done in %ss: %s\n' "$(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $T0}")" "$BLD/qemu-system-x86_64"
