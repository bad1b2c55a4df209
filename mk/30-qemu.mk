# QEMU integration: the patched QEMU 10.0.13 (scripts/build-qemu.sh, cached in build/),
# checkpatch on the series (qemu-patches/) and the pytest + qemu.qmp tests (tests/qemu/).
PYTHON ?= python3
CHECK_TARGETS += check-qemu

.PHONY: qemu check-qemu check-qemu-patches
qemu:
	bash scripts/build-qemu.sh --no-deps

# QEMU's own checkpatch.pl, from the unpacked tree; every patch must have 0 errors.
check-qemu-patches: qemu
	@set -e; for p in qemu-patches/*.patch; do \
	    echo "checkpatch $$p"; \
	    perl build/qemu-src/scripts/checkpatch.pl --no-color --patch "$$p"; \
	done

check-qemu: qemu check-qemu-patches
	PAGENC_REQUIRE_QEMU=1 $(PYTHON) -m pytest -q -ra tests/qemu $(QEMU_TEST_ARGS)
