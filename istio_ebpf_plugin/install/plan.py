"""Rollout plan: which capture mode each node gets, from its kernel version.

The rule is :func:`istio_ebpf_plugin.kernel.mode_for_release`, the same one the
node agent starts from (the agent then confirms it with feature probes and
publishes the result as the node label ``istio-ebpf.io/mode``).
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from typing import Any, Iterable

from .. import HEARTBEAT_ANNOTATION, MODE_REASON_ANNOTATION, NODE_MODE_LABEL, kernel
from ..errors import UsageError


@dataclass(frozen=True)
class NodePlan:
    node: str
    kernel: str
    rule_mode: str      # what the kernel version alone selects
    mode: str           # what will be used (after --mode)
    current_label: str  # the node's istio-ebpf.io/mode label now ("" if none)
    reason: str = ""    # why the node is unsupported whatever its kernel ("" if it is not)
    heartbeat: str = ""     # the agent's istio-ebpf.io/heartbeat annotation ("" if none)
    label_reason: str = ""  # the agent's istio-ebpf.io/mode-reason annotation ("" if none)

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


AGENT_REASON_ANNOTATION = MODE_REASON_ANNOTATION
#: A heartbeat older than this many of the agent's renewal periods is stale.
HEARTBEAT_PERIODS = 3


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
        annotations = meta.get("annotations")
        annotations = annotations if isinstance(annotations, dict) else {}
        agent = {"heartbeat": str(annotations.get(HEARTBEAT_ANNOTATION) or ""),
                 "label_reason": str(annotations.get(AGENT_REASON_ANNOTATION) or "")}
        why = platform_reason(node)
        if why:
            # No agent can run there, so no --mode can make it capture.
            plans.append(NodePlan(name, str(release or "").strip() or "-", "unsupported",
                                  "unsupported", current, why, **agent))
            continue
        if not isinstance(release, str) or not release.strip():
            raise UsageError(f"node {name}: no status.nodeInfo.kernelVersion")
        try:
            rule = kernel.mode_for_release(release)
        except UsageError:
            raise UsageError(f"node {name}: unparseable kernel version {release[:60]!r}") from None
        plans.append(NodePlan(name, release.strip(), rule, rule if mode == "auto" else mode, current, **agent))
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


def _pod_ready(pod: dict[str, Any]) -> tuple[bool, str]:
    """The pod's Ready condition, and why not when it is not."""
    raw = pod.get("status")
    status: dict[str, Any] = raw if isinstance(raw, dict) else {}
    for cond in status.get("conditions") or []:
        if isinstance(cond, dict) and cond.get("type") == "Ready":
            if cond.get("status") == "True":
                return True, ""
            return False, str(cond.get("reason") or cond.get("message") or "Ready=" + str(cond.get("status")))
    return False, f"phase {status.get('phase') or 'unknown'}, no Ready condition"


def heartbeat_age(heartbeat: str, now: float) -> tuple[float | None, str, str]:
    """(seconds since the agent's last heartbeat, the mode it stated, why it is unusable) for the annotation."""
    try:
        data = json.loads(heartbeat)
        at = datetime.datetime.strptime(str(data["time"]), "%Y-%m-%dT%H:%M:%SZ").replace(
            tzinfo=datetime.timezone.utc)
        period = float(data.get("period") or 60.0)
        return now - at.timestamp(), str(data.get("mode") or ""), f"{HEARTBEAT_PERIODS * period:g}"
    except (ValueError, KeyError, TypeError, AttributeError):
        return None, "", f"unreadable heartbeat {heartbeat[:80]!r}"


@dataclass(frozen=True)
class NodeState:
    node: str
    state: str          # captured | no agent | agent not ready | unsupported | not labelled
    detail: str
    problem: bool       # opted-in pods are affected, or the node is labelled for eBPF and not captured


def node_state(p: NodePlan, agent_pods: list[dict[str, Any]], opted_in_here: int, now: float) -> NodeState:
    """What `istio-ebpf status` says of one node: captured only while its agent pod is Ready and its
    heartbeat (renewed with the label by the agent) is fresh and states the mode the label has."""
    labelled = p.current_label in ("cookie", "podip")
    pods_note = f"; {opted_in_here} opted-in pod(s) here run without capture" if opted_in_here else ""
    if p.current_label == "unsupported" or p.reason or p.rule_mode == "unsupported" and not labelled:
        why = p.label_reason or p.reason or f"kernel {p.kernel}"
        return NodeState(p.node, "unsupported", f"{why}: opted-in pods are not scheduled here{pods_note}",
                         labelled or bool(opted_in_here))
    ready = [pod for pod in agent_pods if _pod_ready(pod)[0]]
    names = ", ".join(f"{(pod.get('metadata') or {}).get('namespace')}/{(pod.get('metadata') or {}).get('name')}"
                      for pod in (ready or agent_pods))
    label = f"labelled {p.current_label}" if p.current_label else "not labelled"
    if not agent_pods:
        return NodeState(p.node, "no agent", f"{label}, no agent pod on this node: nothing captures here{pods_note}",
                         labelled or bool(opted_in_here))
    if not ready:
        why = "; ".join(_pod_ready(pod)[1] for pod in agent_pods)
        return NodeState(p.node, "agent not ready", f"{label}, agent pod {names}: {why}{pods_note}",
                         labelled or bool(opted_in_here))
    age, mode, limit = heartbeat_age(p.heartbeat, now) if p.heartbeat else (None, "", "")
    stale = ""
    if not p.heartbeat:
        stale = "no heartbeat from the agent yet"
    elif age is None:
        stale = limit
    elif age > float(limit):
        stale = f"heartbeat {age:.0f} s old (stale after {limit} s): the agent stopped renewing its label"
    elif mode != p.current_label:
        stale = f"{label} but the agent decided {mode or 'nothing'} (it corrects the label within its period)"
    if stale:
        return NodeState(p.node, "agent not ready", f"agent pod {names} Ready, {stale}{pods_note}",
                         labelled or bool(opted_in_here))
    if not labelled:
        return NodeState(p.node, "not labelled", f"agent pod {names} Ready, mode {mode}: opted-in pods are not "
                         f"scheduled here{pods_note}", bool(opted_in_here))
    return NodeState(p.node, "captured", f"{p.current_label}, agent pod {names} Ready, heartbeat {age:.0f} s old: "
                     "opted-in pods here are captured by eBPF", False)
