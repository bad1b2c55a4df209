# Benchmarks (issue 7): the quick mode of the bench binary, so that it cannot rot. It prints the
# goal ratios but never fails on timing; it fails only when the structures disagree on a query.
# The full study (docs/performance.md): cargo bench --bench pagenc_bench
CHECK_TARGETS += check-bench

.PHONY: check-bench
check-bench:
	$(CARGO) bench --bench pagenc_bench -- --quick
