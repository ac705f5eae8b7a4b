"""Pod start-up on a real node: creation to Ready, opted-in (eBPF) pods against stock Istio pods.

Runs against a cluster that the caller brought up (the node e2e's: kube-apiserver, a kubelet +
containerd node, the agent's DaemonSet pod), with one pod spec per variant:

* ``ebpf``: the opted-in pod as the ``ebpf`` injection template makes it: no istio-init, Istio's
  istio-validation init container, which passes only once the agent has written the pod's entries;
* ``iptables``: the same pod as stock Istio injects it, its istio-init loading Istio's rules with
  ``iptables-restore`` in the pod's network namespace (NET_ADMIN, NET_RAW).

Paired rounds: each round creates one pod of each variant, one after the other (the order rotates
from round to round), so both see the same load; a round's two pods differ only in the variant.
A pod's time is taken on this side of the API: from just before the create request to the watch
event that first shows its ``Ready`` condition true (event driven, no polling; the API's own
timestamps have whole seconds only). Each pod is deleted, and gone, before the next is created.
One warm-up round is not counted. The agent's capture time per eBPF pod (sandbox start to entries
written) is the change of its ``istio_ebpf_pod_capture_seconds`` histogram across that pod.

JSON (``meta.pod_ready_ms``)::

    {"rounds", "warmup_rounds", "definition", "loadavg": [start, end],
     "variants": {"ebpf"|"iptables": {"n", "p50", "p50_ci", "p95", "p95_ci", "min", "max",
                                      "initialized_p50"}},
     "ebpf_minus_iptables_ms": {"median", "ci", "spread"}, "ebpf_over_iptables": {"median", "ci", "spread"},
     "agent_capture_ms": {"n", "p50", "p50_ci", "p95", "p95_ci", "min", "max"},
     "per_round": [{"round", "order", "<variant>": {"ready_ms", "initialized_ms", "capture_ms", "loadavg1"}}]}
"""

from __future__ import annotations

import datetime
import json
import os
import ssl
import statistics
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, Iterator

from ..errors import KernelError
from ..timeouts import scaled
from . import stats

VARIANTS = ("ebpf", "iptables")
READY_TIMEOUT_S = 300.0
CAPTURE_METRIC = "istio_ebpf_pod_capture_seconds"

Spec = Callable[[str], dict]                   # pod name -> the Pod object to create
Progress = Callable[[str], None]
OnReady = Callable[[str, dict], dict]          # (variant, ready pod) -> extra fields for the round


class Api:
    """The few calls this needs, on the control plane's admin credentials (lab: harness.control_plane)."""

    def __init__(self, cp: Any) -> None:
        self.cp = cp
        self._ssl = ssl.create_default_context(cafile=str(cp.ca_file))

    def call(self, method: str, path: str, body: Any = None, ok: tuple[int, ...] = (200, 201, 202)) -> dict:
        status, out = self.cp.request(method, path, body)
        if status not in ok:
            raise KernelError(f"{method} {path}: HTTP {status} {out.get('message', out)}")
        return out

    def watch(self, ns: str, name: str, resource_version: str, timeout: float) -> Iterator[dict]:
        """Watch events of one pod from ``resource_version`` on (none is missed in between)."""
        query = urllib.parse.urlencode({"watch": "1", "fieldSelector": f"metadata.name={name}",
                                        "resourceVersion": resource_version, "timeoutSeconds": str(int(timeout))})
        req = urllib.request.Request(f"{self.cp.url}/api/v1/namespaces/{ns}/pods?{query}",
                                     headers={"Authorization": f"Bearer {self.cp.admin_token}"})
        with urllib.request.urlopen(req, timeout=timeout + 30, context=self._ssl) as resp:
            for line in resp:
                if line.strip():
                    yield json.loads(line)


