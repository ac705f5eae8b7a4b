"""Property, in the kernel: for any valid Istio traffic configuration, Istio's iptables rules and
the eBPF datapath give every connection the same observable outcome.

Hypothesis draws a pod's traffic annotations (include/exclude CIDRs and ports, inbound ports,
the proxy's UID/GID as the injector renders ``sidecar.istio.io/proxyUID``, DNS capture), whether the
pod has the host's users or its own user namespace (``hostUsers: false``: IDs shifted on the host), turns
them into a :class:`PodConfig` with the agent's own :func:`pod_config`, and a few connections
(outbound TCP/UDP as app, Envoy or another UID/GID, to another pod over IPv4, IPv6 and
IPv4-mapped IPv6, to the pod itself and to loopback; inbound from another pod). One node is
reused: pod ``ipt`` runs Istio's iptables rules, pod ``bpf`` the eBPF datapath with the same
configuration (with the proxy's IDs made host IDs, as the agent makes them), and ``iptu``/``bpfu`` the same
in user namespaces; every connection is made from both and everything the differential table
compares (:class:`~istio_ebpf_plugin.harness.capture_cases.View`) must be equal.

CI runs a fixed set of examples (``CAPTURE_PROPERTY_EXAMPLES``, default 40: derandomized by
the ``ci`` profile) in the mode the probes select, and ``make test`` then 8 more in pod-IP mode
(``CAPTURE_PROPERTY_MODE``); ``make test-deep`` runs 400 in each mode.
"""

from __future__ import annotations

import ipaddress
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from istio_ebpf_plugin.agent.pod_spec import pod_config
from istio_ebpf_plugin.datapath import userns
from istio_ebpf_plugin.datapath.loader import Datapath
from istio_ebpf_plugin.harness import Node
from istio_ebpf_plugin.harness.capture_cases import KNOWN_DIFFERENCES, Case, CaptureLab, View
from istio_ebpf_plugin.harness.probe import probe_connect, start_probe_server

from support.datapath_modes import host_mode, require_mode

pytestmark = pytest.mark.kernel

EXAMPLES = int(os.environ.get("CAPTURE_PROPERTY_EXAMPLES", "40"))
PORTS = (53, 7070, 8080, 9090, 15008, 15020)
CREDS = ((1000, 1000), (1337, 1337), (2000, 2000), (2000, 1000), (1000, 2000), (1337, 1000))


@dataclass
class Pair:
    """Pod ``ipt`` with Istio's iptables rules and pod ``bpf`` with the eBPF datapath."""
    ipt: Any
    bpf: Any
    handle: int | None = None
    servers: list = field(default_factory=list)
    server_ids: tuple[int, int] | None = None


@dataclass
class World:
    node: Node
    dp: Datapath
    #: False: pods with the host's users; True: pods in their own user namespace (hostUsers: false).
    pairs: dict[bool, Pair]
    dst: Any
    ext: Any
    stats: dict = field(default_factory=lambda: {"examples": 0, "connections": 0, "userns": 0})

    def sidecar_as(self, pair: Pair, uid: int, gid: int) -> None:
        """The captured pods' listeners (Envoy, the DNS proxy) run as the configured proxy
        identity, as in a real pod: Istio's DNS conntrack zones match on it."""
        if pair.server_ids == (uid, gid):
            return
        for server in pair.servers:
            server.stop()
        pair.servers = [start_probe_server(p, targets=PORTS, udp_targets=(53,), uid=uid, gid=gid)
                        for p in (pair.ipt, pair.bpf)]
        pair.server_ids = (uid, gid)
        if pair.handle is not None and self.dp.mode == "podip":
            # No sockops listener hook before 5.15: the agent re-registers a restarted Envoy.
            assert self.dp.refresh_listeners({pair.handle: pair.bpf.netns_path}) == {pair.handle: 2}


