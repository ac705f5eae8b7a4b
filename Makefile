# The two commands of the README: `make demo` and `make test`. Each does its own set-up.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test bench bench-quick soak clean-host kubernetes cluster-up cluster-down

setup:
	bash scripts/setup.sh all

demo: setup
	$(VENV)/bin/istio-ebpf demo

# The real Kubernetes 1.20.2 binaries (cached in /var/cache/istio-ebpf; ~15 min cold, instant warm).
kubernetes:
	bash scripts/build-kubernetes.sh

test: setup kubernetes
	$(PY) -m pytest $(PYTEST_ARGS)

# A real control plane on loopback for humans: `eval $$(make -s cluster-up)` sets KUBECONFIG.
cluster-up: setup kubernetes
	@$(PY) -m istio_ebpf_plugin.harness.control_plane up

cluster-down: setup
	@$(PY) -m istio_ebpf_plugin.harness.control_plane down

bench: setup
	$(VENV)/bin/istio-ebpf bench --json out/bench.json --plot out/bench.png

bench-quick: setup
	$(VENV)/bin/istio-ebpf bench --quick --json out/bench-quick.json --plot out/bench-quick.png

soak: setup
	$(PY) -m pytest -m soak -p no:cacheprovider tests/test_soak.py

# Removes whatever a crashed run may have left (only objects carrying our prefix).
clean-host: setup
	$(VENV)/bin/istio-ebpf harness-cleanup
