"""A lab-only install plugin for the node e2e: the agent keeps only capabilities this machine can grant.

This VM's capability bounding set lacks CAP_SYS_RESOURCE (it is also why root cannot lower
oom_score_adj here), so runc refuses any container asking for it ("unable to apply caps:
operation not permitted"). The agent needs SYS_RESOURCE only below Linux 5.11 (RLIMIT_MEMLOCK
for maps; memcg accounts them since), so on this 6.18 kernel the e2e removes exactly the
capabilities outside the bounding set from the DaemonSet, through the install flow's own
extension point, and says which. Every other privilege stays as manifests/daemonset.yaml declares.
"""

from __future__ import annotations

import sys
from typing import Any

from istio_ebpf_plugin.install.manager import hookimpl

# linux/capability.h numbers of the capabilities the DaemonSet may ask for.
CAP_NUMBERS = {"DAC_READ_SEARCH": 2, "NET_ADMIN": 12, "SYS_PTRACE": 19, "SYS_ADMIN": 21, "SYS_RESOURCE": 24,
               "PERFMON": 38, "BPF": 39}


def bounding_set() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("CapBnd:"):
            return int(line.split()[1], 16)
    return 0


def not_grantable(caps: list[str], bounding: int) -> list[str]:
    return [c for c in caps if c in CAP_NUMBERS and not bounding >> CAP_NUMBERS[c] & 1]


@hookimpl
def istio_ebpf_transform_manifests(stream: Any, options: Any, plan: Any) -> None:
    bounding = bounding_set()
    for doc in stream.documents:
        if doc.kind != "DaemonSet":
            continue
        spec = doc.data["spec"]["template"]["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            caps = ((c.get("securityContext") or {}).get("capabilities") or {}).get("add") or []
            dropped = not_grantable(caps, bounding)
            if dropped:
                c["securityContext"]["capabilities"]["add"] = [x for x in caps if x not in dropped]
                doc.changed = True
                print(f"lab: container {c['name']}: {', '.join(dropped)} dropped (not in this machine's "
                      "capability bounding set)", file=sys.stderr)
