# Rust: formatting, lints, unit/property/integration tests.
CHECK_TARGETS += check-lint check-rust

.PHONY: check-lint check-rust
check-lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings -D clippy::undocumented_unsafe_blocks

# Benches are built (clippy above) but not run here: `cargo test --all-targets` would run the
# bench binary's full mode in a debug build; check-bench runs its quick mode instead.
check-rust:
	PAGENC_REQUIRE_KVM=$${PAGENC_REQUIRE_KVM:-$$( [ "$$CI" = true ] && [ -e /dev/kvm ] && echo 1 || echo 0 )} \
	    $(CARGO) test --lib --bins --tests --examples
