"""Prometheus metrics of the node agent (one registry per agent, so tests can run several)."""

from __future__ import annotations

from typing import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class AgentMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.mode = Gauge("istio_ebpf_node_mode", "Selected capture mode (1 for the active one)",
                          ["mode", "kernel_release"], registry=r)
        self.fallback = Gauge("istio_ebpf_fallback", "1 when the node runs a lesser mode than its kernel "
                              "version suggests (or none), labelled with the reason", ["reason"], registry=r)
        self.probe = Gauge("istio_ebpf_probe_result", "Feature probe results (1 = supported)",
                           ["feature"], registry=r)
        self.pods_managed = Gauge("istio_ebpf_pods_managed", "Opted-in pods whose entries are in the maps",
                                  registry=r)
        self.pods_pending = Gauge("istio_ebpf_pods_pending", "Opted-in pods waiting for a sandbox, IPs or a "
                                  "valid configuration", registry=r)
        self.pods_failed = Gauge("istio_ebpf_pods_failed", "Opted-in pods that cannot be programmed: their "
                                 "connections are refused until they are (see istio_ebpf_pod_capture_failures)",
                                 registry=r)
        self.map_entries = Gauge("istio_ebpf_map_entries", "Pod entries present in the datapath maps",
                                 registry=r)
        self.map_occupancy = Gauge("istio_ebpf_map_occupancy", "Entries per datapath map", ["map"], registry=r)
        self.datapath = Gauge("istio_ebpf_datapath_counter", "Datapath counters (captured connections, map "
                              "occupancy, ...) as reported by the loader", ["counter"], registry=r)
        self.captured = Gauge("istio_ebpf_captured_connections", "Connections redirected to Envoy since the "
                              "maps were created (sum of the datapath's capture counters)", registry=r)
        self.relists = Counter("istio_ebpf_pod_relists", "Full pod lists, by reason", ["reason"], registry=r)
        self.config_errors = Counter("istio_ebpf_pod_config_errors", "Pods with invalid traffic annotations",
                                     registry=r)
        self.stale_removed = Gauge("istio_ebpf_stale_entries_removed", "Map entries removed because no live "
                                   "pod owned them (adopted from a previous agent)", registry=r)
        self.reconcile_seconds = Histogram("istio_ebpf_resync_seconds", "Duration of a full resync",
                                           buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.capture_latency = Histogram(
            "istio_ebpf_pod_capture_seconds", "From a pod's sandbox start (its first process) to its capture "
            "entries written, for sandboxes started while this agent ran", registry=r,
            buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30))

    def set_counters(self, counters: Mapping[str, int]) -> None:
        captured = 0
        for name, value in counters.items():
            if isinstance(value, (int, float)):
                self.datapath.labels(counter=name).set(value)
                # out_redirect / in_redirect_local / dns_redirect: connections sent to Envoy
                if name.endswith("redirect") or name.startswith("in_redirect") or name == "inbound_assign":
                    captured += value
        self.captured.set(captured)
