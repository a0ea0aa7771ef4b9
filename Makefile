# vmrootfs: `make demo` converts the bundled example image, `make test` runs every test.
# Both install what is missing first (Debian packages via apt-get, crates via cargo).

SHELL := /bin/bash
CARGO ?= cargo
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
DEMO_STORE ?= target/demo-store

.PHONY: all deps deps-run containerd build demo test doc fuzz bench lint clean

all: build

# Debian packages vmrootfs runs, boots with and tests with (see scripts/install-deps.sh).
deps:
	@scripts/install-deps.sh all
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust from https://rustup.rs"; exit 1; }

deps-run:
	@scripts/install-deps.sh run
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust from https://rustup.rs"; exit 1; }

# containerd 2.1 for tests/containerd.rs, unpacked under target/containerd (also part of `deps`).
containerd:
	@scripts/containerd.sh

build: deps-run
	$(CARGO) build --release --locked

# Convert the bundled two-layer busybox image to EROFS blobs and print the build result.
demo: build
	rm -rf $(DEMO_STORE)
	./target/release/vmrootfs --store $(DEMO_STORE) build \
	  oci-archive:testdata/busybox.oci.tar:busybox --tag busybox --json
	@echo
	./target/release/vmrootfs --store $(DEMO_STORE) inspect busybox

# Unit, hostile-input, semantics, sparse, fidelity (root and unprivileged), store, registry,
# boot and kit tests (the fidelity tests make a real debootstrap image once and cache it under
# target/testimage). Run as root: the tests loop-mount what they build and drop to uid 65534
# to check that conversion needs no privileges. Then the library's example (it builds the
# bundled image through the public API and checks every blob it prints), the examples in the
# rustdoc, and the rustdoc itself, which must not warn.
test: deps
	$(SUDO) $(CARGO) test --locked --all-targets -- --test-threads=2
	$(SUDO) $(CARGO) run --locked --example build_and_attach
	$(SUDO) $(CARGO) test --locked --doc
	$(SUDO) $(MAKE) doc

# The library's API documentation (target/doc/vmrootfs); any rustdoc warning fails.
doc:
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --locked --no-deps

# A longer run of the mutation fuzzer (tests/fuzz.rs) from a new seed; failing cases are saved
# under tests/fuzz-regressions/, which `make test` replays.
fuzz: deps
	FUZZ_CASES=$${FUZZ_CASES:-300000} FUZZ_SEED=$${FUZZ_SEED:-$$(date +%s)} FUZZ_SAVE=1 \
	  $(CARGO) test --locked --test fuzz mutated -- --nocapture

bench: deps build
	$(SUDO) bench/bench.sh
	$(SUDO) bench/erofs-image.sh
	$(SUDO) bench/lazy.sh

lint: doc
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets --locked -- -D warnings

clean:
	$(CARGO) clean
