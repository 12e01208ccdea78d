# multihost: one entry point.  `make demo` shows the product, `make test` checks it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Debian packages the lab, the root tests and the benchmarks use.
DEBS   := nftables iproute2 nginx-light iperf3 arping tcpdump keepalived wrk iptables \
          conntrack ethtool procps kmod curl stress-ng \
          clang llvm libbpf-dev libbpf1 bpftool linux-libc-dev
# The XDP program (dataplane = "xdp"): C source + generated layout header -> BTF object.
BPF_DIR := src/multihost/dataplane/bpf
BPF_OBJ := $(BPF_DIR)/multihost_xdp.o

.PHONY: setup debs bpf test lint types unit demo bench docs lock clean
.DEFAULT_GOAL := test

setup: $(STAMP) debs bpf

bpf: debs
	@$(MAKE) --no-print-directory $(BPF_OBJ)

$(BPF_OBJ): $(BPF_DIR)/multihost_xdp.c $(BPF_DIR)/multihost_layout.h scripts/build-bpf.sh
	@scripts/build-bpf.sh

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install -q --disable-pip-version-check -r requirements.lock
	@$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	@touch $@

debs:
	@scripts/install-debs.sh $(DEBS)

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

types: setup
	$(BIN)/mypy

unit: setup
	$(BIN)/pytest -q

test: lint types unit

demo: setup
	$(BIN)/multihost lab demo

# Man pages (docs/man/) and shell completion (contrib/completion/), generated from the
# argparse parsers and the example configuration; a unit test fails when they are stale.
docs: setup
	$(BIN)/python scripts/gen-docs.py

# Benchmarks are not tests: each prints its own table; see BENCHMARKS.md for the results and
# the full list (data plane, failover, keepalived anchor, chaos, loss, fuzz need root).
bench: setup
	$(BIN)/python bench/bench_assignment.py
	$(BIN)/python bench/bench_fuzz.py --inputs 100000

# Regenerate the lock file from pyproject.toml (needs network access to PyPI).
lock:
	$(PYTHON) -m pip install -q uv
	$(PYTHON) -m uv pip compile pyproject.toml --extra dev --python-version 3.11 \
	    --generate-hashes -o requirements.lock --quiet
	@echo "requirements.lock updated"

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build src/*.egg-info $(BPF_OBJ)
