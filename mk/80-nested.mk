# The nested-KVM rig (issue 11, docs/nested.md): an L1 Debian kernel under the patched QEMU in
# TCG with an emulated AMD SVM CPU runs Debian's own kvm-amd; there the guest payload's real
# VMMCALLs reach pagenc as KVM_EXIT_HYPERCALL, and two patched QEMUs live-migrate it while it
# converts pages. scripts/nested-rig.sh builds and boots it (parts from Debian's mirror, cached
# in build/nested); tests/nested asserts on what L1 reports. It skips where it cannot run (no
# TCG SVM, mirror unreachable) unless PAGENC_REQUIRE_NESTED=1 (CI sets it).
#   make check-nested             both L1 boots (6.1 and 6.12), about 3 minutes
#   make nested-shell [NESTED_KERNEL=6.1]   a shell in L1 with kvm-amd loaded, for debugging
PYTHON ?= python3
NESTED_KERNEL ?= 6.12
CHECK_TARGETS += check-nested

.PHONY: check-nested nested-shell
check-nested:
	bash scripts/build-qemu.sh --no-deps
	bash scripts/nested-rig.sh check
	$(PYTHON) -m pytest -q -ra tests/nested

nested-shell:
	bash scripts/build-qemu.sh --no-deps
	bash scripts/nested-rig.sh shell $(NESTED_KERNEL)
