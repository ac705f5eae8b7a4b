"""istio-ebpf: Istio sidecar traffic capture with eBPF instead of iptables."""

from pathlib import Path

__version__ = "0.1.0"

#: Repository root when running from a checkout (the lab and tests use it; product code finds
#: its bpf/ and manifests/ through :mod:`istio_ebpf_plugin.resources`, which works from a wheel).
PROJECT_ROOT = Path(__file__).resolve().parent.parent

#: Annotation a pod sets to opt in to eBPF capture.
OPT_IN_ANNOTATION = "istio-ebpf.io/redirect"
OPT_IN_VALUE = "ebpf"
#: Name of the injection template istio-ebpf adds to Istio's injector ConfigMap: the installer
#: writes it, the agent's drift check looks for it (neither imports the other).
INJECTION_TEMPLATE = "ebpf"
#: Annotation the agent writes beside the node label: why it chose that mode. Its presence tells the
#: installer the label comes from an agent's probes (and wins over the kernel-version rule).
MODE_REASON_ANNOTATION = "istio-ebpf.io/mode-reason"
#: Node label published by the agent and the installer: cookie | podip | unsupported.
NODE_MODE_LABEL = "istio-ebpf.io/mode"

#: Annotation ``istio-ebpf uninstall`` puts on the agent pods while it drains (value: when it began,
#: RFC 3339). The agent sees it on its own pod through its pod watch and reports ``draining``.
DRAINING_ANNOTATION = "istio-ebpf.io/draining"

#: Node annotation the agent renews with its label (JSON: ``time`` RFC 3339 UTC, ``mode`` it decided,
#: ``period`` in seconds until the next renewal). ``istio-ebpf status`` counts a node as captured only
#: while this is fresh (docs/install.md, Status).
HEARTBEAT_ANNOTATION = "istio-ebpf.io/heartbeat"
