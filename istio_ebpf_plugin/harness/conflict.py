"""The quadruple conflict, run for real: two pods connect concurrently from the same source
ports to different destinations; every connection must reach its own pod's Envoy listener
(here an istio-validation-like probe server on 15001) with its own original destination.

cookie mode: both pods produce identical ``127.0.0.1:P -> 127.0.0.1:15001`` tuples, kept apart
by the netns cookie. pod-IP mode: the connect hook binds each app socket to its pod IP, so the
tuples differ (the peer Envoy sees is the pod IP).
"""

from __future__ import annotations

import json
import textwrap
from typing import TYPE_CHECKING

from ..datapath.podconfig import PodConfig, ip_list
from ..timeouts import scaled
from ..datapath.selftest.topology import PYTHON
from .probe import start_probe_server

if TYPE_CHECKING:  # pragma: no cover
    from ..datapath.loader import Datapath
    from .node import Node

CLIENT = textwrap.dedent(r"""
    import json, socket, sys
    bind_ip, base, dst, dport, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    socks = []
    for i in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((bind_ip, base + i))
        s.connect((dst, dport + i))
        socks.append(s)
    bad, seen = 0, []
    for i, s in enumerate(socks):
        rec = json.loads(s.makefile().readline())
        seen.append(rec["peer"])
        if rec["listener"] != "outbound" or rec["orig_dst"] != [dst, dport + i]:
            bad += 1
        s.close()
    print(json.dumps({"bad": bad, "n": n, "peers": seen[:3]}))
""")


def run_quadruple_conflict(node: "Node", dp: "Datapath", mode: str, n: int = 200) -> dict:
    """Pods a and b (captured) connect to pod c from source ports 40000.. at once.

    Returns {"n", "bad" (wrong listener or original destination, both pods), "peer_ok" (the
    peer address each Envoy saw is the one the mode promises), "pods": per-pod records}.
    """
    a, b, c = node.add_pod("a"), node.add_pod("b"), node.add_pod("c")
    servers = [start_probe_server(p) for p in (a, b)]
    handles = [dp.add_pod(p.netns_path, PodConfig(pod_ips=ip_list(p.pod_ips)), str(p.cgroup_path)) for p in (a, b)]
    binds = {a: "0.0.0.0" if mode == "cookie" else a.ipv4, b: "0.0.0.0" if mode == "cookie" else b.ipv4}
    procs = {p: p.spawn([PYTHON, "-S", "-c", CLIENT, binds[p], "40000", c.ipv4, str(10000 if p is a else 20000),
                         str(n)], uid=1000, gid=1000, stdout=-1, stderr=-1, text=True) for p in (a, b)}
    try:
        outputs = {p: procs[p].communicate(timeout=scaled(60)) for p in (a, b)}
    finally:
        for s in servers:
            s.stop()
        for h in handles:
            dp.remove_pod(h)
    pods: dict[str, dict] = {}
    for p, (out, err) in outputs.items():
        if procs[p].returncode != 0:
            pods[p.name] = {"error": err.strip()[-300:], "bad": n, "n": 0, "peers": []}
            continue
        rec = json.loads(out)
        rec["expected_peer"] = "127.0.0.1" if mode == "cookie" else p.ipv4
        pods[p.name] = rec
    return {"n": n, "bad": sum(r["bad"] for r in pods.values()),
            "peer_ok": all(r["peers"] and r["peers"][0][0] == r.get("expected_peer") for r in pods.values()),
            "pods": pods}
