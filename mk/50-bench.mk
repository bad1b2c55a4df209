# Benchmarks (issue 7): the quick mode of the bench binary, so that it cannot rot. It prints the
# goal ratios but never fails on timing; it fails only when the structures disagree on a query.
# The full study (docs/performance.md): cargo bench --bench pagenc_bench, then make bench-e2e
CHECK_TARGETS += check-bench

.PHONY: check-bench
check-bench:
	$(CARGO) bench --bench pagenc_bench -- --quick

# End to end (issue 12): migration time, downtime and transferred bytes of the demo guest with
# the patched QEMU, without and with -object pagenc (boot list, hostile list); rows are
# interleaved, best and median of several runs, ratios to the run without pagenc. Not part of
# `make check` (minutes); needs scripts/build-qemu.sh and `make -C guest`.
.PHONY: bench-e2e
bench-e2e:
	python3 benches/e2e/migration_cost.py $(BENCH_E2E_ARGS)
