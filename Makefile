# The two commands of the README: `make demo` and `make test`. Each does its own set-up.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo lint test test-deep wheel image bench bench-pods bench-quick forwarder soak clean-host kubernetes cluster-up cluster-down kernel-matrix e2e

setup:
	bash scripts/setup.sh all

demo: setup
	$(VENV)/bin/istio-ebpf demo

# ruff (E,F,W,B; line length 120) on everything, mypy on the product (config in pyproject.toml).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# The real Kubernetes 1.20.2 binaries (cached in /var/cache/istio-ebpf; ~15-20 min cold, instant warm).
kubernetes:
	bash scripts/build-kubernetes.sh >&2   # stdout stays clean for `eval "$$(make -s cluster-up)"`

# The agent image is built first (cached: instant when unchanged) so its time shows apart from the tests'.
# The suite runs the capture property test in the mode the probes select (cookie from 5.15 on); it runs
# again in pod-IP mode, 8 fixed examples (10 s here at load 3-5, 28 s at load 8), so both modes are checked.
test: setup lint kubernetes image
	$(PY) -m pytest $(PYTEST_ARGS)
	CI=1 CAPTURE_PROPERTY_EXAMPLES=8 CAPTURE_PROPERTY_MODE=podip $(PY) -m pytest -x -p no:cacheprovider tests/test_datapath_capture_property.py

# Every step on 5.10, 6.1, 6.12 (virtme-ng VMs) and this host; table in out/kernel-matrix/table.txt.
# Tens of minutes under TCG: CI runs the subset in tests/test_harness_kernel_matrix.py instead.
KERNELS ?= 5.10,6.1,6.12,host
kernel-matrix: setup
	$(VENV)/bin/istio-ebpf kernel-matrix --kernels $(KERNELS) --out out/kernel-matrix

# The in-kernel property test (Istio's iptables vs eBPF on random pod configurations) at depth,
# in both modes; `make test` runs 40 fixed examples in the mode the probes select and 8 in pod-IP mode.
test-deep: setup
	CAPTURE_PROPERTY_EXAMPLES=400 CAPTURE_PROPERTY_MODE=cookie $(PY) -m pytest -x -p no:cacheprovider tests/test_datapath_capture_property.py
	CAPTURE_PROPERTY_EXAMPLES=400 CAPTURE_PROPERTY_MODE=podip $(PY) -m pytest -x -p no:cacheprovider tests/test_datapath_capture_property.py

# A real control plane on loopback for humans: `eval "$$(make -s cluster-up)"` sets KUBECONFIG.
cluster-up: setup kubernetes
	@$(PY) -m istio_ebpf_plugin.harness.control_plane up

cluster-down: setup
	@$(PY) -m istio_ebpf_plugin.harness.control_plane down

# The release wheel (bpf/ and manifests/ inside as package data) in dist/.
wheel: setup
	rm -rf build dist/istio_ebpf-*.whl
	$(VENV)/bin/pip wheel --no-deps -q -w dist .
	rm -rf build
	@ls dist/istio_ebpf-*.whl

# The agent image from the Containerfile, built here without a registry; prints the
# docker-archive path (/var/cache/istio-ebpf/agent-image-<version>-<hash>.tar) last.
image: setup
	bash scripts/build-image.sh

# The capture-only sidecar of the bench (tools/capture_forwarder.c), cached in /var/cache/istio-ebpf.
forwarder:
	bash scripts/build-forwarder.sh

# Everything docs/bench.md shows, in one run: pod start-up on a real node (kubelet + containerd, like
# `make e2e`), then the paths, the agent, and the capture with 1, 100 and 500 pods on the node.
POD_ROUNDS ?= 20
bench: setup forwarder kubernetes image
	bash scripts/setup-node.sh
	cd tests && ../$(PY) -m support.node_bench --rounds $(POD_ROUNDS) --json ../out/pod-startup.json
	$(VENV)/bin/istio-ebpf bench --agent --scale 1,100,500 --merge-meta out/pod-startup.json \
		--json out/bench.json --plot out/bench.png --markdown out/bench.md --notes docs/bench-notes.md

# Pod start-up alone: creation to Ready, opted-in (eBPF) vs stock Istio (istio-init), paired rounds.
bench-pods: setup kubernetes image
	bash scripts/setup-node.sh
	cd tests && ../$(PY) -m support.node_bench --rounds $(POD_ROUNDS) --json ../out/pod-startup.json

bench-quick: setup forwarder
	$(VENV)/bin/istio-ebpf bench --quick --agent --json out/bench-quick.json --plot out/bench-quick.png

soak: setup
	$(PY) -m pytest -m soak -p no:cacheprovider tests/test_soak.py

# Removes whatever a crashed run may have left (only objects carrying our prefix).
clean-host: setup
	$(VENV)/bin/istio-ebpf harness-cleanup

# A real node end to end (kubelet + containerd + the agent's DaemonSet pod); prints every step.
e2e: setup kubernetes image
	bash scripts/setup-node.sh
	$(PY) -m pytest -x -s -p no:cacheprovider -m node_e2e tests/test_node_e2e.py $(PYTEST_ARGS)
