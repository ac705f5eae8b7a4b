"""``istio-ebpf uninstall`` drains: the agent stays until no pod depends on its capture.

A pod injected with the ``ebpf`` template has no istio-init: its iptables rules were never
written, so the agent's programs are all that send its traffic through Envoy. Removing the agent
while such a pod runs would let its app talk past Envoy (a mesh bypass). So, after the injection
is reverted (new pods get stock Istio with istio-init), ``uninstall``:

1. lists the pods that still depend on capture (:func:`captured_pods`: bound to a node, not
   finished, opted in, and injected with the ``ebpf`` template, recognised by the node affinity
   on :data:`~istio_ebpf_plugin.NODE_MODE_LABEL` that only that template adds; a pod restarted
   after the revert carries the opt-in annotation but stock Istio's istio-init, and does not count);
2. marks the agent pods with :data:`~istio_ebpf_plugin.DRAINING_ANNOTATION` (each agent sees its
   own pod's annotation through the pod watch it already runs: ``istio-ebpf pods`` and ``status``
   then say ``draining``);
3. waits up to ``--timeout`` for those pods to go, then either proceeds with the removal or exits
   non-zero naming each pod, the agent left running (fail closed). ``--force`` removes the agent
   anyway and names the pods that now run uncaptured.
"""

from __future__ import annotations

import datetime
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from .. import DRAINING_ANNOTATION, NODE_MODE_LABEL, kube_api
from ..agent.pod_spec import is_opted_in
from ..errors import PermanentError, TemporaryError


@dataclass(frozen=True, order=True)
class CapturedPod:
    namespace: str
    name: str
    node: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name} (node {self.node})"


def _get(obj: Any, *keys: str) -> Any:
    for key in keys:
        obj = obj.get(key) if isinstance(obj, Mapping) else None
    return obj


def uses_ebpf_template(pod: Mapping[str, Any]) -> bool:
    """The pod was injected with the ``ebpf`` template: its required node affinity names our label."""
    terms = _get(pod, "spec", "affinity", "nodeAffinity", "requiredDuringSchedulingIgnoredDuringExecution",
                 "nodeSelectorTerms")
    return any(isinstance(expr, Mapping) and expr.get("key") == NODE_MODE_LABEL
               for term in (terms if isinstance(terms, list) else [])
               for expr in (_get(term, "matchExpressions") or []))


def captured_pods(pods: Iterable[Mapping[str, Any]]) -> list[CapturedPod]:
    """The pods whose traffic goes through Envoy only because an agent captures it."""
    out = []
    for pod in pods:
        node = _get(pod, "spec", "nodeName")
        if not node or _get(pod, "status", "phase") in ("Succeeded", "Failed"):
            continue
        if is_opted_in(pod) and uses_ebpf_template(pod):
            out.append(CapturedPod(str(_get(pod, "metadata", "namespace")), str(_get(pod, "metadata", "name")),
                                   str(node)))
    return sorted(out)


def list_captured() -> list[CapturedPod]:
    return captured_pods(kube_api.list_pods("", ""))


def agent_pods(namespace: str, selector: str) -> list[dict[str, Any]]:
    return kube_api.list_pods(namespace, selector) if namespace and selector else []


def draining_since(pods: Iterable[Mapping[str, Any]]) -> str | None:
    """When the drain began, from the agent pods' annotation; None when no drain runs."""
    marks = sorted(str(v) for p in pods if (v := (_get(p, "metadata", "annotations") or {}).get(DRAINING_ANNOTATION)))
    return marks[0] if marks else None


def mark_agents(namespace: str, selector: str, value: str | None) -> int:
    """Set (``value``) or remove (``None``) the draining annotation on every agent pod; how many changed."""
    changed = 0
    for pod in agent_pods(namespace, selector):
        has = DRAINING_ANNOTATION in (_get(pod, "metadata", "annotations") or {})
        if has == (value is not None):
            continue
        try:
            kube_api.annotate_pod(namespace, str(_get(pod, "metadata", "name")), {DRAINING_ANNOTATION: value})
            changed += 1
        except PermanentError:
            continue     # the pod went meanwhile (404): its replacement is marked on the next turn
    return changed


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def warn_uncaptured(pods: Iterable[CapturedPod]) -> None:
    """After ``--force``: one line per pod whose capture went with the agent."""
    for p in pods:
        _err(f"warning: pod {p} now runs without capture: its app's traffic bypasses Envoy "
             "until the pod is restarted")


def drain(namespace: str, selector: str, timeout: float, force: bool = False, interval: float = 2.0,
          clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
          ) -> list[CapturedPod]:
    """Wait until no pod depends on the agents' capture. Returns the pods left uncaptured (``force``
    only); raises :class:`TemporaryError` naming the pods when ``timeout`` runs out first."""
    pods = list_captured()
    if not pods:
        return []
    if force:
        return pods
    mark_agents(namespace, selector, _now())
    _err(f"draining: {len(pods)} pod(s) injected with the ebpf template still depend on eBPF capture; "
         "the agents keep capturing until they are restarted (they come back with stock Istio's istio-init):")
    for p in pods:
        _err(f"  restart {p}")
    deadline = clock() + timeout
    while pods and clock() < deadline:
        sleep(max(0.0, min(interval, deadline - clock())))
        mark_agents(namespace, selector, _now())    # an agent pod replaced meanwhile carries no mark
        left = list_captured()
        for p in sorted(set(pods) - set(left)):
            _err(f"draining: {p} gone")
        pods = left
    if not pods:
        _err("drained: no pod depends on eBPF capture any more")
        return []
    for p in pods:
        _err(f"pod {p}: still captured by eBPF; restart it")
    raise TemporaryError(
        f"{len(pods)} pod(s) still depend on eBPF capture after {timeout:g}s: the agent stays and keeps "
        "capturing them (draining); restart them and run 'istio-ebpf uninstall' again, or "
        "'istio-ebpf uninstall --force' to remove the agent anyway")