def _condition(pod: dict, kind: str) -> bool:
    return any(c.get("type") == kind and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def _capture_histogram(metrics_url: str | None) -> tuple[float, int] | None:
    """(sum, count) of the agent's capture-time histogram; None when it does not answer."""
    if not metrics_url:
        return None
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(metrics_url, timeout=5) as r:
            text = r.read().decode()
    except (OSError, urllib.error.URLError):
        return None
    vals = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in (f"{CAPTURE_METRIC}_sum", f"{CAPTURE_METRIC}_count"):
            vals[name] = float(value)
    if len(vals) < 2:
        return None
    return vals[f"{CAPTURE_METRIC}_sum"], int(vals[f"{CAPTURE_METRIC}_count"])


def start_one(api: Api, ns: str, pod: dict, metrics_url: str | None) -> dict[str, Any]:
    """Create ``pod``, follow it to Ready: times in ms from the create request; the pod as last seen."""
    name = pod["metadata"]["name"]
    before = _capture_histogram(metrics_url)
    load1 = os.getloadavg()[0]
    t0 = time.monotonic()
    created = api.call("POST", f"/api/v1/namespaces/{ns}/pods", pod)
    out: dict[str, Any] = {"initialized_ms": None, "ready_ms": None, "loadavg1": load1}
    deadline = t0 + scaled(READY_TIMEOUT_S)
    rv = created["metadata"]["resourceVersion"]
    last = created
    while out["ready_ms"] is None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise KernelError(f"pod {ns}/{name} not Ready after {READY_TIMEOUT_S:.0f} s: "
                              f"{json.dumps((last.get('status') or {}))[:600]}")
        for event in api.watch(ns, name, rv, min(left, 120)):
            obj = event.get("object") or {}
            if event.get("type") == "ERROR":
                raise KernelError(f"watching pod {name}: {obj.get('message')}")
            now = time.monotonic()
            rv = (obj.get("metadata") or {}).get("resourceVersion", rv)
            last = obj
            if out["initialized_ms"] is None and _condition(obj, "Initialized"):
                out["initialized_ms"] = round((now - t0) * 1000, 1)
            if _condition(obj, "Ready"):
                out["ready_ms"] = round((now - t0) * 1000, 1)
                break
    after = _capture_histogram(metrics_url)
    if before is not None and after is not None and after[1] - before[1] == 1:
        out["capture_ms"] = round((after[0] - before[0]) * 1000, 1)
    out["pod"] = last
    return out


def delete_and_wait(api: Api, ns: str, name: str) -> None:
    """Delete the pod and wait until kubelet has stopped it (the API object goes last): the next
    measurement does not share the node with its teardown. (Grace 0 would remove the object at once.)"""
    out = api.call("DELETE", f"/api/v1/namespaces/{ns}/pods/{name}", {"gracePeriodSeconds": 1}, ok=(200, 202, 404))
    rv = (out.get("metadata") or {}).get("resourceVersion", "")
    deadline = time.monotonic() + scaled(READY_TIMEOUT_S)
    while time.monotonic() < deadline:
        status, _ = api.cp.request("GET", f"/api/v1/namespaces/{ns}/pods/{name}")
        if status == 404:
            return
        for event in api.watch(ns, name, rv, 30):
            if event.get("type") == "DELETED":
                return
    raise KernelError(f"pod {ns}/{name} not gone after {READY_TIMEOUT_S:.0f} s")


def measure(api: Api, ns: str, specs: dict[str, Spec], *, rounds: int, metrics_url: str | None = None,
            warmup_rounds: int = 1, on_ready: OnReady | None = None,
            progress: Progress = lambda s: None) -> dict[str, Any]:
    """Paired rounds of one pod per variant; the ``meta.pod_ready_ms`` document."""
    if set(specs) != set(VARIANTS):
        raise KernelError(f"pod start-up needs a spec for each of {', '.join(VARIANTS)}")
    started = time.monotonic()
    doc: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "rounds": rounds, "warmup_rounds": warmup_rounds, "loadavg": [os.getloadavg()[0]],
        "definition": "ms from the create request to the first watch event with the pod Ready; one pod of each "
                      "variant per round, order rotated; each pod deleted and gone before the next",
        "per_round": []}
    for r in range(-warmup_rounds, rounds):
        order = list(VARIANTS[r % 2:] + VARIANTS[:r % 2])
        row: dict[str, Any] = {"round": r, "order": order}
        for variant in order:
            name = f"{variant}-{'w' if r < 0 else ''}{abs(r)}-{os.getpid() % 1000}"
            result = start_one(api, ns, specs[variant](name), metrics_url)
            pod = result.pop("pod")
            if on_ready is not None:
                result.update(on_ready(variant, pod))
            delete_and_wait(api, ns, name)
            row[variant] = result
            progress(f"pod start-up {'warm-up' if r < 0 else f'round {r + 1}/{rounds}'} {variant:8s} "
                     f"ready {result['ready_ms']:7.0f} ms (initialized {result['initialized_ms'] or 0:7.0f} ms"
                     f"{', capture %.0f ms' % result['capture_ms'] if result.get('capture_ms') is not None else ''})"
                     f"  load {result['loadavg1']:.1f}")
        if r >= 0:
            doc["per_round"].append(row)
    doc.update(summarize(doc["per_round"]))
    doc["loadavg"].append(os.getloadavg()[0])
    doc["elapsed_s"] = round(time.monotonic() - started, 1)
    return doc


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant p50/p95 with intervals, the paired difference and ratio, the agent's capture time."""
    out: dict[str, Any] = {"variants": {}}
    for v in VARIANTS:
        ready = [row[v]["ready_ms"] for row in rows]
        inits = [row[v]["initialized_ms"] for row in rows if row[v]["initialized_ms"] is not None]
        out["variants"][v] = {**stats.distribution(ready),
                              "initialized_p50": round(statistics.median(inits), 1) if inits else None}
    out["ebpf_minus_iptables_ms"] = _summary([row["ebpf"]["ready_ms"] - row["iptables"]["ready_ms"] for row in rows], 1)
    out["ebpf_over_iptables"] = _summary([row["ebpf"]["ready_ms"] / row["iptables"]["ready_ms"] for row in rows], 3)
    out["agent_capture_ms"] = stats.distribution(
        [row["ebpf"]["capture_ms"] for row in rows if row["ebpf"].get("capture_ms") is not None])
    return out


def _summary(values: list[float], digits: int) -> dict[str, Any]:
    s = stats.summarize(values)
    if s is None:
        return {"median": None, "ci": None, "spread": None}
    return {"median": round(s.median, digits), "ci": [round(x, digits) for x in s.ci] if s.ci else None,
            "spread": [round(s.lo, digits), round(s.hi, digits)]}
