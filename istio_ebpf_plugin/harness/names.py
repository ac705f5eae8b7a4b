"""Names and places of everything the harness creates.

Every object carries one of these prefixes so ``istio-ebpf harness-cleanup`` and
the test-session check can find leftovers without touching anything else.
"""

from __future__ import annotations

import secrets
from pathlib import Path

NETNS_PREFIX = "ie-"                      # network namespaces (``ip netns``)
CGROUP_PREFIX = "istio-ebpf-test-"        # parent cgroups under cgroup_v2_root()
BPF_PIN_PREFIX = "istio-ebpf-test"        # bpffs pin directories under BPFFS_ROOT
TMP_PREFIX = "istio-ebpf-test-"           # config / log directories under /tmp

NETNS_DIR = Path("/run/netns")
BPFFS_ROOT = Path("/sys/fs/bpf")
TMP_ROOT = Path("/tmp")


def cgroup_v2_root() -> Path:
    """The cgroup v2 mount: ``/sys/fs/cgroup/unified`` on hybrid hosts, else ``/sys/fs/cgroup``."""
    for candidate in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup")):
        if (candidate / "cgroup.controllers").exists():  # a file only cgroup v2 has
            return candidate
    raise FileNotFoundError("no cgroup v2 hierarchy mounted at /sys/fs/cgroup/unified or /sys/fs/cgroup")


def new_token() -> str:
    """Short unique token shared by all objects of one Node (6 hex chars)."""
    return secrets.token_hex(3)


#: Tokens of every Node created by this process (the test session checks they are all gone).
created_tokens: set[str] = set()
