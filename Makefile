# vmrootfs: `make demo` converts the bundled example image, `make test` runs every test.
# Both install what is missing first (Debian packages via apt-get, crates via cargo).

SHELL := /bin/bash
CARGO ?= cargo
# Tools vmrootfs runs (erofs-utils, e2fsprogs), tools the tests use to make and check real
# images (umoci, skopeo, debootstrap, attr, libcap2-bin), and the bench's GNU time.
APT_PACKAGES := erofs-utils e2fsprogs umoci skopeo debootstrap busybox-static attr libcap2-bin \
                python3 time zstd ca-certificates
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
DEMO_STORE ?= target/demo-store

.PHONY: all deps build demo test bench lint clean

all: build

deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust from https://rustup.rs"; exit 1; }

build: deps
	$(CARGO) build --release --locked

# Convert the bundled two-layer busybox image to EROFS blobs and print the build result.
demo: build
	rm -rf $(DEMO_STORE)
	$(SUDO) ./target/release/vmrootfs --store $(DEMO_STORE) build \
	  oci-archive:testdata/busybox.oci.tar:busybox --tag busybox --json
	@echo
	$(SUDO) ./target/release/vmrootfs --store $(DEMO_STORE) inspect busybox

# Unit, hostile-input, semantics and fidelity tests (the fidelity tests make a real
# debootstrap image once and cache it under target/testimage). Needs root: loop mounts.
test: deps
	$(SUDO) $(CARGO) test --locked --all-targets -- --test-threads=2

bench: build
	$(SUDO) bench/bench.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets --locked -- -D warnings

clean:
	$(CARGO) clean
