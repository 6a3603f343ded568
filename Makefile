# hangar's two commands. Both install what is missing themselves (the MMDetection venv is
# cached under ~/.cache/hangar and shared by every clone).
.PHONY: demo test build mmdet bench lint

CARGO ?= cargo
HANGAR := target/debug/hangar

build:
	$(CARGO) build

mmdet: build
	$(HANGAR) mmdet install

# Starts hangar on its embedded PostgreSQL, trains a tiny RTMDet on a synthetic dataset through
# it, then runs a detection over HTTP on a larger image and prints what was found.
demo: mmdet
	bash scripts/demo.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Every test, the end-to-end MMDetection tier included.
test: mmdet lint
	$(CARGO) test --workspace

bench:
	$(CARGO) build --release
	target/release/hangar bench
