#!/bin/sh
# qemu-rust-link.sh BUILD: libpagenc.a beside QEMU's own Rust in one link (review finding 3).
#
# BUILD is a QEMU build with --enable-rust (build-qemu.sh --variant modules-rust): its
# librust_x86_64_softmmu.a is QEMU's Rust staticlib, which QEMU links --whole-archive. A C
# program (t.c, calling libpagenc) is linked the way a built-in pagenc would be: QEMU's Rust
# whole-archived, then libpagenc. QEMU's C symbols that the Rust code needs are not in this
# link, so unresolved symbols are ignored: only duplicate definitions can fail it.
#
#   libpagenc built by             archive             plain -l   --whole-archive
#   the same rustc as QEMU         cargo's (raw)       links      fails (thousands)
#   the same rustc                 installed           links      links
#   another rustc (if installed)   cargo's (raw)       fails: one duplicate rust_eh_personality
#   another rustc                  installed           links      links
#
# The installed archive is scripts/localize-staticlib.sh's: only pagenc_* global. The raw
# rows are the negative controls: they must fail as shown, or this test simulates nothing.
# "Another rustc" is the first rustup toolchain whose rustc differs from the default one
# (nightly on this machine); without one, those rows are skipped and said so.
set -eu
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
BLD=$1
T=$ROOT/tests/qemu/lib-symbols
D=$ROOT/build/qemu-rust-link
CC=${CC:-cc}
RLIB=$BLD/librust_x86_64_softmmu.a
INSTALLED=$ROOT/build/pagenc-prefix/lib/libpagenc.a
RAW=${CARGO_TARGET_DIR:-$ROOT/target}/release/libpagenc.a
LIBS="-lgcc_s -lutil -lrt -lpthread -lm -ldl -lc"
fail() { echo "qemu-rust-link: $*" >&2; exit 1; }
[ -f "$RLIB" ] || fail "no $RLIB: is $BLD a build with --enable-rust?"
for a in "$INSTALLED" "$RAW"; do [ -f "$a" ] || fail "no $a (scripts/build-qemu.sh builds it)"; done
mkdir -p "$D"
$CC -c -I"$ROOT/include" -o "$D/t.o" "$T/t.c"

rustc_of() { strings -a "$1" | grep -m1 -o 'rustc version [0-9][^ )]*' | cut -d' ' -f3; }
QEMU_RUSTC=$(rustc_of "$RLIB")
echo "qemu-rust-link: QEMU's Rust staticlib built by rustc $QEMU_RUSTC"

# link NAME EXPECT(links|fails) ARCHIVE [whole]
link() {
    name=$1 expect=$2 lib=$3 whole=${4:-}
    if [ -n "$whole" ]; then set -- -Wl,--whole-archive "$lib" -Wl,--no-whole-archive; else set -- "$lib"; fi
    if $CC -o "$D/t-$name" "$D/t.o" -Wl,--whole-archive "$RLIB" -Wl,--no-whole-archive "$@" $LIBS \
        -Wl,--unresolved-symbols=ignore-all >"$D/$name.log" 2>&1; then got=links; else got=fails; fi
    dups=$(grep -c 'multiple definition' "$D/$name.log" || true)
    printf 'qemu-rust-link: %-28s %s (%s duplicate definitions)\n' "$name" "$got" "$dups"
    [ "$got" = "$expect" ] || { head -5 "$D/$name.log"; fail "$name: expected the link to $expect"; }
}

[ "$(rustc_of "$RAW")" = "$QEMU_RUSTC" ] || fail "cargo's libpagenc.a is not built by QEMU's rustc $QEMU_RUSTC"
link same-rustc-installed links "$INSTALLED"
link same-rustc-installed-whole links "$INSTALLED" whole
link same-rustc-raw links "$RAW"
link same-rustc-raw-whole fails "$RAW" whole

other=""
for tc in $(rustup toolchain list 2>/dev/null | awk '{print $1}'); do
    v=$(rustc +"$tc" --version 2>/dev/null | awk '{print $2}') || continue
    [ -n "$v" ] && [ "$v" != "$QEMU_RUSTC" ] && { other=$tc; break; }
done
if [ -z "$other" ]; then
    echo "qemu-rust-link: SKIPPED the other-rustc rows: no rustup toolchain besides rustc $QEMU_RUSTC"
    exit 0
fi
echo "qemu-rust-link: another rustc: toolchain $other (rustc $(rustc +"$other" --version | awk '{print $2}'))"
OT=$ROOT/build/other-rustc-target
(cd "$ROOT" && cargo +"$other" build -q --release --lib --target-dir "$OT")
sh "$ROOT/scripts/localize-staticlib.sh" "$OT/release/libpagenc.a" "$D/libpagenc-other.a"
[ "$(rustc_of "$OT/release/libpagenc.a")" != "$QEMU_RUSTC" ] || fail "toolchain $other built with QEMU's rustc"
link other-rustc-raw fails "$OT/release/libpagenc.a"
grep -q 'multiple definition of .rust_eh_personality' "$D/other-rustc-raw.log" ||
    fail "other-rustc-raw failed, but not with a duplicate rust_eh_personality"
link other-rustc-installed links "$D/libpagenc-other.a"
link other-rustc-installed-whole links "$D/libpagenc-other.a" whole
echo "qemu-rust-link: ok"
