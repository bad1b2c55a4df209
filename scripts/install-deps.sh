#!/usr/bin/env bash
# Installs everything pagenc's build, demo and tests need on a fresh Debian 12 machine.
# Idempotent: each step is skipped when its result is already there, so a second run is fast.
#   scripts/install-deps.sh          everything (make check, CI)
#   scripts/install-deps.sh --demo   only what `make demo` needs (no cargo-fuzz)
set -euo pipefail
MODE=${1:-all}

say() { printf '[install-deps] %s\n' "$*"; }

APT_PKGS=(
    libclang-dev            # bindgen (kernel constants, ABI layout test)
    build-essential pkg-config valgrind
    ninja-build flex bison bzip2 xz-utils dpkg-dev
    libglib2.0-dev libpixman-1-dev libfdt-dev libslirp-dev zlib1g-dev
    device-tree-compiler    # QEMU 10.2 configure: dtc (Debian strips the .dtb files)
    seabios                 # BIOS at run time (the Debian QEMU tarball has no firmware)
    binutils                # guest payload (as/ld)
    ccache                  # QEMU builds: a second configuration (or worktree) reuses objects
    bindgen                 # QEMU's own Rust (build-qemu.sh --variant modules-rust): 0.60.1, QEMU's minimum
)
missing=()
for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# meson >= 1.9: QEMU's --enable-rust needs it (its pythondeps.toml, [meson-rust])
PIP_PKGS=("meson>=1.9,<2" "pycotap==1.3.1" "qemu.qmp==0.0.5" "pytest>=7")
if ! python3 -c 'import mesonbuild, pycotap, qemu.qmp, pytest
from mesonbuild.coredata import version
assert tuple(map(int, version.split(".")[:2])) >= (1, 9)' 2>/dev/null; then
    say "pip install ${PIP_PKGS[*]}"
    python3 -m pip install -q --disable-pip-version-check "${PIP_PKGS[@]}"
fi

export PATH="$HOME/.cargo/bin:$PATH"
if [ "$MODE" = --demo ]; then
    say "done (--demo: cbindgen and cargo-fuzz are only for make check)"
    exit 0
fi
CBINDGEN_VERSION=0.29.4
if ! cbindgen --version 2>/dev/null | grep -q "$CBINDGEN_VERSION"; then
    say "cargo install cbindgen $CBINDGEN_VERSION (about a minute)"
    cargo install -q --locked cbindgen --version "$CBINDGEN_VERSION"
fi
CARGO_FUZZ_VERSION=0.13.2
if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
    say "cargo install cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install -q --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi
say "done"
