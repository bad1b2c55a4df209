#!/usr/bin/env bash
# Fetches Debian's OVMF (UEFI firmware for QEMU) into build/ovmf, cached.
#
#   scripts/fetch-ovmf.sh          fetch once; later runs print "cached" and exit
#
# The end-to-end tests boot real OVMF (tests/e2e/test_ordinary_guests.py): what
# an ordinary SEV guest runs before its kernel. Debian's binary package `ovmf`
# is fetched with `apt-get download` through a private apt configuration under
# build/ovmf-apt (scripts/lib/debian-fetch.sh; the system's apt configuration and
# package state are not touched, nothing is installed) and unpacked with `dpkg-deb -x`:
#   build/ovmf/usr/share/OVMF/OVMF_CODE_4M.fd            no SMM, no secure boot
#   build/ovmf/usr/share/OVMF/OVMF_CODE_4M.secboot.fd    SMM + secure boot (needs smm=on)
#   build/ovmf/usr/share/OVMF/OVMF_VARS_4M.fd            the variable store template
# The version is pinned ($OVMF_DEB_VERSION, trixie). If Debian no longer serves
# it, the newest served version is taken instead, with a warning that says so.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
B=$ROOT/build
OVMF_DEB_VERSION=2025.02-8+deb13u1
SUITE=trixie
OUT=$B/ovmf
A=$B/ovmf-apt
STAMP=$OUT/.pagenc-ovmf-version
NEED=(OVMF_CODE_4M.fd OVMF_CODE_4M.secboot.fd OVMF_VARS_4M.fd)
# shellcheck source=scripts/lib/debian-fetch.sh
. "$ROOT/scripts/lib/debian-fetch.sh"

say() { printf '[fetch-ovmf] %s\n' "$*"; }
die() { printf '[fetch-ovmf] ERROR: %s\n' "$*" >&2; exit 1; }

have_all() {
    local f
    for f in "${NEED[@]}"; do [ -f "$OUT/usr/share/OVMF/$f" ] || return 1; done
}

# The stamp holds "<version unpacked> <pin it was fetched for>": a changed pin
# fetches again, a fallback version is not fetched again on every run.
if [ -f "$STAMP" ] && have_all && [ "$(cut -d' ' -f2 "$STAMP")" = "$OVMF_DEB_VERSION" ]; then
    say "cached: ovmf $(cut -d' ' -f1 "$STAMP") in build/ovmf"
    exit 0
fi

T0=$(date +%s)
debfetch_init "$A" "$SUITE"

say "apt: reading Debian $SUITE's package index (private apt config in build/ovmf-apt)"
debfetch_update || die "apt-get update failed (network? see above)"

version=$(debfetch_pick ovmf "$OVMF_DEB_VERSION")
[ -n "$version" ] || die "Debian $SUITE serves no package named ovmf"
if [ "$version" != "$OVMF_DEB_VERSION" ]; then
    say "################################################################"
    say "WARNING: the pinned ovmf=$OVMF_DEB_VERSION is no longer served by"
    say "WARNING: Debian $SUITE; using the newest served version $version."
    say "WARNING: update OVMF_DEB_VERSION in scripts/fetch-ovmf.sh."
    say "################################################################"
fi

say "download: ovmf=$version (about 6 MB)"
deb=$(debfetch_download "$A/debs" "ovmf=$version") || die "apt-get download ovmf=$version failed"

say "unpack: dpkg-deb -x $(basename "$deb") build/ovmf"
rm -rf "$OUT"
mkdir -p "$OUT"
dpkg-deb -x "$deb" "$OUT"
have_all || die "the package lacks one of ${NEED[*]} under usr/share/OVMF (Debian changed the layout?)"
echo "$version $OVMF_DEB_VERSION" > "$STAMP"
say "done in $(( $(date +%s) - T0 ))s: $(cd "$OUT/usr/share/OVMF" && echo "${NEED[@]}")"
