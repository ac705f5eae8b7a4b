"""The real agent on the real kernel: harness pods, real Envoys, real traffic, real maps.

Only the Kubernetes API is replaced (FakeKube, fed with the injected fixture
pods, their uid/nodeName/podIPs filled in from the harness pods).
"""

from __future__ import annotations

import copy
import multiprocessing
import os
import signal
import threading
import time

import pytest

from support.fake_kube import FakeKube, fixture_pod
from istio_ebpf_plugin.agent.node_agent import AgentConfig, NodeAgent
from istio_ebpf_plugin.datapath.loader import Datapath
from istio_ebpf_plugin.datapath.netns import netns_cookie
from istio_ebpf_plugin.timeouts import scaled
from support.polling import wait_for

pytestmark = pytest.mark.kernel

NODE = "harness-node"
PORT = 8080


@pytest.fixture
def cluster():
    from istio_ebpf_plugin.harness.apps import start_http_server
    from istio_ebpf_plugin.harness.node import Node

    with Node() as node:
        client, server = node.add_pod("cli"), node.add_pod("srv")
        start_http_server(server, PORT)
        envoys = {p.name: p.start_envoy() for p in (client, server)}
        pods = {
            "cli": fixture_pod("master/inject/hello.yaml.injected", "cli", NODE, list(client.pod_ips),
                               annotations={"istio-ebpf.io/redirect": "ebpf"}),
            "srv": fixture_pod("master/inject/hello.yaml.cni.injected", "srv", NODE, list(server.pod_ips),
                               annotations={"inject.istio.io/templates": "sidecar,ebpf"}),
        }
        cgroups = {pods[p.name]["metadata"]["uid"]: str(p.cgroup_path) for p in (client, server)}
        yield node, client, server, envoys, pods, cgroups


def agent_config(node, pin_root, cgroups, mode=None) -> AgentConfig:
    return AgentConfig(node_name=NODE, mode_override=mode, pin_root=pin_root,
                       cgroup_root=str(node.parent_cgroup), host="127.0.0.1", port=0, retry_seconds=0.05,
                       watch_timeout=1, cgroup_for_uid=cgroups.get)


def outbound_entries(envoy) -> list[dict]:
    return [e for e in envoy.access_log() if e.get("listener") == "virtualOutbound"]


def outbound_requests(envoy) -> int:
    """Requests Envoy's outbound listener has taken: counted when it reads them, so a reply the
    client already holds is counted (the access log is only flushed every 100 ms)."""
    return envoy.stats().get("http.outbound.downstream_rq_total", 0)


def wait_outbound_logged(envoy, address: str) -> None:
    envoy.wait_access_log(lambda e: e.get("listener") == "virtualOutbound"
                          and e.get("downstream_local_address") == address)



@pytest.mark.parametrize("mode", ["cookie", "podip"])
def test_agent_captures_keeps_sandbox_config_and_deletes(cluster, pin_root, monkeypatch, mode):
    from istio_ebpf_plugin.harness.apps import http_get, url_for

    node, client, server, envoys, pods, cgroups = cluster
    kube = FakeKube(NODE).install(monkeypatch)
    for p in pods.values():
        kube.add(p)
    agent = NodeAgent(agent_config(node, pin_root, cgroups, mode))
    stop = threading.Event()
    loop = threading.Thread(target=lambda: [agent.step(0.05) for _ in iter(stop.is_set, True)], daemon=True)
    agent.start()
    loop.start()
    try:
        wait_for(lambda: agent.ready()[0], what="agent ready")
        assert kube.node_labels["istio-ebpf.io/mode"] == mode
        # real map contents: one entry per pod, keyed by the pods' netns cookies
        # (cookie mode) or cgroup ids (pod-IP mode)
        assert set(agent.datapath.pods()) == {agent.datapath.pod_key(p.netns_path, str(p.cgroup_path))
                                              for p in (client, server)}
        # real traffic, through the client's Envoy with the original destination
        url = url_for(server.ipv4, PORT)
        res = http_get(client, url, count=5)
        assert [r["status"] for r in res] == [200] * 5
        wait_outbound_logged(envoys["cli"], f"{server.ipv4}:{PORT}")
        before = outbound_requests(envoys["cli"])

        # CaptureReady on each pod, with the time from its sandbox's first process to the entries
        ready = [e for e in kube.events if e["reason"] == "CaptureReady"]
        assert sorted(e["involvedObject"]["name"] for e in ready) == ["cli", "srv"]
        assert all(f"({mode} mode)" in e["message"] and "s after the sandbox started" in e["message"]
                   for e in ready), ready

        # annotation change on the running pod (port 8080 excluded from outbound capture): capture
        # is fixed per sandbox, as Istio's; the pod is told it applies at its next sandbox
        kube.modify(pods["cli"]["metadata"]["uid"],
                    annotations={"traffic.sidecar.istio.io/excludeOutboundPorts": str(PORT)})
        wait_for(lambda: any(e["reason"] == "CaptureUnchanged" for e in kube.events), what="the Event")
        res = http_get(client, url, count=3)
        assert [r["status"] for r in res] == [200] * 3
        assert outbound_requests(envoys["cli"]) == before + 3, "no longer through Envoy"
        assert PORT not in agent.reconciler.records[pods["cli"]["metadata"]["uid"]].config.exclude_outbound_ports

        # DELETED: the server's entries leave the maps
        kube.delete_pod(pods["srv"]["metadata"]["uid"])
        client_key = agent.datapath.pod_key(client.netns_path, str(client.cgroup_path))
        # remove_pod drops pod_by_netns first, then the pod's other entries: wait for both
        wait_for(lambda: set(agent.datapath.pods()) == {client_key}
                 and agent.datapath.occupancy()["pod_by_ip"] == 2, what="srv removed")   # the client's v4 + v6
        assert agent.datapath.occupancy()["pod_by_netns"] == 1
    finally:
        stop.set()
        loop.join(5)
        agent.shutdown(cleanup=True)


