"""Baseline: Istio's own iptables rules, loaded for real into pod namespaces.

The capture table (harness/capture_cases.py) is the specification the eBPF datapath is
held to; here it is proven against real iptables REDIRECT + conntrack, and a real Envoy
carries app traffic from pod a to pod b through both sidecars.
"""

from __future__ import annotations

import ipaddress

import pytest

from istio_ebpf_plugin.datapath.podconfig import PodConfig
from istio_ebpf_plugin.harness import Node
from istio_ebpf_plugin.harness.apps import http_get, start_http_server, url_for
from istio_ebpf_plugin.harness.capture_cases import CASES, CaptureLab, failures, report

pytestmark = pytest.mark.kernel

#: A two-port ephemeral range: the kernel hands the same source port to nearly every connection.
CLASH_PORTS = (40000, 40001)


def _install(pod, cfg):
    pod.apply_istio_iptables(cfg)
    assert pod.iptables_rule_count() > 0


def _uninstall(pod, _handle):
    pod.flush_iptables()


@pytest.fixture
def lab(node: Node) -> CaptureLab:
    return CaptureLab(node)


def test_capture_table_matches_istio_iptables(lab: CaptureLab) -> None:
    results = lab.run(CASES, install=_install, uninstall=_uninstall)
    assert len(results) == len(CASES) > 80
    assert not failures(results), "\n" + report(results)
    listeners = {r.outcome.listener for r in results}
    assert {"outbound", "inbound", "dns", "direct", "refused"} <= listeners


def test_capture_table_holds_through_conntrack_port_clashes(lab: CaptureLab) -> None:
    """Every connection from a and c reuses one of two source ports, so REDIRECTs to one listener
    clash on their reply tuple (the TIME_WAIT flow of the previous case) and conntrack moves the
    source port, in a's OUTPUT and in b's PREROUTING. The table still holds: the listener's peer
    is the port conntrack recorded for the app's own connection, read from its table."""
    for pod in (lab.a, lab.c):
        pod.ns_exec(["sysctl", "-q", "-w", f"net.ipv4.ip_local_port_range={CLASH_PORTS[0]} {CLASH_PORTS[1]}"])
    results = lab.run(CASES, install=_install, uninstall=_uninstall)
    assert not failures(results), "\n" + report(results)
    moved = [r.outcome for r in results if r.outcome.nat_peer]
    assert {r.case.src for r in results if r.outcome.nat_peer} == {"a", "c"}
    for out in moved:
        assert out.client_local and out.seen_peer and out.client_local[1] in CLASH_PORTS
        assert out.seen_peer[1] == out.nat_peer[1] != out.client_local[1]   # the clash really happened


def test_capture_table_detects_a_missing_capture(lab: CaptureLab) -> None:
    """Without any rules every case that Istio captures must come out wrong: the table discriminates."""
    results = lab.run(CASES, install=lambda pod, cfg: None, uninstall=lambda pod, h: None)
    captured = [r for r in results if r.case.expect in ("outbound", "inbound", "dns")]
    assert captured and all(not r.ok for r in captured)
    assert all(r.ok for r in results if r.case.expect == "direct" and r.case.src != "c"
               and r.case.config == "default" and r.case.dst[0] in "ac")


def test_istio_validation_check_reports_port_15002(lab: CaptureLab) -> None:
    """istio-validation: proxy-owned connection to 127.0.0.6:15002 lands on 15006 with port 15002."""
    lab.a.apply_istio_iptables(lab.podconfig("default", lab.a))
    out = lab.node.probe_connect(lab.a, 1337, 1337, "127.0.0.6", 15002)
    assert out.listener == "inbound" and out.orig_dst == ("127.0.0.6", 15002)


