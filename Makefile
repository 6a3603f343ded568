# hangar's two commands. Both install what is missing themselves (the MMDetection venv is
# cached under ~/.cache/hangar and shared by every clone; the wasm32-wasip2 target is added
# with rustup when it is missing).
.PHONY: demo test build mmdet plugins wasm-target bench lint

CARGO ?= cargo
RUSTUP ?= rustup
HANGAR := target/debug/hangar
PLUGINS := --manifest-path plugins/Cargo.toml
EXAMPLE := --manifest-path examples/custom-retry-policy/Cargo.toml

build:
	$(CARGO) build

mmdet: build
	$(HANGAR) mmdet install

wasm-target:
	@$(RUSTUP) target list --installed 2>/dev/null | grep -qx wasm32-wasip2 \
		|| $(RUSTUP) target add wasm32-wasip2

# The policy plugins (WASI components) in plugins/, its own workspace.
plugins: wasm-target
	$(CARGO) build $(PLUGINS) --target wasm32-wasip2 --release

# Starts hangar on its embedded PostgreSQL with the WASM retry policy and cleanup hook active,
# trains a tiny RTMDet on a synthetic dataset through it, then runs a detection over HTTP on a
# larger image and prints what was found.
demo: mmdet plugins
	bash scripts/demo.sh

lint: wasm-target
	bash -n scripts/demo.sh
	bash -n python/install-mmdet.sh
	$(CARGO) fmt --all -- --check
	$(CARGO) fmt $(PLUGINS) --all -- --check
	$(CARGO) fmt $(EXAMPLE) -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy $(PLUGINS) --workspace --target wasm32-wasip2 -- -D warnings
	$(CARGO) clippy $(EXAMPLE) --target wasm32-wasip2 -- -D warnings

# Every test, the end-to-end MMDetection tier included; then the plugins' own unit tests
# (their pure logic, natively).
test: mmdet plugins lint
	$(CARGO) test --workspace
	$(CARGO) test $(PLUGINS) -p retry-exponential -p detection-cleanup -p delete-failing-jobs

bench:
	$(CARGO) build --release
	target/release/hangar bench
	$(MAKE) plugins
	target/release/hangar bench --election-plugin plugins/target/wasm32-wasip2/release/retry_exponential.wasm
	target/release/hangar bench --election-plugin plugins/target/wasm32-wasip2/release/retry_exponential.wasm --election-pages-given-back