def test_a_sandbox_is_captured_before_kubelet_reports_its_addresses(cluster, pin_root, monkeypatch):
    """The Pod object has no IP yet (kubelet reports it with its next status update); the sandbox runs:
    captured with the addresses of its network namespace, traffic goes through Envoy, and the API's
    addresses arriving later change nothing (no CaptureUnchanged)."""
    from istio_ebpf_plugin.harness.apps import http_get, url_for

    node, client, server, envoys, pods, cgroups = cluster
    kube = FakeKube(NODE).install(monkeypatch)
    uid = pods["cli"]["metadata"]["uid"]
    kube.add(pods["srv"])
    no_ip = copy.deepcopy(pods["cli"])
    no_ip["status"].update(podIP=None, podIPs=[])
    kube.add(no_ip)
    agent = NodeAgent(agent_config(node, pin_root, cgroups))
    stop = threading.Event()
    loop = threading.Thread(target=lambda: [agent.step(0.05) for _ in iter(stop.is_set, True)], daemon=True)
    agent.start()
    loop.start()
    try:
        wait_for(lambda: uid in agent.reconciler.records, what="the client captured without an IP in the API")
        assert {str(ip) for ip in agent.reconciler.records[uid].config.pod_ips} == set(client.pod_ips)
        url = url_for(server.ipv4, PORT)
        before = outbound_requests(envoys["cli"])
        assert [r["status"] for r in http_get(client, url, count=3)] == [200] * 3
        assert outbound_requests(envoys["cli"]) == before + 3, "not through Envoy"
        kube.modify(uid, ips=list(reversed(client.pod_ips)))      # kubelet's report, in another order
        kube.delete_pod(pods["srv"]["metadata"]["uid"])           # queued after it: handled in order
        wait_for(lambda: len(agent.datapath.pods()) == 1, what="srv removed")
        assert not [e for e in kube.events if e["reason"] == "CaptureUnchanged"], kube.events
    finally:
        stop.set()
        loop.join(5)
        agent.shutdown(cleanup=True)


def _child_agent(pods: list[dict], node_name: str, cfg_kwargs: dict) -> None:
    """A separate agent process (killed with SIGKILL by the test); its API is a FakeKube copy."""
    from istio_ebpf_plugin import kube_api

    kube = FakeKube(node_name)
    for p in pods:
        kube.add(p)
    kube_api.use_backend(kube)
    cgroups = cfg_kwargs.pop("cgroups")
    agent = NodeAgent(AgentConfig(cgroup_for_uid=cgroups.get, **cfg_kwargs))
    agent.start(serve=False)
    ready = "/tmp/" + os.path.basename(cfg_kwargs["pin_root"]) + ".ready"   # bpffs holds no plain files
    while True:
        agent.step(0.05)
        if agent.ready()[0] and not os.path.exists(ready):
            open(ready, "w").close()


