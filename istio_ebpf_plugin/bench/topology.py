"""The benchmark's pods: one client pod and one server pod per (path, variant), all on one Node.

Every (path, variant) has its own pair of pods, so nothing is reconfigured between interleaved
rounds. The upstream server is an Envoy with ``direct_response`` listeners (one port per
payload size, running as the app user 1000), the same binary and settings everywhere.

Paths (what sits on 15001/15006 in both pods):

* ``http``: Envoy sidecars with HTTP connection managers (Istio's default for HTTP ports);
* ``l4``: Envoy sidecars with ``tcp_proxy`` on the same listeners (Istio's TCP ports);
* ``capture-only``: ``tools/capture_forwarder.c``, a minimal epoll forwarder that asks
  ``SO_ORIGINAL_DST`` like Envoy: the capture itself is a large share of the path.

Variants (how traffic reaches those listeners):

* ``direct`` (http path only): wrk -> server (no sidecar).
* ``iptables``: Istio's iptables rules in both netns (REDIRECT, NAT + conntrack).
* ``ebpf`` / ``ebpf-sockmap``: no iptables; one eBPF datapath per variant attached to the
  variant's cgroup group (``parent/<group>``, shared by every path), pods added after the
  sidecars listen.
* ``explicit``: the same sidecars reached explicitly: the app connects to 127.0.0.1:<port> of
  its sidecar, a static route sends it to the server pod's sidecar, which forwards to
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
from .forwarder import Forwarder

log = logging.getLogger(__name__)

VARIANTS = ("direct", "iptables", "ebpf", "ebpf-sockmap", "explicit")
#: Run only when asked (--variants): ebpf-nocount is ebpf without per-pod counting (the counters' cost).
OPTIONAL_VARIANTS = ("ebpf-nocount",)
KNOWN_VARIANTS = VARIANTS + OPTIONAL_VARIANTS
PATHS = ("http", "l4", "capture-only")
EBPF_VARIANTS = ("ebpf", "ebpf-sockmap", "ebpf-nocount")
SERVER_ADMIN_PORT = 15100
SERVER_BASE_PORT = 8000        # payload k is served on 8000 + k
EXPLICIT_CLIENT_BASE = 15200   # client sidecar explicit listener, 127.0.0.1:15200 + k
EXPLICIT_SERVER_BASE = 15300   # server sidecar explicit listener, <pod ip>:15300 + k


def variants_for(path: str, variants: tuple[str, ...]) -> tuple[str, ...]:
    """``direct`` has no sidecar, so it belongs to one path only (http)."""
    return tuple(v for v in variants if v != "direct" or path == "http")


@dataclass
class VariantPods:
    variant: str
    client: Pod
    server: Pod
    path: str = "http"
    sidecars: list[Envoy] = field(default_factory=list)
    forwarders: list[Forwarder] = field(default_factory=list)
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
        """Requests (http) or connections (l4, capture-only) the client-side sidecar handled: proof of capture."""
        if self.forwarders:
            return self.forwarders[0].stop()
        if not self.sidecars:
            return 0
        stats = self.sidecars[0].stats()
        if self.path == "l4":
            return sum(v for k, v in stats.items()
                       if k.startswith("tcp.") and k.endswith(".downstream_cx_total"))
        return sum(v for k, v in stats.items()
                   if k.startswith("http.") and k.endswith(".downstream_rq_total") and not k.startswith("http.admin"))


def _podconfig(pod: Pod) -> PodConfig:
    return PodConfig(pod_ips=(ipaddress.ip_address(pod.ipv4), ipaddress.ip_address(pod.ipv6)))


def _start_sidecars(vp: VariantPods, n_payloads: int) -> None:
    """Envoys (http / l4) or forwarders (capture-only) in both pods; not yet waited for."""
    explicit = vp.variant == "explicit"
    if vp.path == "capture-only":
        static_c = tuple((EXPLICIT_CLIENT_BASE + k, vp.server.ipv4, EXPLICIT_SERVER_BASE + k)
                         for k in range(n_payloads)) if explicit else ()
        static_s = tuple((EXPLICIT_SERVER_BASE + k, "127.0.0.1", SERVER_BASE_PORT + k)
                         for k in range(n_payloads)) if explicit else ()
        vp.forwarders = [Forwarder(vp.client, capture=not explicit, static=static_c),
                         Forwarder(vp.server, capture=not explicit, static=static_s)]
        return
    routes_c, routes_s = [], []
    if explicit:
        for k in range(n_payloads):
            routes_c.append(StaticRoute(f"explicit_{k}", "127.0.0.1", EXPLICIT_CLIENT_BASE + k,
                                        vp.server.ipv4, EXPLICIT_SERVER_BASE + k))
            routes_s.append(StaticRoute(f"explicit_in_{k}", "0.0.0.0", EXPLICIT_SERVER_BASE + k,
                                        "127.0.0.1", SERVER_BASE_PORT + k))
    protocol = "tcp" if vp.path == "l4" else "http"
    vp.sidecars = [vp.client.start_envoy(access_log=False, static_routes=routes_c, protocol=protocol, wait=False),
                   vp.server.start_envoy(access_log=False, static_routes=routes_s, protocol=protocol, wait=False)]


def build(node: Node, variants: tuple[str, ...], payloads: tuple[int, ...], *, mode: str,
          pin_prefix: str, paths: tuple[str, ...] = ("http",)) -> dict[tuple[str, str], VariantPods]:
    """Create pods, sidecars and capture for each (path, variant); ebpf failures are recorded, not raised."""
    server_ports = {SERVER_BASE_PORT + k: size for k, size in enumerate(payloads)}
    out: dict[tuple[str, str], VariantPods] = {}
    for pi, path in enumerate(paths):
        for variant in variants_for(path, variants):
            vi = KNOWN_VARIANTS.index(variant)
            group = variant.replace("-", "")
            tag = f"{'hlc'[pi]}{vi}"
            vp = VariantPods(variant, node.add_pod(f"{tag}c", group=group), node.add_pod(f"{tag}s", group=group),
                             path=path)
            vp.server_envoy = vp.server.start_envoy(name="server", sidecar=False, direct_response=server_ports,
                                                    admin_port=SERVER_ADMIN_PORT, uid=1000, gid=1000,
                                                    access_log=False, wait=False)
            if variant != "direct":
                _start_sidecars(vp, len(payloads))
            out[(path, variant)] = vp
    for vp in out.values():   # started all at once, waited for together: minutes saved under load
        for env in [vp.server_envoy, *vp.sidecars]:
            if env is not None:
                env.wait_live(timeout=120)
        for fwd in vp.forwarders:
            fwd.wait_ready()
        if vp.variant == "iptables":
            for pod in (vp.client, vp.server):
                pod.apply_istio_iptables(_podconfig(pod))
    datapaths: dict[str, Any] = {}
    for variant in EBPF_VARIANTS:
        members = [vp for (_, v), vp in out.items() if v == variant]
        if not members:
            continue
        group = variant.replace("-", "")
        error = None
        dp = None
        try:
            from ..datapath.loader import Datapath
            dp = Datapath(mode=mode, sockmap=(variant == "ebpf-sockmap"), pin_root=f"{pin_prefix}-{group}",
                          pod_counters=(variant != "ebpf-nocount"))
            dp.load()
            dp.attach_cgroup(str(node.group_cgroup(group)))
            for vp in members:
                for pod in (vp.client, vp.server):
                    dp.add_pod(pod.netns_path, _podconfig(pod), str(pod.cgroup_path))
        except Exception as exc:  # noqa: BLE001 - any failure makes the variant unavailable
            error = f"datapath unavailable: {type(exc).__name__}: {exc}"
            log.warning("%s: %s", variant, error)
        datapaths[variant] = dp
        for i, vp in enumerate(members):
            vp.datapath = dp if i == 0 else None      # closed once, by the first member
            vp.error = error
    return out


def datapath_of(variants: dict[tuple[str, str], VariantPods], variant: str) -> Any:
    return next((vp.datapath for (_, v), vp in variants.items() if v == variant and vp.datapath is not None), None)


def teardown(variants: dict[tuple[str, str], VariantPods]) -> None:
    for vp in variants.values():
        for fwd in vp.forwarders:
            fwd.stop()
        if vp.datapath is not None:
            try:
                vp.datapath.close(cleanup=True)
            except Exception as exc:  # noqa: BLE001 - keep tearing down the rest
                log.warning("closing datapath of %s: %s", vp.variant, exc)