@pytest.fixture(scope="module")
def world():
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces, cgroups and BPF are created for real")
    mode = os.environ.get("CAPTURE_PROPERTY_MODE") or host_mode()
    require_mode(mode)
    dp = Datapath(mode=mode, pin_root=f"/sys/fs/bpf/istio-ebpf-test-{uuid.uuid4().hex[:8]}")
    started = time.monotonic()
    try:
        with Node() as node:
            dp.load()
            pairs = {False: Pair(node.add_pod("ipt"), node.add_pod("bpf", group="ebpf")),
                     True: Pair(node.add_pod("iptu", userns=True), node.add_pod("bpfu", group="ebpf", userns=True))}
            dst, ext = node.add_pod("dst"), node.add_pod("ext")
            start_probe_server(dst, targets=PORTS, udp_targets=(53,))
            dp.attach_cgroup(str(node.group_cgroup("ebpf")))
            w = World(node, dp, pairs, dst, ext)
            yield w
            print(f"\ncapture property: {w.stats['examples']} examples ({w.stats['userns']} in user-namespace "
                  f"pods), {w.stats['connections']} connections per mechanism, mode {dp.mode}, "
                  f"{time.monotonic() - started:.1f}s")
    finally:
        dp.close(cleanup=True)
        assert not dp.pin_dir.exists()


# ---- configurations: pod annotations as a user writes them ---------------------------------

def _ports(draw_from: tuple[int, ...] = PORTS) -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(draw_from), max_size=3, unique=True).map(lambda ps: ",".join(map(str, ps)))


#: CIDR annotations are drawn symbolically and resolved against the node's addresses
#: (hypothesis draws before the node exists).
CIDR_SYMBOLS = {
    "*": lambda w: "*",
    "dst/32": lambda w: f"{w.dst.ipv4}/32,{w.dst.ipv6}/128",
    "dst4/32": lambda w: f"{w.dst.ipv4}/32",
    "subnet": lambda w: f"{ipaddress.ip_network(w.dst.ipv4 + '/24', strict=False)},"
                        f"{ipaddress.ip_network(w.dst.ipv6 + '/64', strict=False)}",
    "other": lambda w: "192.0.2.0/24,2001:db8::/32",
}

annotations_st = st.fixed_dictionaries({}, optional={
    "traffic.sidecar.istio.io/includeOutboundIPRanges": st.sampled_from(["*", "", "dst/32", "subnet", "other"]),
    "traffic.sidecar.istio.io/excludeOutboundIPRanges": st.sampled_from(["", "dst/32", "dst4/32", "other"]),
    "traffic.sidecar.istio.io/includeInboundPorts": st.one_of(st.just("*"), _ports()),
    "traffic.sidecar.istio.io/excludeInboundPorts": _ports(),
    "traffic.sidecar.istio.io/includeOutboundPorts": _ports(),
    "traffic.sidecar.istio.io/excludeOutboundPorts": _ports(),
    "proxy.istio.io/config": st.sampled_from(["proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n",
                                              "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"false\"\n"]),
})
#: sidecar.istio.io/proxyUID / proxyGID: the injector renders them as istio-proxy's runAsUser/runAsGroup.
proxy_ids_st = st.sampled_from([None, (2000, None), (2000, 2000), (1337, 2000)])

DESTS = ("dst4", "dst6", "dst4m", "self4", "self6", "lo4", "pt4")
connection_st = st.one_of(
    st.tuples(st.just("out"), st.sampled_from(CREDS), st.sampled_from(DESTS), st.sampled_from(PORTS),
              st.sampled_from(["tcp", "tcp", "udp"])),
    st.tuples(st.just("in"), st.just((1000, 1000)), st.sampled_from(("self4", "self6")), st.sampled_from(PORTS),
              st.just("tcp")),
)


def pod_object(w: World, pod: Any, annotations: dict, proxy_ids: tuple | None) -> dict:
    ann = {k: (",".join(CIDR_SYMBOLS[v](w) if v in CIDR_SYMBOLS else v for v in val.split(","))
               if "IPRanges" in k and val else val) for k, val in annotations.items()}
    sc: dict = {}
    if proxy_ids:
        sc["runAsUser"] = proxy_ids[0]
        if proxy_ids[1] is not None:
            sc["runAsGroup"] = proxy_ids[1]
    return {"metadata": {"name": pod.name, "annotations": ann},
            "spec": {"containers": [{"name": "app"}, {"name": "istio-proxy", "securityContext": sc}]},
            "status": {"podIP": pod.ipv4, "podIPs": [{"ip": pod.ipv4}, {"ip": pod.ipv6}]}}


# ---- one connection, seen relative to the pod it starts from or ends in --------------------