def test_kill_9_during_load_zero_failures_no_duplicates(cluster, pin_root):
    from istio_ebpf_plugin.harness.apps import http_get, url_for

    node, client, server, envoys, pods, cgroups = cluster
    ctx = multiprocessing.get_context("fork")
    kwargs = dict(node_name=NODE, pin_root=pin_root, cgroup_root=str(node.parent_cgroup),
                  retry_seconds=0.05, watch_timeout=1)
    ready = "/tmp/" + os.path.basename(pin_root) + ".ready"

    def start_agent():
        if os.path.exists(ready):
            os.unlink(ready)
        proc = ctx.Process(target=_child_agent, args=(list(pods.values()), NODE, dict(kwargs, cgroups=cgroups)),
                           daemon=True)
        proc.start()
        wait_for(lambda: os.path.exists(ready), timeout=60, what="agent ready")
        return proc

    first = start_agent()
    results: list[dict] = []
    stop = threading.Event()

    def load():
        url = url_for(server.ipv4, PORT)
        while not stop.is_set():
            results.extend(http_get(client, url, count=20, timeout=scaled(5)))

    loader = threading.Thread(target=load, daemon=True)

    def load_goes_on(what: str) -> None:
        # Requests come back in batches of 20: two more batches = one sent wholly after the event.
        n = len(results)
        wait_for(lambda: len(results) >= n + 40, timeout=120, what=f"40 more requests {what}", interval=0.05)

    try:
        t0 = time.monotonic()
        loader.start()
        load_goes_on("under the first agent")
        os.kill(first.pid, signal.SIGKILL)     # in the middle of the load
        first.join(5)
        load_goes_on("with no agent at all: pinned programs keep capturing")
        second = start_agent()
        load_goes_on("under the second agent")
        stop.set()
        loader.join(30)
        failed = [r for r in results if r.get("status") != 200]
        print(f"{len(results)} requests over {time.monotonic() - t0:.0f} s, {len(failed)} failed")
        assert results and not failed, failed[:3]
        # the same programs, attached once each (the kernel's own query)
        dp = Datapath(mode="cookie", pin_root=pin_root).load()
        try:
            assert dp.adopted
            ids = dp.attached_program_ids(str(node.parent_cgroup))
            assert ids and all(len(v) == 1 for v in ids.values()), ids
            assert set(dp.pods()) == {netns_cookie(client.netns_path), netns_cookie(server.netns_path)}
        finally:
            dp.close(cleanup=False)
        # All captured, before/during/after: every request is in the client Envoy's access log.
        wait_for(lambda: len(outbound_entries(envoys["cli"])) >= len(results),
                 what=f"{len(results)} outbound access-log entries")
        os.kill(second.pid, signal.SIGKILL)
        second.join(5)
    finally:
        stop.set()
        for p in multiprocessing.active_children():
            p.kill()
        if os.path.exists(ready):
            os.unlink(ready)


def test_500_pods_reconcile_and_memory_measured():
    """500 pods' worth of map entries: a fresh agent and a restarted one (adopting the pins)
    both converge to exactly 500 pods; the figures go into docs/agent.md."""
    from support.agent_scale import measure

    r = measure(500)
    print(r)
    for run in ("first_start", "restart"):
        x = r[run]
        assert x["pods_managed"] == 500
        # traffic-annotations pods: 2 IPs, 7 ports (1,2,3 in; 15090,15021,4,5,6,15020 - de-duplicated
        # per kind - and 7,8,9 out), 3 CIDRs each
        assert x["occupancy"]["pod_by_netns"] == 500 and x["occupancy"]["pod_by_ip"] == 1000
    assert r["first_start"]["adopted"] is False and r["restart"]["adopted"] is True
    assert r["restart"]["occupancy"] == r["first_start"]["occupancy"]


def test_podip_listener_refresh_survives_the_pod_process_exiting(cluster, pin_root, monkeypatch):
    """Pod-IP mode re-registers Envoy's 15006 listener from /proc every few seconds, through the
    pod's recorded /proc/<pid>/ns/net. That process exits between the /proc listing and the stat:
    the refresh must not raise (it ended the agent), and the next one finds the pod's namespace
    through another of its processes and registers the listener again."""
    from istio_ebpf_plugin.datapath import listeners, maps

    node, client, server, envoys, pods, cgroups = cluster
    kube = FakeKube(NODE).install(monkeypatch)
    for p in pods.values():
        kube.add(p)
    agent = NodeAgent(agent_config(node, pin_root, cgroups, "podip"))
    agent.config.listener_refresh_seconds = 3600      # refreshed by hand below
    try:
        agent.start(serve=False)
        wait_for(lambda: (agent.step(0.05), agent.ready()[0])[1] and len(agent.reconciler.records) == 2,
                 timeout=60, what="agent ready")
        rec = agent.reconciler.records[pods["cli"]["metadata"]["uid"]]
        sleeper = client.spawn(["sleep", "3600"])
        procs = wait_for_sleep(client.cgroup_path)
        rec.netns_path = f"/proc/{procs}/ns/net"          # the pod's process the locator happened to pick

        def listener_entries() -> list:
            return agent.datapath._maps.keys("inbound_listeners", maps.IpAddr)

        for key in listener_entries():           # forget the registration: only a refresh brings it back
            agent.datapath._maps.delete("inbound_listeners", key)
        listing = listeners.processes_by_netns

        def list_then_exit(root: str = "/proc"):
            found = listing(root)
            sleeper.kill()
            sleeper.wait()
            return found

        monkeypatch.setattr(listeners, "processes_by_netns", list_then_exit)
        agent.refresh_listeners()                  # raised FileNotFoundError out of step()
        monkeypatch.setattr(listeners, "processes_by_netns", listing)
        assert not os.path.exists(rec.netns_path)
        agent.refresh_listeners()
        assert rec.netns_path != f"/proc/{procs}/ns/net" and os.path.exists(rec.netns_path)
        assert len(listener_entries()) >= 1        # the client's Envoy 15006 registered again
    finally:
        agent.shutdown(cleanup=True)


def wait_for_sleep(cgroup) -> int:
    """The pid of the ``sleep`` just started in the pod's cgroup (the launcher may fork)."""
    found: list[int] = []

    def look() -> bool:
        for pid in (cgroup / "cgroup.procs").read_text().split():
            try:
                if open(f"/proc/{pid}/comm").read().strip() == "sleep":
                    found.append(int(pid))
                    return True
            except OSError:
                continue
        return False

    wait_for(look, what="the sleep process")
    return found[0]
