"""The eBPF datapath on the real kernel: the same capture table as Istio's iptables,
real Envoy end to end, the quadruple conflict, restart adoption and clean-up."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from istio_ebpf_plugin.datapath.loader import unpin_link
from istio_ebpf_plugin.datapath.podconfig import PodConfig, ip_list
from istio_ebpf_plugin.harness.capture_cases import (CASES, KNOWN_DIFFERENCES, CaptureLab, ebpf_installer, failures,
                                                    report)
from istio_ebpf_plugin.harness.conflict import run_quadruple_conflict
from istio_ebpf_plugin.harness.explain_table import check_case, predict
from istio_ebpf_plugin.harness.probe import PYTHON, start_probe_server

from support.datapath_modes import host_mode, require_mode
from support.polling import rmdir_cgroup

pytestmark = pytest.mark.kernel

MODES = ["cookie", "podip"]


@pytest.mark.parametrize("mode,sockmap", [("cookie", False), ("podip", False), ("cookie", True)])
def test_capture_table_matches_istio_iptables(node, datapath_factory, mode, sockmap):
    """Every case of the differential table (the one the iptables baseline passes
    in test_harness_*) reaches the same listener with the same original destination.

    Around each case, ``explain`` (the kernel's decision functions run with BPF_PROG_TEST_RUN)
    is asked first: it must name the case's rules and predict the listener, pod and original
    destination the connection then gets; and each pod's counters must move exactly as the
    case's rules say (explain itself counts nothing)."""
    dp = datapath_factory(mode, sockmap)
    dp.attach_cgroup(str(node.parent_cgroup))
    lab = CaptureLab(node)
    wrong: list[str] = []

    def around(case, handles, probe):
        before = dp.pod_counters()
        prediction = predict(lab, dp, case, handles)
        if dp.pod_counters() != before:
            wrong.append(f"{case.id}: explain moved counters")
        outcome = probe()
        wrong.extend(check_case(lab, case, prediction, before, dp.pod_counters(), handles, mode, outcome))
        return outcome

    results = lab.run(CASES, install=ebpf_installer(dp),
                      uninstall=lambda pod, handle: dp.remove_pod(handle), around=around)
    assert len(results) == len(CASES) > 130
    allowed = KNOWN_DIFFERENCES.get(mode, {})
    assert not failures(results, allowed), report(results, allowed)
    assert not wrong, "\n".join(wrong)
    assert sum(pod.iptables_rule_count() for pod in lab.pods) == 0
    c = dp.counters()
    assert c["out_redirect"] > 0 and c["inbound_assign"] > 0 and c["dns_redirect"] > 0
    # Pod-IP mode refuses exactly the sockets bound to a port beforehand (KNOWN_DIFFERENCES).
    assert c["podip_bind_fail"] == (sum(1 for case in CASES if case.bind) if mode == "podip" else 0)
    assert c["inbound_no_listener"] == 0
    # Every pod removed: nothing of them is left in the maps.
    occ = dp.occupancy()
    assert occ["pod_by_netns"] == occ["pod_by_ip"] == occ["pod_ports"] == occ["pod_cidrs"] == 0
    if "ie_sock_release" in dp.prog_fds:    # every client socket is closed: its app view went with it
        assert occ["app_view"] == 0, occ


@pytest.mark.parametrize("mode,sockmap", [("cookie", False), ("podip", False), ("cookie", True),
                                          ("podip", True)])
def test_demo_real_envoy_end_to_end(mode, sockmap):
    """App -> client Envoy (15001) -> server Envoy (15006) -> app, IPv4 and IPv6, no iptables."""
    from istio_ebpf_plugin.harness.demo import run_demo

    require_mode(mode)
    s = run_demo(mode=mode, sockmap=sockmap, requests=40, log=open(os.devnull, "w"))
    assert s["mode"] == mode
    assert s["requests_ok"] == 40 and s["requests_failed"] == 0
    assert s["original_destination_ok"] is True
    assert s["iptables_rules_in_pods"] == 0
    # One redirect per app connection: Envoy's own upstream connections are not looped back.
    assert s["counters"]["out_redirect"] == s["client_envoy_outbound_requests"] == 40
    assert s["counters"]["origdst_miss"] == 0
    if sockmap:
        assert s["sockmap_bytes"] > 0 and s["counters"]["sockmap_msgs"] > 0
    else:
        assert s["sockmap_bytes"] == 0


@pytest.mark.parametrize("mode", MODES)
def test_quadruple_conflict_same_source_ports(node, datapath_factory, mode):
    """Two pods' apps connect concurrently from the same source ports to different
    destinations: each Envoy (here: an istio-validation-like probe on 15001) sees its own
    original destination for every one of hundreds of connections."""
    dp = datapath_factory(mode)
    dp.attach_cgroup(str(node.parent_cgroup))
    n = 200
    r = run_quadruple_conflict(node, dp, mode, n)
    assert set(r["pods"]) == {"a", "b"}
    for rec in r["pods"].values():
        assert rec["n"] == n and rec["bad"] == 0, rec
    # cookie mode: identical 127.0.0.1:P -> 127.0.0.1:15001 tuples in both pods;
    # pod-IP mode: the app sockets carry the pod IP (the bind the mode relies on).
    assert r["peer_ok"], r["pods"]
    assert dp.counters()["origdst_hit"] >= 2 * n


#: The captured cases of the stock configuration (outbound, inbound, proxy-to-self, DNS): enough
#: to see a broken program, a fraction of the table's time.
_CAPTURED_DEFAULT = tuple(c for c in CASES if c.config == "default" and c.proto == "tcp"
                          and c.expect in ("outbound", "inbound") and c.src == "a")


@pytest.mark.parametrize("broken", ["ie_getsockopt", "ie_getpeername4", "ie_getsockname4"])
def test_capture_table_detects_a_broken_ebpf_datapath(node, datapath_factory, broken):
    """The table catches a datapath that captures but is wrong: without the getsockopt program
    no original destination is answered (the listener's own address is never taken instead);
    without the getpeername/getsockname programs the app sees the redirect."""
    mode = host_mode()
    dp = datapath_factory(mode)
    dp.attach_cgroup(str(node.parent_cgroup))
    unpin_link(dp.links_dir / f"cg-{os.stat(node.parent_cgroup).st_ino}-{broken}")
    lab = CaptureLab(node)
    results = lab.run(_CAPTURED_DEFAULT, install=ebpf_installer(dp),
                      uninstall=lambda pod, handle: dp.remove_pod(handle))
    assert len(results) == len(_CAPTURED_DEFAULT) >= 16
    field = {"ie_getsockopt": "orig", "ie_getpeername4": "app_peer", "ie_getsockname4": "app_local"}[broken]
    wrong = {r.case.id for r in failures(results, KNOWN_DIFFERENCES.get(mode, {}))
             if getattr(r.expected, field) != getattr(r.got, field)}
    ok = [r for r in results if r.ok]
    if broken == "ie_getsockopt":
        # Every redirect through a connect hook needs the program; sk_lookup inbound too.
        want = {r.case.id for r in results if not r.case.bind or mode == "cookie"}
    elif broken == "ie_getpeername4":
        # IPv4 sockets redirected by a connect hook (sk_lookup keeps the real peer).
        want = {r.case.id for r in results if r.case.dst.endswith("4") and r.case.src == r.case.expect_pod
                and not (r.case.bind and mode == "podip")}
    else:
        # Only where the socket could not carry the address iptables gives it.
        want = {"out-app-bound-c4-8080"} if mode == "cookie" else {"validation-pt4-15002"}
    assert want and want <= wrong, report(results)
    assert all(r.case.id not in want for r in ok)


@pytest.mark.parametrize("mode", MODES)
def test_envoy_restart_inbound_follows_new_listener(node, datapath_factory, mode):
    """Envoy restarted: the new 15006 socket becomes the sk_lookup target (sockops in
    cookie mode; in pod-IP mode the agent's periodic refresh_listeners finds it)."""
    from istio_ebpf_plugin.harness.apps import http_get, start_http_server, url_for

    dp = datapath_factory(mode)
    dp.attach_cgroup(str(node.parent_cgroup))
    client, server = node.add_pod("client"), node.add_pod("server")
    start_http_server(server, 8080)
    handles = {p.name: dp.add_pod(p.netns_path, PodConfig(pod_ips=ip_list(p.pod_ips)), str(p.cgroup_path))
               for p in (client, server)}
    client_env = client.start_envoy()
    env = server.start_envoy()
    if mode == "podip":
        # IPv4 + IPv6
        assert dp.refresh_listeners({handles["server"]: server.netns_path}) == {handles["server"]: 2}
    assert http_get(client, url_for(server.ipv4, 8080))[0]["status"] == 200
    env.stop()
    env = server.start_envoy()
    if mode == "podip":
        pods = list(zip(handles.values(), (client, server), strict=True))
        assert dp.refresh_listeners({h: p.netns_path for h, p in pods}) == {h: 2 for h, _ in pods}
    r = http_get(client, url_for(server.ipv4, 8080), count=5)
    assert [x["status"] for x in r] == [200] * 5
    assert all(x["info"]["peer"][0] == "127.0.0.6" for x in r)   # through the new Envoy
    env.stop()
    client_env.stop()


@pytest.mark.parametrize("mode", MODES)
def test_process_in_child_cgroup_is_captured(node, datapath_factory, mode):
    """Kubernetes runs containers in child cgroups of the pod cgroup, and a process may
    create its own: pods are keyed by netns cookie (cookie mode) or found among the
    cgroup ancestors (pod-IP mode), so both still capture."""
    dp = datapath_factory(mode)
    dp.attach_cgroup(str(node.parent_cgroup))
    a, c = node.add_pod("a"), node.add_pod("c")
    server = start_probe_server(a)
    dp.add_pod(a.netns_path, PodConfig(pod_ips=ip_list(a.pod_ips)), str(a.cgroup_path))
    child = Path(a.cgroup_path) / "container-app" / "nested"
    child.mkdir(parents=True)
    try:
        script = ("import os, socket, sys, json\n"
                  f"open('{child}/cgroup.procs', 'w').write(str(os.getpid()))\n"
                  "s = socket.create_connection((sys.argv[1], 8080), timeout=3)\n"
                  "print(s.makefile().readline().strip())\n")
        # The process moves itself into the nested cgroup before it connects.
        proc = a.run([PYTHON, "-S", "-c", script, c.ipv4], uid=0, gid=0, timeout=20)
        rec = json.loads(proc.stdout)
        assert rec["listener"] == "outbound" and rec["orig_dst"] == [c.ipv4, 8080], rec
    finally:
        server.stop()
        for d in (child, child.parent):
            rmdir_cgroup(d)


_CONNECTED_UDP = textwrap.dedent(r"""
    import json, socket, sys
    dst = sys.argv[1]
    fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.connect((dst, 53))            # the way glibc's resolver talks to a nameserver
    peer = s.getpeername()[:2]
    s.send(b"query")
    data, src = s.recvfrom(4096)
    print(json.dumps({"peer": list(peer), "from": list(src[:2]), "reply": json.loads(data)}))
""")


@pytest.mark.parametrize("dns_capture", [True, False], ids=["dns-capture", "no-dns-capture"])
@pytest.mark.parametrize("family", [4, 6])
def test_connected_udp_dns_names_the_real_server(node, datapath_factory, dns_capture, family):
    """A connected DNS socket: with capture the query reaches 15053 while getpeername()
    and the reply's source still name the nameserver; without capture nothing changes."""
    dp = datapath_factory(host_mode())
    dp.attach_cgroup(str(node.parent_cgroup))
    a, c = node.add_pod("a"), node.add_pod("c")
    servers = [start_probe_server(a), start_probe_server(c, udp_targets=(53,))]
    dp.add_pod(a.netns_path, PodConfig(pod_ips=ip_list(a.pod_ips), dns_capture=dns_capture), str(a.cgroup_path))
    dst = c.ipv4 if family == 4 else c.ipv6
    try:
        proc = a.run([PYTHON, "-S", "-c", _CONNECTED_UDP, dst], uid=1000, gid=1000, timeout=20)
    finally:
        for s in servers:
            s.stop()
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(proc.stdout)
    assert rec["peer"] == [dst, 53] and rec["from"] == [dst, 53], rec
    assert (rec["reply"]["listener"], rec["reply"]["pod"]) == (("dns", "a") if dns_capture else ("direct", "c"))


@pytest.mark.parametrize("mechanism", ["iptables", "cookie", "podip"])
def test_app_sees_its_connection_as_under_iptables(node, datapath_factory, mechanism):
    """Issue #15's table: an app (UID 1000) in pod a connects to pod b's IP:8080; a plain
    listener on 15001 (UID 1337) takes the connection. getpeername() must name b:8080 and
    getsockname() a's pod IP with the real source port (the one the listener sees), under
    Istio's iptables and under eBPF in both modes, IPv4 and IPv6."""
    a, b = node.add_pod("a"), node.add_pod("b")
    server = start_probe_server(a)
    cfg = PodConfig(pod_ips=ip_list(a.pod_ips))
    if mechanism == "iptables":
        a.apply_istio_iptables(cfg)
    else:
        dp = datapath_factory(mechanism)
        dp.attach_cgroup(str(node.parent_cgroup))
        dp.add_pod(a.netns_path, cfg, str(a.cgroup_path))
    try:
        for dst, src in ((b.ipv4, a.ipv4), (b.ipv6, a.ipv6)):
            out = node.probe_connect(a, 1000, 1000, dst, 8080)
            assert out.listener == "outbound" and out.orig_dst == (dst, 8080), out.raw
            assert out.client_peer == (dst, 8080), out.raw
            assert out.client_local[0] == src and out.seen_peer == out.client_local, out.raw
        if mechanism != "iptables":
            assert dp.counters()["app_view_restored"] >= 2      # getpeername answered by sockname.c
    finally:
        server.stop()
