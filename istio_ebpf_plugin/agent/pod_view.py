"""The node's opted-in pods as the agent sees them: ``/pods``, ``/explain``'s targets and the per-pod metrics.

The agent loop builds a :class:`PodView` (a plain list, replaced whole) and the HTTP thread
reads whatever view is current: the reconciler's dictionaries are never iterated from two
threads. The per-pod Prometheus series come from the same view through a custom collector,
so a pod's series exist exactly while the pod is in the view: when the pod is removed its
series are gone from the next scrape, and cardinality is bounded by the node's pods.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Hashable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .reconcile import CAPTURED, DRAINING, Reconciler


@dataclass(frozen=True)
class PodTarget:
    """What ``/explain`` needs of one pod (not shown in ``/pods``)."""

    state: str
    error: str
    handle: int | None          # the datapath's key while captured
    netns_path: str
    cgroup_path: str
    netns_inode: int | None


@dataclass(frozen=True)
class PodView:
    node: str
    mode: str
    draining: bool
    pods: tuple[dict[str, Any], ...] = ()
    failures: Mapping[str, int] = field(default_factory=dict)    # category -> failed attempts
    at: float = field(default_factory=time.time)
    targets: Mapping[str, PodTarget] = field(default_factory=dict)   # "namespace/name" -> target

    def as_json(self) -> dict[str, Any]:
        return {"node": self.node, "mode": self.mode, "draining": self.draining, "at": round(self.at, 3),
                "pods": list(self.pods)}


def build(node: str, mode: str, draining: bool, reconciler: Reconciler,
          counters: Mapping[Hashable, Mapping[str, int]], listening: Collection[int] | None = None) -> PodView:
    """One entry per opted-in pod the reconciler knows, sorted by namespace and name.

    ``listening``: pod-IP mode's handles whose Envoy 15006 socket is registered (until then the pod's
    inbound connections are refused, fail closed); None where sockops registers it (cookie mode)."""
    pods = []
    targets = {}
    for st in sorted(reconciler.states.values(), key=lambda s: (s.namespace, s.name)):
        state = DRAINING if draining and st.state == CAPTURED else st.state
        targets[f"{st.namespace}/{st.name}"] = PodTarget(state, st.error, st.handle, st.netns_path, st.cgroup_path,
                                                          st.netns_inode)
        own = counters.get(st.handle, {}) if st.handle is not None else {}
        pods.append({
            "namespace": st.namespace, "name": st.name, "uid": st.uid, "mode": mode, "state": state,
            "since": round(st.since, 3), "error": st.error or None,
            "capture_seconds": None if st.capture_seconds is None else round(st.capture_seconds, 3),
            "inbound_listener": None if listening is None else (st.handle is not None and st.handle in listening),
            "counters": {k: int(v) for k, v in sorted(own.items())},
        })
    return PodView(node, mode, draining, tuple(pods), dict(reconciler.failures), targets=targets)


class PodCollector(Collector):
    """Per-pod series (``namespace``/``pod`` labels) and failure counts from the current view."""

    def __init__(self, current: Callable[[], PodView | None]) -> None:
        self.current = current

    def describe(self) -> list:      # no series at registration time: collect() runs per scrape
        return []

    def collect(self) -> Iterator[Any]:
        view = self.current()
        state = GaugeMetricFamily("istio_ebpf_pod_state", "1 for each opted-in pod of the node, labelled with "
                                  "its capture state (pending, captured, failed, ignored, draining)",
                                  labels=["namespace", "pod", "state"])
        datapath = CounterMetricFamily("istio_ebpf_pod_datapath", "Per-pod datapath counters (by the "
                                       "datapath's counter name)", labels=["namespace", "pod", "counter"])
        failures = CounterMetricFamily("istio_ebpf_pod_capture_failures", "Attempts to program a pod that "
                                       "failed, by reason (maps_full, invalid_config, kernel)", labels=["reason"])
        for p in view.pods if view else ():
            state.add_metric([p["namespace"], p["name"], p["state"]], 1)
            for name, value in p["counters"].items():
                datapath.add_metric([p["namespace"], p["name"], name], value)
        for reason, n in (view.failures if view else {}).items():
            failures.add_metric([reason], n)
        yield state
        yield datapath
        yield failures
