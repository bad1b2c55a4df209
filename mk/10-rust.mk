# Rust: formatting, lints, unit/property/integration tests.
CHECK_TARGETS += check-lint check-rust

.PHONY: check-lint check-rust
check-lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings -D clippy::undocumented_unsafe_blocks

check-rust:
	PAGENC_REQUIRE_KVM=$${PAGENC_REQUIRE_KVM:-$$( [ "$$CI" = true ] && [ -e /dev/kvm ] && echo 1 || echo 0 )} \
	    $(CARGO) test --all-targets
