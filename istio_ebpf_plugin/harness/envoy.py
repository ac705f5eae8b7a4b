"""The lab's Envoy: the datapath's sidecar Envoy plus the benchmark's listeners.

* :class:`StaticRoute`: an explicit listener forwarding to a fixed upstream (the benchmark's
  "explicit" variant, no capture);
* ``direct_response`` HTTP server listeners ({port: body bytes}); with ``sidecar=False`` and
  another ``admin_port`` such an Envoy is a fast upstream server.

Everything else (bootstrap, :class:`Envoy`, the binary) is :mod:`istio_ebpf_plugin.datapath.selftest.envoy`
(the sockmap self-test's Envoy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from ..datapath.selftest import envoy as sidecar
from ..datapath.selftest.envoy import (ADMIN_PORT, LISTENER_INBOUND, LISTENER_OUTBOUND, Envoy, access_log_config,
                                       bootstrap, circuit_breakers, envoy_binary, envoy_source, envoy_version,
                                       sock_addr, terminal_filter, typed)
from ..datapath.selftest.topology import Pod

__all__ = ["ADMIN_PORT", "LISTENER_INBOUND", "LISTENER_OUTBOUND", "Envoy", "StaticRoute", "bootstrap", "envoy_binary",
           "envoy_source", "envoy_version", "direct_response_listener", "start_envoy"]


@dataclass(frozen=True)
class StaticRoute:
    """An explicit listener ``listen_ip:listen_port`` forwarding to ``upstream`` (no capture)."""

    name: str
    listen_ip: str
    listen_port: int
    upstream_ip: str
    upstream_port: int


def static_route_resources(routes: Iterable[StaticRoute], protocol: str,
                           access_log_path: str | None) -> tuple[list[dict], list[dict]]:
    listeners, clusters = [], []
    for route in routes:
        listeners.append({"name": route.name, "address": sock_addr(route.listen_ip, route.listen_port),
                          "filter_chains": [{"filters": [terminal_filter(
                              protocol, route.name, f"static_{route.name}",
                              access_log_config(access_log_path, route.name))]}]})
        clusters.append({"name": f"static_{route.name}", "type": "STATIC", "connect_timeout": "5s",
                         "circuit_breakers": circuit_breakers(),
                         "load_assignment": {"cluster_name": f"static_{route.name}", "endpoints": [{"lb_endpoints": [
                             {"endpoint": {"address": sock_addr(route.upstream_ip, route.upstream_port)}}]}]}})
    return listeners, clusters


def direct_response_listener(port: int, body_size: int) -> dict:
    """An HTTP server listener answering every request with ``body_size`` bytes (both families)."""
    return {"name": f"server_{port}",
            "address": sock_addr("0.0.0.0", port),
            "additional_addresses": [{"address": sock_addr("::", port)}],
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": typed(
                    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    stat_prefix=f"server_{port}", codec_type="AUTO",
                    route_config={"name": "server", "max_direct_response_body_size_bytes": max(body_size, 4096),
                                  "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [{
                                      "match": {"prefix": "/"},
                                      "direct_response": {"status": 200,
                                                          "body": {"inline_string": "x" * body_size}}}]}]},
                    http_filters=[{"name": "envoy.filters.http.router",
                                   "typed_config": typed("envoy.extensions.filters.http.router.v3.Router")}])}]}]}


def start_envoy(pod: Pod, *, static_routes: Iterable[StaticRoute] = (),
                direct_response: dict[int, int] | None = None, **kwargs: Any) -> Envoy:
    """:func:`istio_ebpf_plugin.datapath.selftest.envoy.start_envoy` with the benchmark's listeners added."""
    routes = tuple(static_routes)

    def extra(protocol: str, access_log_path: str | None) -> tuple[list[dict], list[dict]]:
        listeners, clusters = static_route_resources(routes, protocol, access_log_path)
        listeners += [direct_response_listener(port, size) for port, size in (direct_response or {}).items()]
        return listeners, clusters

    return sidecar.start_envoy(pod, extra=extra, **kwargs)
