#!/bin/sh
# localize-staticlib.sh IN.a OUT.a: the installed libpagenc.a exports only pagenc_*.
#
# A Rust staticlib carries its own copy of std, core, alloc and compiler_builtins,
# all global: rust_eh_personality, __rust_alloc, thousands of _ZN... symbols. A
# parent that links its own Rust staticlib (QEMU with --enable-rust) then gets a
# duplicate rust_eh_personality when the two rustc versions differ, and thousands
# of duplicates with --whole-archive. So: `ld -r` every member (whole-archive on
# this input only) into one relocatable object, which resolves the library's
# internal references inside it, then `objcopy --keep-global-symbols` the
# pagenc_* definitions and make everything else local. Undefined references
# (libc, libgcc_s) stay global and are resolved by the final link as before.
#
# Why --keep-global-symbols and not --localize-hidden + a version script: a
# version script's `local:` takes effect when ld makes a shared object, not in
# an `ld -r` object that a static link consumes, and --localize-hidden alone
# would keep every default-visibility std symbol global, rust_eh_personality
# included. The keep list is taken from the object itself
# (its defined global pagenc_* symbols), so it never goes stale against the header.
#
# The .llvmbc/.llvmcmd sections (bitcode rustc embeds in std's objects) are
# dropped: merged by ld -r they are no longer valid bitcode, and binutils' LLVM
# plugin aborts on them ("LLVM ERROR: Invalid encoding" from nm); .llvm_addrsig
# holds symbol indices that objcopy would leave stale. No C consumer uses them.
set -eu
in=$1 out=$2
LD=${LD:-ld} OBJCOPY=${OBJCOPY:-objcopy} NM=${NM:-nm} AR=${AR:-ar}
tmp=$(mktemp -d "${TMPDIR:-/tmp}/pagenc-localize.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
"$LD" -r -o "$tmp/all.o" --whole-archive "$in" --no-whole-archive
"$OBJCOPY" --remove-section=.llvmbc --remove-section=.llvmcmd --remove-section=.llvm_addrsig \
    "$tmp/all.o" "$tmp/nobc.o"
"$NM" -g --defined-only --format=posix "$tmp/nobc.o" | awk '$1 ~ /^pagenc_/ {print $1}' | sort -u > "$tmp/keep"
if [ ! -s "$tmp/keep" ]; then
    echo "localize-staticlib.sh: no pagenc_* symbols defined in $in" >&2
    exit 1
fi
"$OBJCOPY" --keep-global-symbols="$tmp/keep" "$tmp/nobc.o" "$tmp/pagenc.o"
rm -f "$out.tmp"
"$AR" rcs "$out.tmp" "$tmp/pagenc.o"
mv "$out.tmp" "$out"