def test_rule_count_and_flush(node: Node) -> None:
    a = node.add_pod("a")
    assert a.iptables_rule_count() == 0
    cfg = PodConfig(pod_ips=(ipaddress.ip_address(a.ipv4), ipaddress.ip_address(a.ipv6)), dns_capture=True)
    a.apply_istio_iptables(cfg)
    v4 = a.ns_exec(["iptables-save", "-t", "nat"]).stdout
    assert "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001" in v4
    assert "--uid-owner 1337" in a.ns_exec(["ip6tables-save", "-t", "nat"]).stdout
    assert a.iptables_rule_count() > 40
    a.apply_istio_iptables(cfg)               # re-applying replaces, never duplicates
    count = a.iptables_rule_count()
    a.apply_istio_iptables(cfg)
    assert a.iptables_rule_count() == count
    a.flush_iptables()
    assert a.iptables_rule_count() == 0


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_real_envoy_outbound_and_inbound_through_iptables(node: Node, family: str) -> None:
    a, b = node.add_pod("a"), node.add_pod("b")
    for pod in (a, b):
        pod.apply_istio_iptables(PodConfig(pod_ips=tuple(ipaddress.ip_address(ip) for ip in pod.pod_ips)))
    envoy_a, envoy_b = a.start_envoy(), b.start_envoy()
    start_http_server(b, 8080)
    dst = getattr(b, family)
    src = getattr(a, family)
    replies = http_get(a, url_for(dst, 8080, "/hello"), count=3)
    assert [r["status"] for r in replies] == [200, 200, 200]
    # The server saw Envoy's inbound passthrough (127.0.0.6 / ::6), not the app: both sidecars were crossed.
    passthrough = "127.0.0.6" if family == "ipv4" else "::6"
    assert {r["info"]["peer"][0] for r in replies} == {passthrough}
    host = dst if family == "ipv4" else f"[{dst}]"
    out = envoy_a.wait_access_log(lambda e: e["path"] == "/hello")
    assert out["listener"] == "virtualOutbound"
    assert out["downstream_local_address"] == f"{host}:8080"          # original destination restored
    assert out["upstream_host"] == f"{host}:8080"
    assert out["downstream_remote_address"].rsplit(":", 1)[0].strip("[]") == src
    inb = envoy_b.wait_access_log(lambda e: e["path"] == "/hello")
    assert inb["listener"] == "virtualInbound" and inb["downstream_local_address"] == f"{host}:8080"
    assert inb["upstream_local_address"].rsplit(":", 1)[0].strip("[]") == passthrough
    # Envoy's own upstream connection was not captured again (no loop): exactly one outbound entry per request.
    envoy_a.wait_access_log(lambda e: len(envoy_a.access_log()) >= 3)
    envoy_b.wait_access_log(lambda e: len(envoy_b.access_log()) >= 3)
    assert [e["listener"] for e in envoy_a.access_log()] == ["virtualOutbound"] * 3
    assert [e["listener"] for e in envoy_b.access_log()] == ["virtualInbound"] * 3
    stats = envoy_a.stats()
    assert stats["http.outbound.downstream_rq_2xx"] == 3
    assert stats.get("http.inbound.downstream_rq_total", 0) == 0     # a's inbound listener untouched


def test_real_envoy_tcp_proxy_variant_keeps_original_destination(node: Node) -> None:
    """protocol="tcp": virtualOutbound is a tcp_proxy to the ORIGINAL_DST cluster (non-HTTP traffic)."""
    from istio_ebpf_plugin.harness.probe import start_probe_server

    a, b = node.add_pod("a"), node.add_pod("b")
    a.apply_istio_iptables(PodConfig(pod_ips=tuple(ipaddress.ip_address(ip) for ip in a.pod_ips)))
    envoy = a.start_envoy(protocol="tcp")
    start_probe_server(b, targets=(8080,), sidecar_ports=False)
    for dst in (b.ipv4, b.ipv6):
        out = node.probe_connect(a, 1000, 1000, dst, 8080)
        # b's target saw Envoy's upstream connection from a's pod IP (not the app's socket).
        assert (out.listener, out.pod, out.local) == ("direct", "b", (dst, 8080))
        assert out.seen_peer[0] == (a.ipv4 if dst == b.ipv4 else a.ipv6)
        assert out.seen_peer != out.client_local
    envoy.wait_access_log(lambda e: len(envoy.access_log()) >= 2)
    logged = sorted(e["downstream_local_address"] for e in envoy.access_log())
    assert logged == sorted([f"{b.ipv4}:8080", f"[{b.ipv6}]:8080"])
    assert envoy.stats()["tcp.outbound.downstream_cx_total"] == 2
