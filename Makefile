# pagenc: the two commands of README.md and what they are made of.
#   make demo    build pagenc and the patched QEMU, live-migrate a guest between two QEMUs
#   make check   every test of the project (what .ci/run runs)
# Each area adds its own check target in mk/<area>.mk (CHECK_TARGETS += ...).

SHELL := /bin/bash
CARGO ?= cargo
export PATH := $(HOME)/.cargo/bin:$(PATH)

CHECK_TARGETS :=

.PHONY: all deps check demo lib
all: lib

deps:
	bash scripts/install-deps.sh

lib:
	$(CARGO) build --release --lib

include $(sort $(wildcard mk/*.mk))

check: deps
	@set -e; for t in $(CHECK_TARGETS); do \
	    echo "=== make $$t"; $(MAKE) --no-print-directory $$t; done
	@echo "=== make check: all of $(CHECK_TARGETS) passed"
