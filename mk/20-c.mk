# C ABI: the committed header is exactly what cbindgen makes of src/ffi, and C
# programs built against it and the release staticlib pass under valgrind and
# under AddressSanitizer + UndefinedBehaviorSanitizer.
CHECK_TARGETS += check-header check-c

.PHONY: check-header check-c c-tests

CBINDGEN ?= cbindgen
C_TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
C_OUT := $(C_TARGET_DIR)/c-tests
PAGENC_A := $(C_TARGET_DIR)/release/libpagenc.a
C_TEST_SRCS := $(sort $(wildcard tests/c/test_*.c))
C_TESTS := $(patsubst tests/c/%.c,%,$(C_TEST_SRCS))
C_WARN := -std=c11 -Wall -Wextra -Werror
C_CFLAGS := $(C_WARN) -g -O1 -D_GNU_SOURCE -pthread -Iinclude -Itests/c
C_SAN := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all
VALGRIND := valgrind -q --leak-check=full --errors-for-leak-kinds=definite,indirect,possible \
	--error-exitcode=1

check-header:
	@tmp=$$(mktemp --suffix=.h) && trap 'rm -f "$$tmp"' EXIT && \
	$(CBINDGEN) --quiet -o "$$tmp" . && \
	if diff -u include/pagenc.h "$$tmp"; then echo "include/pagenc.h is up to date"; \
	else echo "include/pagenc.h differs from what cbindgen makes of src/ffi:" \
	     "run 'cbindgen -o include/pagenc.h .' and commit it" >&2; exit 1; fi

# `--print native-static-libs` is printed only when rustc really links the
# staticlib, so the last list seen is kept in $(C_OUT)/native-static-libs.
# `cargo rustc` is the build itself: one release build of libpagenc.a.
$(C_OUT)/native-static-libs: FORCE
	@mkdir -p $(C_OUT)
	@set -o pipefail; \
	if ! out=$$($(CARGO) rustc --release --lib -- --print native-static-libs 2>&1); then \
	    echo "$$out" >&2; exit 1; fi; \
	libs=$$(printf '%s\n' "$$out" | sed -n 's/^note: native-static-libs: //p'); \
	if [ -z "$$libs" ] && [ ! -s $@ ]; then \
	    $(CARGO) clean --release -p pagenc && \
	    out=$$($(CARGO) rustc --release --lib -- --print native-static-libs 2>&1) && \
	    libs=$$(printf '%s\n' "$$out" | sed -n 's/^note: native-static-libs: //p'); \
	    [ -n "$$libs" ] || { echo "$$out" >&2; echo "no native-static-libs from rustc" >&2; exit 1; }; \
	fi; \
	if [ -n "$$libs" ]; then printf '%s\n' "$$libs" > $@; fi; \
	echo "libpagenc.a links with: $$(cat $@)"

.PHONY: FORCE
FORCE:

$(C_OUT)/%: tests/c/%.c tests/c/check.h include/pagenc.h $(C_OUT)/native-static-libs
	$(CC) $(C_CFLAGS) -o $@ $< $(PAGENC_A) $$(cat $(C_OUT)/native-static-libs)

$(C_OUT)/asan-%: tests/c/%.c tests/c/check.h include/pagenc.h $(C_OUT)/native-static-libs
	$(CC) $(C_CFLAGS) $(C_SAN) -o $@ $< $(PAGENC_A) $$(cat $(C_OUT)/native-static-libs)

c-tests: $(addprefix $(C_OUT)/,$(C_TESTS) $(addprefix asan-,$(C_TESTS)))

# The link flags meson.options hands to QEMU (pagenc_dep, pagenc.pc) must be
# the ones rustc prints, or QEMU fails to link after a toolchain change.
# Each program prints "N passed, M failed" and exits non-zero on a failure;
# valgrind and the sanitizers make any memory error or leak fail it too.
check-c: c-tests
	@want=$$(cat $(C_OUT)/native-static-libs); \
	if [ -f meson.options ]; then \
	    have=$$(sed -n "/option('native_static_libs'/,/)/s/.*value: '\([^']*\)'.*/\1/p" meson.options); \
	    if [ "$$have" != "$$want" ]; then \
	        echo "meson.options native_static_libs is '$$have' but rustc says '$$want': update it" >&2; \
	        exit 1; fi; fi
	@set -e; failed=0; \
	for t in $(C_TESTS); do \
	    echo "--- $$t (valgrind)"; \
	    $(VALGRIND) $(C_OUT)/$$t || failed=$$((failed + 1)); \
	    echo "--- $$t (ASan+UBSan)"; \
	    ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 \
	        $(C_OUT)/asan-$$t || failed=$$((failed + 1)); \
	done; \
	if [ $$failed -ne 0 ]; then echo "check-c: $$failed C test runs failed" >&2; exit 1; fi; \
	echo "check-c: all C tests passed under valgrind and ASan+UBSan"
