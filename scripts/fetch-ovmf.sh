#!/usr/bin/env bash
# Fetches Debian's OVMF (UEFI firmware for QEMU) into build/ovmf, cached.
#
#   scripts/fetch-ovmf.sh          fetch once; later runs print "cached" and exit
#
# The end-to-end tests boot real OVMF (tests/e2e/test_ordinary_guests.py): what
# an ordinary SEV guest runs before its kernel. Debian's binary package `ovmf`
# is fetched with `apt-get download` through a private apt configuration under
# build/ovmf-apt (the system's apt configuration and package state are not
# touched, nothing is installed) and unpacked with `dpkg-deb -x`:
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
mkdir -p "$A/etc" "$A/lists/partial" "$A/cache/archives/partial" "$A/debs"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $SUITE main" \
    > "$A/etc/sources.list"
touch "$A/status"
APTOPTS=(-o "Dir::Etc::SourceList=$A/etc/sources.list"
         -o "Dir::Etc::SourceParts=$A/etc/none"
         -o "Dir::State::Lists=$A/lists"
         -o "Dir::State::status=$A/status"
         -o "Dir::Cache=$A/cache"
         -o "APT::Sandbox::User=root")

say "apt: reading Debian $SUITE's package index (private apt config in build/ovmf-apt)"
apt-get "${APTOPTS[@]}" -qq update || die "apt-get update failed (network? see above)"

version=$OVMF_DEB_VERSION
served=$(apt-cache "${APTOPTS[@]}" madison ovmf | awk -F'|' '{gsub(/ /, "", $2); print $2}')
[ -n "$served" ] || die "Debian $SUITE serves no package named ovmf"
if ! grep -qxF "$OVMF_DEB_VERSION" <<<"$served"; then
    version=$(head -1 <<<"$served")
    say "################################################################"
    say "WARNING: the pinned ovmf=$OVMF_DEB_VERSION is no longer served by"
    say "WARNING: Debian $SUITE; using the newest served version $version."
    say "WARNING: update OVMF_DEB_VERSION in scripts/fetch-ovmf.sh."
    say "################################################################"
fi

say "download: ovmf=$version (about 6 MB)"
rm -f "$A/debs"/ovmf_*.deb
(cd "$A/debs" && apt-get "${APTOPTS[@]}" -qq download "ovmf=$version") ||
    die "apt-get download ovmf=$version failed"
deb=$(ls "$A/debs"/ovmf_*.deb 2>/dev/null | head -1)
[ -n "$deb" ] || die "apt-get download produced no ovmf_*.deb in $A/debs"

say "unpack: dpkg-deb -x $(basename "$deb") build/ovmf"
rm -rf "$OUT"
mkdir -p "$OUT"
dpkg-deb -x "$deb" "$OUT"
have_all || die "the package lacks one of ${NEED[*]} under usr/share/OVMF (Debian changed the layout?)"
echo "$version $OVMF_DEB_VERSION" > "$STAMP"
say "done in $(( $(date +%s) - T0 ))s: $(cd "$OUT/usr/share/OVMF" && echo "${NEED[@]}")"
