# End-to-end tests: real patched QEMUs (scripts/build-qemu.sh) running the guest payload,
PYTHON ?= python3
# driven over QMP with pytest + qemu.qmp (tests/e2e/). They skip when the QEMU binary is
# missing unless PAGENC_REQUIRE_QEMU=1 (CI); here the binary is built first anyway, and
# Debian's OVMF is fetched into build/ovmf (scripts/fetch-ovmf.sh, cached) for the OVMF tests.
CHECK_TARGETS += check-e2e

.PHONY: check-e2e
check-e2e:
	bash scripts/build-qemu.sh --no-deps
	bash scripts/fetch-ovmf.sh
	$(MAKE) -C guest --no-print-directory
	$(PYTHON) -m pytest -q -ra tests/e2e $(E2E_ARGS)
