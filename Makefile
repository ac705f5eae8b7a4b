# The two commands of the README: `make demo` and `make test`. Each does its own set-up.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo lint test bench bench-quick soak clean-host kernel-matrix

setup:
	bash scripts/setup.sh all

demo: setup
	$(VENV)/bin/istio-ebpf demo

# ruff (E,F,W,B; line length 120) on everything, mypy on the product (config in pyproject.toml).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: setup lint
	$(PY) -m pytest $(PYTEST_ARGS)

# Every step on 5.10, 6.1, 6.12 (virtme-ng VMs) and this host; table in out/kernel-matrix/table.txt.
# Tens of minutes under TCG: CI runs the subset in tests/test_kernel_matrix.py instead.
KERNELS ?= 5.10,6.1,6.12,host
kernel-matrix: setup
	$(VENV)/bin/istio-ebpf kernel-matrix --kernels $(KERNELS) --out out/kernel-matrix

bench: setup
	$(VENV)/bin/istio-ebpf bench --json out/bench.json --plot out/bench.png

bench-quick: setup
	$(VENV)/bin/istio-ebpf bench --quick --json out/bench-quick.json --plot out/bench-quick.png

soak: setup
	$(PY) -m pytest -m soak -p no:cacheprovider tests/test_soak.py

# Removes whatever a crashed run may have left (only objects carrying our prefix).
clean-host: setup
	$(VENV)/bin/istio-ebpf harness-cleanup
