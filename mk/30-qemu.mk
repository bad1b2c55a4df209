# QEMU integration: the patched QEMU 10.2.2 (scripts/build-qemu.sh, cached in build/),
# checkpatch on the series (qemu-patches/) and the pytest + qemu.qmp tests (tests/qemu/).
# The second build (--variant modules-rust: pagenc as a module, QEMU's own Rust on)
# gets a focused set of tests; the full suite runs on the default (builtin) build.
PYTHON ?= python3
CHECK_TARGETS += check-qemu check-qemu-modules-rust
QEMU_MR_BUILD := build/qemu-build-modules-rust

.PHONY: qemu check-qemu check-qemu-patches check-meson-subproject check-lib-symbols check-qemu-series \
	check-qemu-qtest
.PHONY: qemu-modules-rust check-qemu-modules-rust
qemu:
	bash scripts/build-qemu.sh --no-deps

qemu-modules-rust:
	bash scripts/build-qemu.sh --no-deps --variant modules-rust

# QEMU's own checkpatch.pl, from the unpacked tree; every patch must have 0 errors.
check-qemu-patches: qemu
	@set -e; for p in $(filter-out %cover-letter.patch,$(wildcard qemu-patches/*.patch)); do \
	    echo "checkpatch $$p"; \
	    perl build/qemu-src/scripts/checkpatch.pl --no-color --patch "$$p"; \
	done

# meson.build's subproject mode: a parent project finds pagenc through
# meson.override_dependency (no pkg-config file) and links a C program.
check-meson-subproject:
	rm -rf build/meson-subproject && mkdir -p build/meson-subproject/subprojects
	cp tests/qemu/meson-subproject/meson.build tests/qemu/meson-subproject/t.c build/meson-subproject/
	ln -s $(CURDIR) build/meson-subproject/subprojects/pagenc
	cd build/meson-subproject && env -u PKG_CONFIG_PATH meson setup b >/dev/null && ninja -C b >/dev/null && ./b/t

# The installed libpagenc.a exports only pagenc_* (scripts/localize-staticlib.sh):
# nm, a link beside a second Rust runtime, and the unprocessed archive as negative control.
check-lib-symbols:
	sh tests/qemu/lib-symbols/check.sh

# The series' in-tree qtest (tests/qtest/pagenc-test.c): only that binary is built
# (with libqtest and libqos, not QEMU's other qtests), then run against the patched
# binary. A qtest cannot pass -L: SeaBIOS (Debian's seabios package) is linked
# into the build tree's data directory (qemu-bundle), where the binary looks.
QEMU_BLD := build/qemu-build
check-qemu-qtest: qemu
	@echo "qtest: ninja tests/qtest/pagenc-test (log: $(QEMU_BLD)/qtest-build.log)"
	@ninja -C $(QEMU_BLD) -j2 tests/qtest/pagenc-test > $(QEMU_BLD)/qtest-build.log 2>&1 || \
	    { tail -30 $(QEMU_BLD)/qtest-build.log; exit 1; }
	@mkdir -p $(QEMU_BLD)/qemu-bundle/usr/local/share/qemu
	@ln -sf /usr/share/seabios/bios-256k.bin $(QEMU_BLD)/qemu-bundle/usr/local/share/qemu/
	cd $(QEMU_BLD) && QTEST_QEMU_BINARY=./qemu-system-x86_64 timeout 600 \
	    tests/qtest/pagenc-test --tap -k

check-qemu: qemu check-qemu-patches check-meson-subproject check-lib-symbols check-qemu-qtest
	PAGENC_REQUIRE_QEMU=1 $(PYTHON) -m pytest -q -ra tests/qemu $(QEMU_TEST_ARGS)

# Slow (a full QEMU build, then one incremental build per patch): every patch builds on its own.
check-qemu-series: qemu
	bash scripts/check-qemu-series.sh

# The modules-rust build: libpagenc beside QEMU's Rust staticlib in one link, with the
# same and with another rustc (qemu-rust-link.sh); the module is mapped only with
# -object pagenc, the Rust HPET counts, a live migration with the list between two of its
# QEMUs. Prints what the variant costs (its build and these tests): the CI time it adds.
check-qemu-modules-rust:
	@t0=$$(date +%s); \
	bash scripts/build-qemu.sh --no-deps --variant modules-rust && \
	sh tests/qemu/lib-symbols/qemu-rust-link.sh $(QEMU_MR_BUILD) && \
	PAGENC_REQUIRE_QEMU=1 PAGENC_QEMU_VARIANT=modules-rust \
	    PAGENC_QEMU=$(CURDIR)/$(QEMU_MR_BUILD)/qemu-system-x86_64 \
	    QEMU_MODULE_DIR=$(CURDIR)/$(QEMU_MR_BUILD) \
	    $(PYTHON) -m pytest -q -ra tests/qemu/test_variant_modules_rust.py $(QEMU_TEST_ARGS) && \
	echo "check-qemu-modules-rust: the second QEMU variant took $$(( $$(date +%s) - t0 )) s (build + tests)"
