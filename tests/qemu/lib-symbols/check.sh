#!/bin/sh
# The installed libpagenc.a exports only pagenc_* and links beside another Rust
# runtime (mk/30-qemu.mk check-lib-symbols; why: scripts/localize-staticlib.sh).
#
# 1. meson install of this repository into build/lib-symbols/prefix;
# 2. nm -g --defined-only of the installed archive: pagenc_* only, and every
#    function include/pagenc.h declares;
# 3. t.c + other_rust.c (defines rust_eh_personality and __rust_alloc, as QEMU's
#    own Rust staticlib does) + the installed archive, plainly and
#    --whole-archive: links, and runs;
# 4. negative control: the same link against cargo's unprocessed archive fails
#    with a duplicate rust_eh_personality, so step 3 tests something.
set -eu
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
D=$ROOT/build/lib-symbols
T=$ROOT/tests/qemu/lib-symbols
CC=${CC:-cc}
fail() { echo "check-lib-symbols: $*" >&2; exit 1; }

rm -rf "$D" && mkdir -p "$D"
meson setup "$D/b" "$ROOT" --prefix="$D/prefix" --libdir=lib >"$D/setup.log" 2>&1 ||
    { cat "$D/setup.log"; fail "meson setup failed"; }
meson install -C "$D/b" >"$D/install.log" 2>&1 || { cat "$D/install.log"; fail "meson install failed"; }
LIB=$D/prefix/lib/libpagenc.a
RAW=${CARGO_TARGET_DIR:-$ROOT/target}/release/libpagenc.a
[ -f "$LIB" ] || fail "meson install did not install $LIB"

nm -g --defined-only "$LIB" | awk 'NF == 3 {print $3}' | sort > "$D/exported"
n=$(wc -l < "$D/exported")
[ "$n" -gt 0 ] || fail "$LIB exports no symbol at all"
if grep -v '^pagenc_' "$D/exported" > "$D/foreign"; then
    fail "$LIB exports $(wc -l < "$D/foreign") symbols besides pagenc_* (only pagenc_* is allowed), e.g.: $(head -5 "$D/foreign" | tr '\n' ' ')"
fi
# ...and all of the C API: every function include/pagenc.h declares.
grep -o '\<pagenc_[a-z0-9_]*(' "$ROOT/include/pagenc.h" | tr -d '(' | sort -u > "$D/declared"
missing=$(comm -23 "$D/declared" "$D/exported" | tr '\n' ' ')
[ -z "$missing" ] || fail "$LIB does not export these functions of include/pagenc.h: $missing"
echo "check-lib-symbols: $LIB exports $n symbols, all pagenc_*"

LIBS=$(PKG_CONFIG_PATH=$D/prefix/lib/pkgconfig pkg-config --static --libs pagenc)
CFLAGS=$(PKG_CONFIG_PATH=$D/prefix/lib/pkgconfig pkg-config --cflags pagenc)
$CC -c $CFLAGS -o "$D/t.o" "$T/t.c"
$CC -c -o "$D/other_rust.o" "$T/other_rust.c"
LIBSRAW=$(echo "$LIBS" | sed 's/-lpagenc//')
$CC -o "$D/t" "$D/t.o" "$D/other_rust.o" $LIBS
"$D/t"
$CC -o "$D/t-whole" "$D/t.o" "$D/other_rust.o" -Wl,--whole-archive "$LIB" -Wl,--no-whole-archive $LIBSRAW
"$D/t-whole"

if $CC -o "$D/t-raw" "$D/t.o" "$D/other_rust.o" "$RAW" $LIBSRAW >"$D/raw.log" 2>&1; then
    fail "negative control: linking cargo's unprocessed $RAW beside other_rust.o succeeded; the test no longer simulates the clash"
fi
grep -q "multiple definition of .rust_eh_personality" "$D/raw.log" ||
    { cat "$D/raw.log"; fail "negative control: the unprocessed link failed, but not with a duplicate rust_eh_personality"; }
echo "check-lib-symbols: ok (cargo's unprocessed archive fails the same link: duplicate rust_eh_personality)"
