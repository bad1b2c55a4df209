# Fuzzing (cargo fuzz, libFuzzer; targets in fuzz/fuzz_targets): replay the committed corpora,
# then fuzz each target for a bounded time from a copy of its corpus (so the committed corpus
# is not changed by `make check`). Any crash, panic, timeout or allocation past a target's
# RAM-derived bound fails. Crash inputs land in fuzz/artifacts/<target>/.
#   make check-fuzz                 what make check runs (FUZZ_TIME=30 s per target)
#   make fuzz-grow FUZZ_TIME=120    fuzz into the committed corpora, then minimise them
CHECK_TARGETS += check-fuzz

FUZZ_TARGETS := hypercalls stream_load
FUZZ_TIME ?= 30
# cargo fuzz passes nightly-only rustc flags: use the nightly toolchain where there is one,
# else the stable one with RUSTC_BOOTSTRAP (the machine may have only one toolchain).
FUZZ_CARGO := $(shell rustup toolchain list 2>/dev/null | grep -q '^nightly' \
                && echo 'cargo +nightly' || echo 'RUSTC_BOOTSTRAP=1 cargo')
# -a: debug assertions on, so the library's internal consistency checks run under the fuzzer.
# -s none: the targets drive safe Rust; AddressSanitizer would only slow them (3x) down.
FUZZ_RUN = $(FUZZ_CARGO) fuzz run -a -s none

.PHONY: check-fuzz fuzz-grow
check-fuzz:
	@command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz is missing: run make deps"; exit 1; }
	cd fuzz && $(CARGO) fmt --check
	@set -e; for t in $(FUZZ_TARGETS); do \
	    echo "--- fuzz $$t: replay fuzz/corpus/$$t"; \
	    $(FUZZ_RUN) $$t fuzz/corpus/$$t -- -runs=0; \
	    tmp=$$(mktemp -d); cp -r fuzz/corpus/$$t/. $$tmp/; \
	    echo "--- fuzz $$t: $(FUZZ_TIME) s"; \
	    $(FUZZ_RUN) $$t $$tmp -- -max_total_time=$(FUZZ_TIME) -timeout=20 -print_final_stats=1 \
	        || { rm -rf $$tmp; exit 1; }; \
	    rm -rf $$tmp; \
	done

fuzz-grow:
	@set -e; for t in $(FUZZ_TARGETS); do \
	    $(FUZZ_RUN) $$t fuzz/corpus/$$t -- -max_total_time=$(FUZZ_TIME) -timeout=20; \
	    $(FUZZ_CARGO) fuzz cmin -a $$t fuzz/corpus/$$t; \
	done
