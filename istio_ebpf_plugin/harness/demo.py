"""The local demo: two pods, real Envoy sidecars, traffic captured by eBPF only.

client pod (app uid 1000 + Envoy uid 1337)  -->  server pod (HTTP server :8080 + Envoy)

Requests from the client app to the server pod's IP go through the client's
Envoy (outbound 15001, original destination from cgroup/getsockopt) and into
the server's Envoy (inbound 15006 through sk_lookup) before the app answers.
No iptables rule exists in either pod.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from typing import Any

from ..datapath.loader import Datapath
from ..datapath.podconfig import PodConfig, ip_list
from ..datapath.probe import probe_features, select_mode
from ..errors import KernelError
from ..timeouts import scaled
from .apps import http_get, start_http_server, url_for
from .node import Node

SERVER_PORT = 8080


def run_demo(mode: str = "auto", sockmap: bool = False, requests: int = 50,
             log: Any = sys.stderr, features: dict[str, bool] | None = None) -> dict:
    """``features``: probe results already taken on this kernel (probing compiles with BCC:
    minutes in an emulated VM, so the kernel matrix probes once)."""
    if features is None:
        features = probe_features()
    selected, reason = select_mode(os.uname().release, features, override=mode)
    print(f"mode: {selected} ({reason})", file=log)
    if selected == "unsupported":
        raise KernelError(f"this node cannot capture with eBPF: {reason}")

    summary: dict[str, Any] = {"mode": selected, "reason": reason, "sockmap": sockmap}
    t0 = time.monotonic()
    with Node() as node:
        client, server = node.add_pod("client"), node.add_pod("server")
        pin_root = f"/sys/fs/bpf/istio-ebpf-demo-{uuid.uuid4().hex[:8]}"
        with Datapath(mode=selected, sockmap=sockmap, pin_root=pin_root) as dp:
            dp.attach_cgroup(str(node.parent_cgroup))
            print(f"datapath {dp.version} attached to {node.parent_cgroup}", file=log)
            start_http_server(server, SERVER_PORT)
            envoys = {p.name: p.start_envoy() for p in (client, server)}
            for pod in (client, server):
                dp.add_pod(pod.netns_path, PodConfig(pod_ips=ip_list(pod.pod_ips)), str(pod.cgroup_path))
            print(f"pods: client {client.ipv4} / {client.ipv6}, server {server.ipv4} / {server.ipv6}",
                  file=log)

            results = []
            for ip in (server.ipv4, server.ipv6):
                results += http_get(client, url_for(ip, SERVER_PORT), count=requests // 2)
            ok = [r for r in results if r.get("status") == 200]
            summary["requests_ok"] = len(ok)
            summary["requests_failed"] = len(results) - len(ok)

            # Envoy's own logs are the proof: the client's outbound listener saw the
            # server's address as the original destination, the server's inbound too.
            wanted = {f"{server.ipv4}:{SERVER_PORT}", f"[{server.ipv6}]:{SERVER_PORT}"}
            out_log = _logged(envoys["client"], "virtualOutbound", len(ok))
            in_log = _logged(envoys["server"], "virtualInbound", len(ok))
            out_dst = {e.get("downstream_local_address") for e in out_log}
            in_dst = {e.get("downstream_local_address") for e in in_log}
            summary["client_envoy_outbound_requests"] = len(out_log)
            summary["server_envoy_inbound_requests"] = len(in_log)
            summary["original_destinations"] = sorted(out_dst | in_dst)
            summary["original_destination_ok"] = bool(ok) and out_dst == wanted and in_dst == wanted \
                and len(out_log) >= len(ok) and len(in_log) >= len(ok)
            summary["iptables_rules_in_pods"] = client.iptables_rule_count() + server.iptables_rule_count()
            counters = dp.counters()
            summary["counters"] = counters
            summary["sockmap_bytes"] = counters["sockmap_bytes"]
            for env in envoys.values():
                env.stop()
    summary["seconds"] = round(time.monotonic() - t0, 2)
    return summary


def _logged(envoy: Any, listener: str, count: int, timeout: float = 10.0) -> list[dict]:
    """``listener``'s access-log entries once there are ``count`` (Envoy flushes the log every
    100 ms, later on a busy machine), or those there are at the deadline (the summary says)."""
    deadline = time.monotonic() + scaled(timeout)
    while True:
        entries = [e for e in envoy.access_log() if e.get("listener") == listener]
        if len(entries) >= count or time.monotonic() > deadline:
            return entries
        time.sleep(0.05)


def print_summary(s: dict, out: Any = sys.stdout) -> None:
    lines = [
        "istio-ebpf demo",
        f"  mode                      {s['mode']}  ({s['reason']})",
        f"  sockmap acceleration      {'on' if s['sockmap'] else 'off'}",
        f"  requests ok / failed      {s['requests_ok']} / {s['requests_failed']}",
        f"  client Envoy outbound     {s['client_envoy_outbound_requests']} requests",
        f"  server Envoy inbound      {s['server_envoy_inbound_requests']} requests",
        f"  original destinations     {', '.join(s['original_destinations'])}",
        f"  original destination ok   {s['original_destination_ok']}",
        f"  iptables rules in pods    {s['iptables_rules_in_pods']}",
        f"  redirects (out/in/origdst) {s['counters']['out_redirect']}/{s['counters']['inbound_assign']}"
        f"/{s['counters']['origdst_hit']}",
        f"  sockmap bytes             {s['sockmap_bytes']}",
        f"  took                      {s['seconds']} s",
    ]
    print("\n".join(lines), file=out)


def demo_ok(s: dict) -> bool:
    return s["requests_failed"] == 0 and s["requests_ok"] > 0 and s["original_destination_ok"] \
        and s["iptables_rules_in_pods"] == 0


def main_json(s: dict) -> str:
    return json.dumps(s, sort_keys=True)
