"""The benchmark's pods: one client pod and one server pod per variant, all on one Node.

Every variant has its own pair of pods, so nothing is reconfigured between interleaved
rounds. The upstream server is an Envoy with ``direct_response`` listeners (one port per
payload size, running as the app user 1000), the same binary and settings everywhere.

* ``direct``: wrk -> server (no sidecar).
* ``iptables``: Envoy sidecars (1337) in both pods, Istio's iptables rules in both netns.
* ``ebpf`` / ``ebpf-sockmap``: the same sidecars, no iptables; the eBPF datapath attached to
  the variant's own cgroup group (``parent/<group>``), pods added after Envoy listens.
* ``explicit``: the same sidecars reached explicitly: the app connects to 127.0.0.1:<port> of
  its Envoy, a static route sends it to the server pod's Envoy, which forwards to
  127.0.0.1:<server port>. No capture anywhere: the capture-cost limit.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field
from typing import Any

from ..datapath.podconfig import PodConfig
from ..harness.envoy import Envoy, StaticRoute
from ..harness.node import Node, Pod

log = logging.getLogger(__name__)

VARIANTS = ("direct", "iptables", "ebpf", "ebpf-sockmap", "explicit")
SERVER_ADMIN_PORT = 15100
SERVER_BASE_PORT = 8000        # payload k is served on 8000 + k
EXPLICIT_CLIENT_BASE = 15200   # client Envoy explicit listener, 127.0.0.1:15200 + k
EXPLICIT_SERVER_BASE = 15300   # server Envoy explicit listener, <pod ip>:15300 + k


@dataclass
class VariantPods:
    variant: str
    client: Pod
    server: Pod
    sidecars: list[Envoy] = field(default_factory=list)
    server_envoy: Envoy | None = None
    datapath: Any = None
    error: str | None = None

    def url(self, payload_index: int) -> str:
        if self.variant == "explicit":
            return f"http://127.0.0.1:{EXPLICIT_CLIENT_BASE + payload_index}/"
        return f"http://{self.server.ipv4}:{SERVER_BASE_PORT + payload_index}/"

    def cpu_usec(self) -> int:
        return self.client.cpu_usage_usec() + self.server.cpu_usage_usec()

    def proxied_requests(self) -> int:
        """Requests the client-side sidecar handled (0 for direct): proof the traffic was captured."""
        if not self.sidecars:
            return 0
        stats = self.sidecars[0].stats()
        return sum(v for k, v in stats.items()
                   if k.startswith("http.") and k.endswith(".downstream_rq_total") and not k.startswith("http.admin"))


def _podconfig(pod: Pod) -> PodConfig:
    return PodConfig(pod_ips=(ipaddress.ip_address(pod.ipv4), ipaddress.ip_address(pod.ipv6)))


def build(node: Node, variants: tuple[str, ...], payloads: tuple[int, ...], *, mode: str,
          pin_prefix: str) -> dict[str, VariantPods]:
    """Create pods, Envoys and capture for each variant (ebpf failures are recorded, not raised)."""
    server_ports = {SERVER_BASE_PORT + k: size for k, size in enumerate(payloads)}
    out: dict[str, VariantPods] = {}
    for i, variant in enumerate(variants):
        group = variant.replace("-", "")
        vp = VariantPods(variant, node.add_pod(f"c{i}", group=group), node.add_pod(f"s{i}", group=group))
        vp.server_envoy = vp.server.start_envoy(name="server", sidecar=False, direct_response=server_ports,
                                                admin_port=SERVER_ADMIN_PORT, uid=1000, gid=1000,
                                                access_log=False)
        if variant != "direct":
            routes_c, routes_s = [], []
            if variant == "explicit":
                for k in range(len(payloads)):
                    routes_c.append(StaticRoute(f"explicit_{k}", "127.0.0.1", EXPLICIT_CLIENT_BASE + k,
                                                vp.server.ipv4, EXPLICIT_SERVER_BASE + k))
                    routes_s.append(StaticRoute(f"explicit_in_{k}", "0.0.0.0", EXPLICIT_SERVER_BASE + k,
                                                "127.0.0.1", SERVER_BASE_PORT + k))
            vp.sidecars = [vp.client.start_envoy(access_log=False, static_routes=routes_c),
                           vp.server.start_envoy(access_log=False, static_routes=routes_s)]
        if variant == "iptables":
            for pod in (vp.client, vp.server):
                pod.apply_istio_iptables(_podconfig(pod))
        elif variant in ("ebpf", "ebpf-sockmap"):
            try:
                from ..datapath.loader import Datapath
                dp = Datapath(mode=mode, sockmap=(variant == "ebpf-sockmap"),
                              pin_root=f"{pin_prefix}-{group}")
                vp.datapath = dp
                dp.load()
                dp.attach_cgroup(str(node.group_cgroup(group)))
                for pod in (vp.client, vp.server):
                    dp.add_pod(pod.netns_path, _podconfig(pod), str(pod.cgroup_path))
            except Exception as exc:  # noqa: BLE001 - any failure makes the variant unavailable
                vp.error = f"datapath unavailable: {type(exc).__name__}: {exc}"
                log.warning("%s: %s", variant, vp.error)
        out[variant] = vp
    return out


def teardown(variants: dict[str, VariantPods]) -> None:
    for vp in variants.values():
        if vp.datapath is not None:
            try:
                vp.datapath.close(cleanup=True)
            except Exception as exc:  # noqa: BLE001 - keep tearing down the rest
                log.warning("closing datapath of %s: %s", vp.variant, exc)
