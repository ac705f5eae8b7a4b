"""istio-ebpf: Istio sidecar traffic capture with eBPF instead of iptables."""

from pathlib import Path

__version__ = "0.1.0"

#: Repository root (the package is installed editable; bpf/ and manifests/ live beside it).
PROJECT_ROOT = Path(__file__).resolve().parent.parent
BPF_DIR = PROJECT_ROOT / "bpf"
MANIFESTS_DIR = PROJECT_ROOT / "manifests"

#: Annotation a pod sets to opt in to eBPF capture.
OPT_IN_ANNOTATION = "istio-ebpf.io/redirect"
OPT_IN_VALUE = "ebpf"
#: Node label published by the agent and the installer: cookie | podip | unsupported.
NODE_MODE_LABEL = "istio-ebpf.io/mode"
