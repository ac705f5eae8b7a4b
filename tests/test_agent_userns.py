"""Pods with ``hostUsers: false``: the proxy's UID/GID as the kernel sees them (datapath/userns.py).

Inside such a pod Envoy's UID 1337 is another UID on the host; the programs compare
``bpf_get_current_uid_gid()`` (host IDs) with the configured proxy UID/GID. The lab's
user-namespace pods (``Node.add_pod(..., userns=True)``) are made as a runtime makes them: a
network namespace owned by a new user namespace whose IDs 0..65535 are a range of host IDs.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess

import pytest

from support.fake_kube import FakeKube, fixture_pod
from istio_ebpf_plugin.datapath import userns
from istio_ebpf_plugin.datapath.podconfig import PodConfig
from istio_ebpf_plugin.errors import KernelError, UsageError
from support.lab_agent import NODE, lab_agent
from support.polling import wait_for


def _ips(pod) -> tuple:
    return tuple(ipaddress.ip_address(ip) for ip in pod.pod_ips)


def test_id_maps_are_read_as_the_kernel_writes_them():
    text = "         0    1114112      65536\n     70000         42          2\n"
    m = userns.parse_id_map(text)
    assert m == [(0, 1114112, 65536), (70000, 42, 2)]
    assert userns.to_outside(1337, m) == 1115449
    assert userns.to_outside(0, m) == 1114112 and userns.to_outside(65535, m) == 1179647
    assert userns.to_outside(65536, m) is None
    assert userns.to_outside(70001, m) == 43 and userns.to_outside(70002, m) is None
    assert userns.parse_id_map("0 0 4294967295\n") == [(0, 0, 4294967295)]
    with pytest.raises(KernelError):
        userns.parse_id_map("0 x 1\n")


# ---- the kernel's namespaces -------------------------------------------------------------------



@pytest.fixture
def lab_node():
    if os.geteuid() != 0:
        pytest.skip("needs root: user and network namespaces are created for real")
    from istio_ebpf_plugin.harness.node import Node

    with Node() as node:
        yield node


@pytest.mark.kernel
def test_host_ids_of_a_user_namespace_pod(lab_node):
    from istio_ebpf_plugin.harness.node import USERNS_BASE, USERNS_GID_SHIFT, USERNS_SIZE

    u, plain = lab_node.add_pod("u", userns=True), lab_node.add_pod("p")
    base = USERNS_BASE + 1 * USERNS_SIZE          # pod index 1
    gbase = base + USERNS_GID_SHIFT               # the lab maps GIDs elsewhere: a mix-up shows
    holder = u.userns_path.removesuffix("/ns/user")       # the process that holds the pod's namespaces
    assert open(f"{holder}/uid_map").read().split() == ["0", str(base), str(USERNS_SIZE)]
    assert open(f"{holder}/gid_map").read().split() == ["0", str(gbase), str(USERNS_SIZE)]
    cfg = PodConfig(pod_ips=_ips(u))
    got = userns.host_config(cfg, u.netns_path, u.pids())
    assert got.proxy_uid == base + 1337
    assert got.proxy_gid == gbase + 1337
    assert got == PodConfig(pod_ips=_ips(u), proxy_uid=base + 1337, proxy_gid=gbase + 1337)
    custom = userns.host_config(PodConfig(proxy_uid=2000, proxy_gid=3000), u.netns_path, u.pids())
    assert custom.proxy_uid == base + 2000
    assert custom.proxy_gid == gbase + 3000
    # What a process of the pod really is on the host: the same numbers.
    proc = u.spawn(["sleep", "30"], uid=1337, gid=1337)
    wait_for(lambda: os.stat(f"/proc/{proc.pid}").st_uid == base + 1337, what="sleep as the proxy user")
    assert os.stat(f"/proc/{proc.pid}").st_uid == base + 1337
    assert os.stat(f"/proc/{proc.pid}").st_gid == gbase + 1337
    # A pod with the host's users: unchanged, no process needed.
    assert userns.host_config(PodConfig(pod_ips=_ips(plain)), plain.netns_path, []) == PodConfig(pod_ips=_ips(plain))
    # No process of the pod in its user namespace (none given): try again later.
    with pytest.raises(KernelError):
        userns.host_config(cfg, u.netns_path, [])
    # IDs the map does not cover: no process of the pod can have them.
    with pytest.raises(UsageError, match="not mapped"):
        userns.host_config(PodConfig(proxy_uid=70000), u.netns_path, u.pids())


@pytest.mark.kernel
def test_a_process_in_a_nested_user_namespace_is_not_taken(lab_node):
    """An app of the pod that sandboxes itself in a user namespace of its own has another map;
    only processes of the namespace that owns the pod's network namespace count."""
    from istio_ebpf_plugin.harness.node import USERNS_BASE, USERNS_SIZE

    u = lab_node.add_pod("u", userns=True)
    nested = u.spawn(["unshare", "--user", "--map-user=1337", "--", "sh", "-c", "echo READY; exec sleep 30"],
                     stdout=subprocess.PIPE, text=True)
    assert nested.stdout is not None and nested.stdout.readline().strip() == "READY"
    nested_pid = int(next(p for p in u.pids() if os.readlink(f"/proc/{p}/ns/user")
                          != os.readlink(u.userns_path)))
    assert "1337" in open(f"/proc/{nested_pid}/uid_map").read().split()[0]   # 1337 -> the pod's root
    got = userns.host_config(PodConfig(), u.netns_path, [nested_pid, *u.pids()])
    assert got.proxy_uid == USERNS_BASE + USERNS_SIZE + 1337


