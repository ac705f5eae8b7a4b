"""Local pod harness: network namespaces + cgroup v2 pods with a real Envoy sidecar.

Used by the tests, the demo and the benchmark. Everything lives in namespaces and
cgroups this package creates (prefixes ``ie-`` and ``istio-ebpf-test-``) and is removed
on exit, on exceptions, at interpreter exit and on SIGTERM/SIGHUP.

API::

    from istio_ebpf_plugin.harness import Node
    with Node() as node:
        a = node.add_pod("a")     # Pod: .name .netns .netns_path .cgroup_path .ipv4 .ipv6 .pod_ips
        b = node.add_pod("b")     # IPv4 10.244.0.<i+1>/24 and IPv6 fd00:1e::<i+1>/64 on eth0, ::6 on lo
        node.parent_cgroup        # attach cgroup BPF programs HERE (never the root cgroup)
        p = a.spawn(["cmd"], uid=1000, gid=1000)     # Popen: cgroup.procs, then setns, then setuid/gid
        r = a.run(["cmd"], uid=1000, timeout=10)     # CompletedProcess (text)
        a.ns_exec(["ip", "addr"])                    # root tool in the netns (not in the pod cgroup)
        env = a.start_envoy(protocol="http", concurrency=1)   # real Envoy as 1337 (see harness.envoy)
        env.wait_live(); env.stats(); env.access_log(); env.wait_access_log(pred)
        a.apply_istio_iptables(podconfig)            # Istio's rules via iptables-restore in a's netns
        a.iptables_rule_count()                      # -A rules in nat/mangle/raw, v4 + v6
        a.flush_iptables()
        a.cpu_usage_usec()                           # cgroup v2 cpu.stat usage_usec of the pod
        out = node.probe_connect(a, 1000, 1000, b.ipv4, 8080, bind=None, proto="tcp")
        # -> Outcome(listener="outbound"|"inbound"|"dns"|"direct"|"refused"|..., pod, orig_dst, seen_peer)

Modules: :mod:`.node` (Node, Pod), :mod:`.envoy` (bootstrap, Envoy), :mod:`.istio_iptables`
(Istio's rule generator, checked against Istio's goldens), :mod:`.probe` (+ ``probe_server.py``,
``probe_client.py``), :mod:`.capture_cases` (the differential capture table), :mod:`.apps`
(HTTP server/client as the app user), :mod:`.netns` (sockets inside a pod netns from the
test process), :mod:`.cleanup` (``istio-ebpf harness-cleanup``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .node import Node, Pod

__all__ = ["Node", "Pod"]


def __getattr__(name: str) -> Any:
    # Lazy (PEP 562): the ``istio-ebpf`` command registers the lab's subcommands through
    # harness.cli, and a node agent started by that command must not load the lab itself.
    if name in __all__:
        from . import node

        return getattr(node, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