def address(w: World, pod: Any, symbol: str) -> str:
    mapped = symbol.endswith("m")
    base = symbol[:-1] if mapped else symbol
    ip = {"dst4": w.dst.ipv4, "dst6": w.dst.ipv6, "self4": pod.ipv4, "self6": pod.ipv6,
          "lo4": "127.0.0.1", "pt4": "127.0.0.6"}[base]
    return "::ffff:" + ip if mapped else ip


def relative(value: Any, pod: Any) -> Any:
    """Replace the captured pod's own name and addresses with tokens so ipt and bpf compare."""
    if isinstance(value, (tuple, list)):
        return type(value)(relative(v, pod) for v in value) if not isinstance(value, View) \
            else View(*(relative(v, pod) for v in value))
    if isinstance(value, str):
        names = {pod.name: "<self>", pod.ipv4: "<self4>", str(ipaddress.ip_address(pod.ipv6)): "<self6>",
                 str(ipaddress.ip_address("::ffff:" + pod.ipv4)): "<self4m>"}
        return names.get(value, value)
    return value


def observe(w: World, pod: Any, conn: tuple) -> View:
    kind, (uid, gid), dst, port, proto = conn
    if proto == "udp":
        port = 53
    src = pod if kind == "out" else w.ext
    out = probe_connect(src, uid, gid, address(w, pod, dst), port, proto=proto, timeout=1.5, nat_pods=(pod,))
    case = Case(id="p", config="p", src="p", creds=(uid, gid), dst=dst, port=port, expect="", expect_pod=None,
                why="", proto=proto)
    return relative(CaptureLab.outcome_key(case, out), pod)


def allowed_fields(mode: str, conn: tuple) -> frozenset[str]:
    # Pod-IP mode: a captured loopback destination shows the pod IP to the listener (KNOWN_DIFFERENCES).
    if conn[2] in ("lo4", "pt4") and mode == "podip":
        return KNOWN_DIFFERENCES["podip"]["validation-pt4-15002"]
    return frozenset()


#: Shrinking replays whole connections in the kernel: bounded so a failure reports in minutes.
SHRINK = os.environ.get("CAPTURE_PROPERTY_SHRINK", "1") != "0"


@settings(max_examples=EXAMPLES, deadline=None,
          phases=[p for p in Phase if p is not Phase.shrink or SHRINK],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(annotations=annotations_st, proxy_ids=proxy_ids_st, in_userns=st.sampled_from((True, False)),
       conns=st.lists(connection_st, min_size=2, max_size=5))
def test_iptables_and_ebpf_agree_on_random_configurations(world, annotations, proxy_ids, in_userns, conns):
    w = world
    pair = w.pairs[in_userns]
    cfg_ipt = pod_config(pod_object(w, pair.ipt, annotations, proxy_ids))
    cfg_pod = pod_config(pod_object(w, pair.bpf, annotations, proxy_ids))
    # What the agent stores: the proxy's IDs as the kernel sees them (the same without a user namespace).
    cfg_bpf = userns.host_config(cfg_pod, pair.bpf.netns_path, pair.bpf.pids())
    assert (cfg_bpf.proxy_uid != cfg_pod.proxy_uid) is in_userns
    w.sidecar_as(pair, cfg_pod.proxy_uid, cfg_pod.proxy_gid)
    pair.ipt.apply_istio_iptables(cfg_ipt)
    if pair.handle is None:
        pair.handle = w.dp.add_pod(pair.bpf.netns_path, cfg_bpf, str(pair.bpf.cgroup_path))
    else:
        w.dp.update_pod(pair.handle, cfg_bpf)
    w.stats["examples"] += 1
    w.stats["userns"] += in_userns
    for conn in conns:
        w.stats["connections"] += 1
        got_ipt, got_bpf = observe(w, pair.ipt, conn), observe(w, pair.bpf, conn)
        ignore = allowed_fields(w.dp.mode, conn)
        diff = {f: (a, b) for f, a, b in zip(View._fields, got_ipt, got_bpf, strict=True)
                if a != b and f not in ignore}
        assert not diff, (f"{conn} under {annotations} proxy={proxy_ids} userns={in_userns}: "
                          f"(iptables, eBPF) differ: {diff}")
    assert pair.ipt.iptables_rule_count() > 0 and pair.bpf.iptables_rule_count() == 0