# ---- the agent, a real Envoy in a user-namespace pod ---------------------------------------------

PORT = 8080


@pytest.mark.kernel
@pytest.mark.parametrize("mode", ["cookie", "podip"])
def test_agent_exempts_envoy_in_a_user_namespace_pod(lab_node, pin_root, monkeypatch, mode):
    """The real agent programs a pod whose processes run in a user namespace with a shifted
    uid_map: the app's connections are captured (its Envoy logs them), Envoy's own upstream
    connections are not (no loop: one outbound entry per request, the server answers)."""
    from istio_ebpf_plugin.datapath.selftest.envoy import Envoy
    from istio_ebpf_plugin.harness.apps import http_get, start_http_server, url_for
    from istio_ebpf_plugin.harness.node import USERNS_BASE, USERNS_GID_SHIFT, USERNS_SIZE

    client, server = lab_node.add_pod("cli", userns=True), lab_node.add_pod("srv")
    start_http_server(server, PORT)
    envoy: Envoy = client.start_envoy()
    base = USERNS_BASE + 1 * USERNS_SIZE
    gbase = base + USERNS_GID_SHIFT
    assert os.stat(f"/proc/{envoy.proc.pid}").st_uid == base + 1337, "Envoy's UID 1337: another UID on the host"
    assert os.stat(f"/proc/{envoy.proc.pid}").st_gid == gbase + 1337, "its GID 1337: another GID on the host"
    pod = fixture_pod("master/inject/hello.yaml.injected", "cli", NODE, list(client.pod_ips),
                      annotations={"istio-ebpf.io/redirect": "ebpf"})
    pod["spec"]["hostUsers"] = False
    FakeKube(NODE).install(monkeypatch).add(pod)
    uid = pod["metadata"]["uid"]
    with lab_agent(lab_node, pin_root, mode, {uid: str(client.cgroup_path)}) as agent:
        wait_for(lambda: uid in agent.reconciler.records, what="client pod programmed")
        entry = agent.datapath.pods()[agent.reconciler.records[uid].handle]
        assert entry.proxy_uid == base + 1337      # the maps: host IDs
        assert entry.proxy_gid == gbase + 1337
        assert agent.reconciler.records[uid].config.proxy_uid == 1337        # the pod's own view, kept
        before = agent.datapath.counters()["out_redirect"]
        res = http_get(client, url_for(server.ipv4, PORT), count=5)
        assert [r["status"] for r in res] == [200] * 5
        # Envoy connects upstream before it answers: a loop would have been counted by now.
        assert agent.datapath.counters()["out_redirect"] - before == 5    # the app's five, not Envoy's
        envoy.wait_access_log(lambda e: len([x for x in envoy.access_log()
                                             if x.get("listener") == "virtualOutbound"]) >= 5)
        outbound = [e for e in envoy.access_log() if e.get("listener") == "virtualOutbound"]
        assert len(outbound) == 5 and {e["downstream_local_address"] for e in outbound} == {f"{server.ipv4}:{PORT}"}
        assert {e["upstream_host"] for e in outbound} == {f"{server.ipv4}:{PORT}"}


