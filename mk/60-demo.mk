# The README's first command: `make demo` installs what is missing, builds pagenc and the
# patched QEMU (cached), builds the guest payload and live-migrates it between two QEMUs
# (scripts/demo.py; docs/demo.md explains its output), then migrates a second guest whose encrypted
# pages go through the simulated SEV firmware (scripts/demo_transport.py, checked page by page
# with the library's verifier, which it builds with cargo).
PYTHON ?= python3

.PHONY: demo guest-payload
guest-payload:
	$(MAKE) -C guest --no-print-directory

demo:
	bash scripts/install-deps.sh --demo
	bash scripts/build-qemu.sh --no-deps
	$(MAKE) -C guest --no-print-directory
	$(PYTHON) scripts/demo.py $(DEMO_ARGS)
