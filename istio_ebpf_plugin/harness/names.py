"""Names and places of everything the harness creates.

Every object carries one of these prefixes so ``istio-ebpf harness-cleanup`` and
the test-session check can find leftovers without touching anything else.
"""

from __future__ import annotations

import secrets
from pathlib import Path

# Where they live is the datapath's knowledge (one cgroup v2 discovery, one bpffs root).
from ..datapath.host import BPFFS_ROOT
from ..datapath.host import require_cgroup_v2_root as cgroup_v2_root
from ..datapath.selftest.topology import NETNS_DIR

__all__ = ["BPFFS_ROOT", "NETNS_DIR", "cgroup_v2_root", "new_token", "created_tokens"]

NETNS_PREFIX = "ie-"                      # network namespaces (``ip netns``)
CGROUP_PREFIX = "istio-ebpf-test-"        # parent cgroups under cgroup_v2_root()
BPF_PIN_PREFIX = "istio-ebpf-test"        # bpffs pin directories under BPFFS_ROOT
TMP_PREFIX = "istio-ebpf-test-"           # config / log directories under /tmp

TMP_ROOT = Path("/tmp")


def new_token() -> str:
    """Short unique token shared by all objects of one Node (6 hex chars)."""
    return secrets.token_hex(3)


#: Tokens of every Node created by this process (the test session checks they are all gone).
created_tokens: set[str] = set()
