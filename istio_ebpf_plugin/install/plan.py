"""Rollout plan: which capture mode each node gets, from its kernel version.

The rule is :func:`istio_ebpf_plugin.kernel.mode_for_release`, the same one the
node agent starts from (the agent then confirms it with feature probes and
publishes the result as the node label ``istio-ebpf.io/mode``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable

from .. import NODE_MODE_LABEL, kernel
from ..errors import UsageError


@dataclass(frozen=True)
class NodePlan:
    node: str
    kernel: str
    rule_mode: str      # what the kernel version alone selects
    mode: str           # what will be used (after --mode)
    current_label: str  # the node's istio-ebpf.io/mode label now ("" if none)
    reason: str = ""    # why the node is unsupported whatever its kernel ("" if it is not)

    @property
    def captures(self) -> bool:
        return self.mode in ("cookie", "podip")


def nodes_from_json(text: str, source: str) -> list[dict[str, Any]]:
    """Nodes from ``kubectl get nodes -o json`` (a List) or a single Node object."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{source}: not JSON ({exc.msg} at line {exc.lineno})") from None
    if isinstance(data, dict) and data.get("kind") == "Node":
        return [data]
    if isinstance(data, dict) and isinstance(data.get("items"), list):
        items = data["items"]
        if not all(isinstance(i, dict) for i in items):
            raise UsageError(f"{source}: items must be Node objects")
        return items
    raise UsageError(f"{source}: expected the output of 'kubectl get nodes -o json'")


# The agent DaemonSet's nodeSelector (manifests/daemonset.yaml): no agent runs elsewhere.
AGENT_OS = "linux"
AGENT_ARCH = "amd64"


def platform_reason(node: dict[str, Any]) -> str:
    """Why no agent can run on ``node`` (OS or architecture), or "" if one can."""
    meta = node.get("metadata")
    labels = (meta.get("labels") if isinstance(meta, dict) else None) or {}
    status = node.get("status")
    info = (status.get("nodeInfo") if isinstance(status, dict) else None) or {}
    labels = labels if isinstance(labels, dict) else {}
    info = info if isinstance(info, dict) else {}
    os_ = str(info.get("operatingSystem") or labels.get("kubernetes.io/os") or "")
    arch = str(info.get("architecture") or labels.get("kubernetes.io/arch") or "")
    if os_ and os_ != AGENT_OS:
        return f"os {os_}: the agent runs only on {AGENT_OS}"
    if arch and arch != AGENT_ARCH:
        return f"arch {arch}: the agent runs only on {AGENT_ARCH}"
    return ""


def build(nodes: Iterable[dict[str, Any]], mode: str = "auto") -> list[NodePlan]:
    kernel.validate_mode(mode)
    plans = []
    for i, node in enumerate(nodes):
        meta = node.get("metadata")
        meta = meta if isinstance(meta, dict) else {}
        name = str(meta.get("name") or f"node #{i + 1}")
        info = (node.get("status") or {}).get("nodeInfo") or {}
        release = info.get("kernelVersion")
        labels = meta.get("labels")
        labels = labels if isinstance(labels, dict) else {}
        current = str(labels.get(NODE_MODE_LABEL, ""))
        why = platform_reason(node)
        if why:
            # No agent can run there, so no --mode can make it capture.
            plans.append(NodePlan(name, str(release or "").strip() or "-", "unsupported",
                                  "unsupported", current, why))
            continue
        if not isinstance(release, str) or not release.strip():
            raise UsageError(f"node {name}: no status.nodeInfo.kernelVersion")
        try:
            rule = kernel.mode_for_release(release)
        except UsageError:
            raise UsageError(f"node {name}: unparseable kernel version {release[:60]!r}") from None
        plans.append(NodePlan(name, release.strip(), rule, rule if mode == "auto" else mode, current))
    return plans


def table(plans: list[NodePlan]) -> str:
    rows = [("NODE", "KERNEL", "RULE", "MODE", "LABEL NOW", "OPTED-IN PODS")]
    for p in plans:
        rule = f"unsupported ({p.reason})" if p.reason else p.rule_mode
        rows.append((p.node, p.kernel, rule, p.mode, p.current_label or "-",
                     "captured by eBPF" if p.captures else "not scheduled here"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]
    counts = {m: sum(1 for p in plans if p.mode == m) for m in kernel.MODES}
    lines.append(f"{len(plans)} node(s): " + ", ".join(f"{counts[m]} {m}" for m in kernel.MODES))
    return "\n".join(lines) + "\n"