@pytest.mark.kernel
def test_without_host_ids_envoy_would_loop(lab_node, pin_root):
    """The control: the pod-side UID 1337 written as it is does not exempt Envoy (its host UID
    differs), so its upstream connection is captured again and the request fails."""
    from istio_ebpf_plugin.datapath.loader import Datapath
    from istio_ebpf_plugin.harness.apps import http_get, start_http_server, url_for
    from support.datapath_modes import host_mode

    client, server = lab_node.add_pod("cli", userns=True), lab_node.add_pod("srv")
    start_http_server(server, PORT)
    client.start_envoy()
    dp = Datapath(mode=host_mode(), pin_root=pin_root).load()
    try:
        dp.attach_cgroup(str(lab_node.parent_cgroup))
        dp.add_pod(client.netns_path, PodConfig(pod_ips=_ips(client)), str(client.cgroup_path))
        before = dp.counters()["out_redirect"]
        try:
            res = http_get(client, url_for(server.ipv4, PORT), count=1, timeout=3)
            statuses = [r["status"] for r in res]
        except KernelError:
            statuses = []
        assert statuses != [200]
        assert dp.counters()["out_redirect"] - before >= 2    # the app's, then Envoy's own
    finally:
        dp.close(cleanup=True)


@pytest.mark.kernel
def test_agent_refuses_a_pod_whose_proxy_uid_is_not_mapped(lab_node, pin_root, monkeypatch):
    """``sidecar.istio.io/proxyUID: "70000"`` (the injector renders it as istio-proxy's runAsUser) in a
    pod whose uid_map covers 0-65535: no process of the pod can run as that UID, so Envoy could not be
    told apart. The agent does not capture the pod: one Warning CaptureFailed Event says why, and the
    deny programs in the pod's own cgroup and netns refuse its connections (outbound connect() EPERM,
    inbound refused) instead of leaving it uncaptured."""
    from istio_ebpf_plugin.harness.probe import start_probe_server
    from support.datapath_modes import host_mode

    client, server = lab_node.add_pod("cli", userns=True), lab_node.add_pod("srv")
    probes = [start_probe_server(server, targets=(PORT,)), start_probe_server(client, targets=(PORT,))]
    pod = fixture_pod("master/inject/hello.yaml.injected", "cli", NODE, list(client.pod_ips),
                      annotations={"istio-ebpf.io/redirect": "ebpf"})
    pod["spec"]["hostUsers"] = False
    # What the injector renders from the annotation: istio-init's -u and istio-proxy's runAsUser.
    for c in pod["spec"]["initContainers"]:
        if c["name"] == "istio-init":
            c["args"][c["args"].index("-u") + 1] = "70000"
        if c["name"] == "istio-proxy":
            c["securityContext"]["runAsUser"] = 70000
    kube = FakeKube(NODE).install(monkeypatch)
    kube.add(pod)
    uid = pod["metadata"]["uid"]
    try:
        with lab_agent(lab_node, pin_root, host_mode(), {uid: str(client.cgroup_path)}) as agent:
            failed = wait_for(lambda: [e for e in kube.events if e["reason"] == "CaptureFailed"], what="CaptureFailed")
            (ev,) = failed
            assert ev["type"] == "Warning" and ev["involvedObject"]["name"] == "cli", ev
            assert "not mapped" in ev["message"] and "refused" in ev["message"], ev["message"]
            st = agent.reconciler.states[uid]
            assert uid in agent.reconciler.failed and st.handle is None and agent.datapath.pods() == {}
            assert agent.datapath.denied() == {st.deny} and st.deny is not None
            out = lab_node.probe_connect(client, 1000, 1000, server.ipv4, PORT)
            assert (out.listener, out.errno) == ("error", "EPERM"), out          # outbound: refused
            assert lab_node.probe_connect(server, 1000, 1000, client.ipv4, PORT).errno == "ECONNREFUSED"
            assert not [e for e in kube.events if e["reason"] == "CaptureReady"]
    finally:
        for p in probes:
            p.stop()
