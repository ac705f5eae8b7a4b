"""Per-pod capture states through the real NodeAgent (fake API, recording datapath, fake /proc).

What a user of an opted-in pod sees: opt-ins that cannot apply are ignored with an Event
(no sidecar, TPROXY), capture is fixed per sandbox (edits take effect at the next sandbox, with
an Event), a pod that cannot be programmed is refused (deny) rather than left uncaptured, with
one ``CaptureFailed`` per state change and backed-off retries, ``CaptureReady`` when its entries
are written, ``/pods`` and ``istio-ebpf pods``, and per-pod metrics that go with the pod.
The same flows against a real kube-apiserver: test_kube_agent_e2e.py; on a real kernel:
test_agent_kernel.py, test_hardening_faults.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
import zlib
from pathlib import Path

import pytest

from support.fake_kube import FakeKube, fixture_pod
from istio_ebpf_plugin import DRAINING_ANNOTATION
from istio_ebpf_plugin.agent.locate import PodLocation, PodLocator, boot_seconds
from istio_ebpf_plugin.agent.mode import find_cgroup2
from istio_ebpf_plugin.cli import main as cli_main
from support.polling import wait_for
from test_agent_loop import NODE, OPT_IN, FakeProc, Running, events_applied, get, make_agent

AGENT_NS = "istio-ebpf-system"

INJECTED = "master/inject/hello.yaml.injected"


@pytest.fixture
def kube(monkeypatch):
    return FakeKube(NODE).install(monkeypatch)


@pytest.fixture
def proc(tmp_path, monkeypatch):
    FakeProc.in_our_userns(monkeypatch)
    return FakeProc(tmp_path / "proc")


def events(kube, name: str, reason: str | None = None) -> list[dict]:
    return [e for e in kube.events if e["involvedObject"].get("name") == name
            and (reason is None or e["reason"] == reason)]


def running(agent, **cfg) -> Running:
    for k, v in cfg.items():
        setattr(agent.config, k, v)
    run = Running(agent)
    wait_for(lambda: agent.synced, what="first resync")
    return run


def new_sandbox(proc, pid: int, uid: str) -> int:
    """The pod's sandbox is recreated: a new process with a new network namespace (the new one
    is made before the old one goes, so the two namespace inodes differ)."""
    new = proc.start(uid)
    proc.stop(pid)
    return new


def pod_view(agent, name: str) -> dict | None:
    code, body = get(agent, "/pods")
    assert code == 200, body
    return next((p for p in json.loads(body)["pods"] if p["name"] == name), None)


# ------------------------------------------------------------------------------------ item 2, 12

NO_SIDECAR = {
    # not injected at all (the webhook skipped it): no istio-proxy, no status annotation
    "plain": ("master/inject/hello.yaml", {}, "no istio-proxy container"),
    # what the injector does with sidecar.istio.io/inject=false: nothing (label or annotation)
    "inject-off": ("master/inject/hello.yaml", {"sidecar.istio.io/inject": "false"},
                   "sidecar.istio.io/inject is 'false'"),
    # an injected spec copied into a pod Istio never saw: no sidecar.istio.io/status
    "no-status": (INJECTED, {"sidecar.istio.io/status": None}, "no sidecar.istio.io/status"),
    # the gateway template: istio-proxy runs as a router, not a sidecar
    "gateway": ("master/inject/gateway.yaml.injected", {}, "not as a sidecar"),
}


def test_opt_in_without_a_sidecar_is_ignored_with_a_warning(kube, proc):
    pods = {}
    for name, (fixture, extra, _) in NO_SIDECAR.items():
        pod = fixture_pod(fixture, name, NODE, [f"10.0.3.{len(pods) + 1}"], annotations=OPT_IN)
        for k, v in extra.items():
            if v is None:
                pod["metadata"]["annotations"].pop(k)
            else:
                pod["metadata"]["annotations"][k] = v
        pods[name] = pod
    labelled = fixture_pod("master/inject/hello.yaml", "label-off", NODE, ["10.0.3.9"], annotations=OPT_IN)
    labelled["metadata"].setdefault("labels", {})["sidecar.istio.io/inject"] = "false"
    pods["label-off"] = labelled
    control = fixture_pod(INJECTED, "control", NODE, ["10.0.3.10"], annotations=OPT_IN)
    for pod in [*pods.values(), control]:
        proc.start(pod["metadata"]["uid"])
        kube.add(pod)
    store: dict = {}
    agent = make_agent(proc, store)
    run = running(agent)
    try:
        wait_for(lambda: len(store) == 1 and all(events(kube, n, "CaptureIgnored") for n in pods),
                 what="the control pod captured, every other one ignored with an Event")
        (cfg,) = store.values()
        assert [str(ip) for ip in cfg.pod_ips] == ["10.0.3.10"]
        expected = {n: why for n, (_, _, why) in NO_SIDECAR.items()} | {"label-off": "sidecar.istio.io/inject is"}
        for name, why in expected.items():
            (ev,) = events(kube, name, "CaptureIgnored")
            assert ev["type"] == "Warning" and why in ev["message"], ev
            view = pod_view(agent, name)
            assert view["state"] == "ignored" and why in view["error"]
        assert [c for c in agent._made[0].calls if c[0] in ("add", "deny")] == [("add", next(iter(store)))]
    finally:
        run.close()


def test_tproxy_pod_is_left_to_istio_init(kube, proc):
    """docs/install.md: TPROXY pods keep iptables (the ebpf template leaves them to istio-init)."""
    pod = kube.add(fixture_pod("master/inject/hello-tproxy.yaml.injected", "tproxy", NODE, ["10.0.4.1"],
                               annotations=OPT_IN))
    proc.start(pod["metadata"]["uid"])
    store: dict = {}
    agent = make_agent(proc, store)
    run = running(agent)
    try:
        wait_for(lambda: events(kube, "tproxy", "CaptureIgnored"), what="the Event")
        (ev,) = events(kube, "tproxy")
        assert ev["type"] == "Normal" and "TPROXY" in ev["message"]
        assert store == {} and pod_view(agent, "tproxy")["state"] == "ignored"
    finally:
        run.close()


# ------------------------------------------------------------------------------------ item 7

def test_capture_is_fixed_per_sandbox(kube, proc):
    a = kube.add(fixture_pod(INJECTED, "a", NODE, ["10.0.5.1"], annotations=OPT_IN))
    uid = a["metadata"]["uid"]
    pid = proc.start(uid)
    store: dict = {}
    agent = make_agent(proc, store)
    run = running(agent)
    try:
        wait_for(lambda: len(store) == 1 and events(kube, "a", "CaptureReady"), what="a captured")
        first = next(iter(store))
        # An edit on the running pod: no change to its entries, one Event that says when it applies.
        kube.modify(uid, annotations={"traffic.sidecar.istio.io/excludeOutboundPorts": "5432"})
        wait_for(lambda: events(kube, "a", "CaptureUnchanged"), what="the Event")
        kube.modify(uid, annotations={"traffic.sidecar.istio.io/excludeOutboundPorts": "5432"})   # same again
        events_applied(kube, agent)
        (ev,) = events(kube, "a", "CaptureUnchanged")
        assert "takes effect when the pod restarts" in ev["message"]
        assert store == {first: store[first]} and store[first].exclude_outbound_ports == ()
        # A new sandbox: decided afresh, from the Pod object as it is now.
        pid = new_sandbox(proc, pid, uid)
        kube.modify(uid)     # the kubelet's status update after a sandbox restart
        # the entries are written before the Event is posted: wait for both
        wait_for(lambda: list(store) != [first] and len(events(kube, "a", "CaptureReady")) == 2,
                 what="the new sandbox's entry and its CaptureReady")
        ((handle, cfg),) = store.items()
        assert cfg.exclude_outbound_ports == (5432,)

        # Removing the opt-in never un-captures the running sandbox ...
        kube.modify(uid, annotations={"istio-ebpf.io/redirect": None})
        wait_for(lambda: len(events(kube, "a", "CaptureUnchanged")) == 2, what="the opt-out Event")
        assert list(store) == [handle]
        assert "stays captured" in events(kube, "a", "CaptureUnchanged")[-1]["message"]
        # ... its next sandbox runs without eBPF capture.
        pid = new_sandbox(proc, pid, uid)
        kube.modify(uid)
        wait_for(lambda: not store and pod_view(agent, "a") is None, what="the entry to go with the old sandbox")

        # Adding the opt-in to a running pod: for its next sandbox too.
        kube.modify(uid, annotations=OPT_IN)
        wait_for(lambda: len(events(kube, "a", "CaptureUnchanged")) == 3, what="the opt-in Event")
        assert not store and pod_view(agent, "a")["state"] == "ignored"
        new_sandbox(proc, pid, uid)
        kube.modify(uid)
        wait_for(lambda: len(store) == 1, what="captured in its next sandbox")
    finally:
        run.close()


def test_restarted_agent_adopts_sandboxes_without_rewriting_them(kube, proc):
    a = kube.add(fixture_pod(INJECTED, "a", NODE, ["10.0.6.1"], annotations=OPT_IN))
    proc.start(a["metadata"]["uid"])
    store: dict = {}     # stands for the pinned maps: it survives the agent
    first = make_agent(proc, store)
    run = running(first)
    wait_for(lambda: len(store) == 1)
    run.close()
    # Edited while no agent ran: the running sandbox keeps what it was captured with.
    kube.modify(a["metadata"]["uid"], annotations={"traffic.sidecar.istio.io/excludeOutboundPorts": "5432"})
    reported = len(kube.events)
    second = make_agent(proc, store)
    run = running(second)
    try:
        assert second.reconciler.records[a["metadata"]["uid"]].handle in store
        assert [c for c in second._made[0].calls if c[0] in ("add", "update", "remove")] == []
        assert next(iter(store.values())).exclude_outbound_ports == ()
        assert not [e for e in kube.events[reported:] if e["reason"] == "CaptureReady"]
    finally:
        run.close()


# ------------------------------------------------------------------------------------ item 6, #22.3

def test_pod_that_cannot_be_programmed_is_refused_with_one_event_and_backoff(kube, proc):
    a = kube.add(fixture_pod(INJECTED, "a", NODE, ["10.0.7.1"], annotations=OPT_IN))
    proc.start(a["metadata"]["uid"])
    store: dict = {}
    agent = make_agent(proc, store)
    run = running(agent, failure_backoff=0.2, failure_backoff_max=0.8)
    try:
        wait_for(lambda: len(store) == 1)
        dp = agent._made[0]
        dp.capacity = 1      # the maps are full from now on
        b = fixture_pod(INJECTED, "b", NODE, ["10.0.7.2"], annotations=OPT_IN)
        b_key = os.stat(proc.root / str(proc.start(b["metadata"]["uid"])) / "ns" / "net").st_ino
        kube.add(b)
        wait_for(lambda: events(kube, "b", "CaptureFailed"), what="CaptureFailed")
        (cgroup,) = dp.denies       # refused: a deny on the pod's own cgroup and netns
        assert cgroup == zlib.crc32(agent.reconciler.states[b["metadata"]["uid"]].cgroup_path.encode())
        assert b["metadata"]["uid"].replace("-", "_") in agent.reconciler.states[b["metadata"]["uid"]].cgroup_path
        t0, steps = time.monotonic(), run.steps

        def attempts() -> int:
            return sum(1 for c in dp.calls if c == ("add", b_key))
        wait_for(lambda: attempts() >= 3 and run.steps >= steps + 30, what="two retries, 30 loop turns")
        # backoff 0.2, 0.4, 0.8, 0.8 ...: never more than one try per 0.2 s since the refusal (load
        # only stretches the time), where one try per 50 ms loop turn would be four times that
        tries, elapsed = attempts(), time.monotonic() - t0
        assert tries <= 2 + elapsed / 0.2, (tries, elapsed)
        (ev,) = events(kube, "b", "CaptureFailed")       # one Event per state change, not per retry
        assert ev["type"] == "Warning" and "maps are full" in ev["message"] and "refused" in ev["message"]
        view = pod_view(agent, "b")
        assert view["state"] == "failed" and "maps are full" in view["error"]
        # gauges are refreshed every 2 s of the loop: wait for it, as for anything else
        def failed_gauge() -> str:
            text = get(agent, "/metrics")[1]
            return text if "istio_ebpf_pods_failed 1.0" in text else ""
        text = wait_for(failed_gauge, what="the failed-pods gauge")
        assert 'istio_ebpf_pod_capture_failures_total{reason="maps_full"}' in text
        assert 'istio_ebpf_pod_state{namespace="default",pod="b",state="failed"} 1.0' in text
        out = subprocess.run([sys.executable, "-m", "istio_ebpf_plugin.cli", "pods", "--agent",
                              f"http://127.0.0.1:{agent.server.port}"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and "failed" in out.stdout and "maps are full" in out.stdout, out

        dp.capacity = None   # space again: the next retry captures it and lifts the deny
        wait_for(lambda: len(store) == 2 and events(kube, "b", "CaptureReady"), timeout=15, what="b captured")
        assert dp.denies == set() and ("allow", cgroup) in dp.calls
        wait_for(lambda: "istio_ebpf_pods_failed 0.0" in get(agent, "/metrics")[1], what="metric back to 0")
    finally:
        run.close()


def test_invalid_annotation_on_a_new_sandbox_refuses_it(kube, proc):
    p = fixture_pod(INJECTED, "typo", NODE, ["10.0.8.1"], annotations=dict(
        OPT_IN, **{"traffic.sidecar.istio.io/excludeOutboundPorts": "53,dns"}))
    proc.start(p["metadata"]["uid"])
    kube.add(p)
    store: dict = {}
    agent = make_agent(proc, store)
    run = running(agent, failure_backoff=0.2)
    try:
        wait_for(lambda: events(kube, "typo", "CaptureFailed"), what="CaptureFailed")
        dp = agent._made[0]
        assert not store and len(dp.denies) == 1
        assert "'dns' is not a port" in events(kube, "typo", "CaptureFailed")[0]["message"]
        # fixed on the same (never captured) sandbox: captured at once, deny lifted
        kube.modify(p["metadata"]["uid"], annotations={"traffic.sidecar.istio.io/excludeOutboundPorts": "53"})
        wait_for(lambda: len(store) == 1 and not dp.denies, what="captured after the fix")
        # deleted while failed: the deny goes with it
        dp.capacity = 0
        q = fixture_pod(INJECTED, "q", NODE, ["10.0.8.2"], annotations=OPT_IN)
        proc.start(q["metadata"]["uid"])
        kube.add(q)
        wait_for(lambda: len(dp.denies) == 1)
        kube.delete_pod(q["metadata"]["uid"])
        wait_for(lambda: not dp.denies, what="deny removed with the pod")
    finally:
        run.close()


def test_capture_ready_event_names_mode_and_time_since_sandbox_start(kube, tmp_path, monkeypatch):
    """A real pod-like cgroup (a child of the cgroup v2 root) with a process started 0.5 s ago:
    the locator's sandbox age is that process's age, from the kernel's start time."""
    root = find_cgroup2()
    assert root is not None
    cg = Path(root) / f"istio-ebpf-test-age-{uuid.uuid4().hex[:8]}"
    cg.mkdir()
    started = time.monotonic()
    child = subprocess.Popen(["sleep", "60"])
    try:
        (cg / "cgroup.procs").write_text(str(child.pid))
        time.sleep(0.5)
        netns = f"/proc/{child.pid}/ns/net"
        where = PodLocation(str(cg), netns, child.pid, os.stat(netns).st_ino)
        start = PodLocator().sandbox_started(where)
        assert start is not None
        age = boot_seconds() - start
        assert age is not None and 0.45 <= age <= time.monotonic() - started + 0.02, age   # 10 ms ticks
    finally:
        child.kill()
        child.wait()
        wait_for(lambda: not (cg / "cgroup.procs").read_text().strip(), what="cgroup empty")
        cg.rmdir()
    # Through the agent: CaptureReady says the mode and the time since the sandbox started.
    FakeProc.in_our_userns(monkeypatch)
    proc = FakeProc(tmp_path / "proc")
    a = kube.add(fixture_pod(INJECTED, "a", NODE, ["10.0.9.1"], annotations=OPT_IN))
    proc.start(a["metadata"]["uid"], started=boot_seconds() - 2.0)
    agent = make_agent(proc, {}, mode="podip")
    run = running(agent)
    try:
        wait_for(lambda: events(kube, "a", "CaptureReady"))
        (ev,) = events(kube, "a", "CaptureReady")
        assert ev["type"] == "Normal" and "podip mode" in ev["message"], ev
        took = float(ev["message"].split("entries written ")[1].split(" s after the sandbox started")[0])
        assert 2.0 <= took < 30, ev
        assert pod_view(agent, "a")["capture_seconds"] == round(took, 3) or abs(
            pod_view(agent, "a")["capture_seconds"] - took) < 0.01
    finally:
        run.close()


# ------------------------------------------------------------------------------------ #22.4, metrics

def test_pods_view_cli_and_per_pod_metrics(kube, proc, capsys):
    a = kube.add(fixture_pod(INJECTED, "a", NODE, ["10.0.10.1"], annotations=OPT_IN, namespace="shop"))
    pending = kube.add(fixture_pod(INJECTED, "later", NODE, [], annotations=OPT_IN, namespace="shop"))
    proc.start(a["metadata"]["uid"])
    store: dict = {}
    agent = make_agent(proc, store)
    run = running(agent, agent_namespace=AGENT_NS)
    try:
        wait_for(lambda: len(store) == 1)
        dp = agent._made[0]
        dp.per_pod[next(iter(store))] = {"out_redirect": 5, "in_redirect": 2}
        url = f"http://127.0.0.1:{agent.server.port}"
        series = 'istio_ebpf_pod_datapath_total{counter="out_redirect",namespace="shop",pod="a"} 5.0'
        wait_for(lambda: series in get(agent, "/metrics")[1], timeout=10, what="the pod's counter series")
        text = get(agent, "/metrics")[1]
        assert 'istio_ebpf_pod_state{namespace="shop",pod="a",state="captured"} 1.0' in text
        assert 'istio_ebpf_pod_state{namespace="shop",pod="later",state="pending"} 1.0' in text

        assert cli_main(["pods", "--json", "--agent", url]) == 0
        answer = json.loads(capsys.readouterr().out)
        assert answer["node"] == NODE and answer["mode"] == "cookie" and not answer["draining"]
        by_name = {p["name"]: p for p in answer["pods"]}
        assert by_name["a"]["state"] == "captured" and by_name["a"]["counters"] == {"in_redirect": 2,
                                                                                   "out_redirect": 5}
        assert by_name["later"]["state"] == "pending" and by_name["later"]["error"] == "no pod IP yet"
        assert cli_main(["pods", "--agent", url]) == 0
        table = capsys.readouterr().out.splitlines()
        assert table[0] == f"node {NODE}: mode cookie"
        assert table[1].split() == ["NAMESPACE", "POD", "MODE", "STATE", "CAPTURED", "IN", "LAST", "ERROR",
                                    "COUNTERS"]
        row = next(r.split() for r in table if r.startswith("shop") and " a " in r)
        assert row[:4] == ["shop", "a", "cookie", "captured"] and row[-2:] == ["in_redirect=2", "out_redirect=5"]

        # The uninstall drain: `istio-ebpf uninstall` marks the agent pods; this agent sees its own
        # pod's mark through its pod watch (a mark in another namespace is not the agent's).
        other = kube.add({"metadata": {"name": "x", "namespace": "shop", "uid": "x-uid",
                                       "annotations": {DRAINING_ANNOTATION: "2026-01-01T00:00:00Z"}},
                          "spec": {"nodeName": NODE}, "status": {"phase": "Running"}})
        own = kube.add({"metadata": {"name": "istio-ebpf-agent-abcde", "namespace": AGENT_NS, "uid": "agent-uid",
                                     "annotations": {}}, "spec": {"nodeName": NODE}, "status": {"phase": "Running"}})
        kube.modify(own["metadata"]["uid"], annotations={DRAINING_ANNOTATION: "2026-01-01T00:00:00Z"})
        wait_for(lambda: pod_view(agent, "a")["state"] == "draining", what="draining")
        assert cli_main(["pods", "--agent", url]) == 0
        assert capsys.readouterr().out.splitlines()[0] == f"node {NODE}: mode cookie, draining"
        kube.modify(own["metadata"]["uid"], annotations={DRAINING_ANNOTATION: None})   # install cancels it
        wait_for(lambda: pod_view(agent, "a")["state"] == "captured", what="drain cancelled")
        kube.modify(own["metadata"]["uid"], annotations={DRAINING_ANNOTATION: "2026-01-01T00:00:00Z"})
        wait_for(lambda: agent.draining, what="draining again")
        kube.delete_pod(own["metadata"]["uid"])
        wait_for(lambda: not agent.draining, what="the marked agent pod gone")   # "x"'s mark is not ours
        kube.delete_pod(other["metadata"]["uid"])

        kube.delete_pod(a["metadata"]["uid"])
        kube.delete_pod(pending["metadata"]["uid"])
        wait_for(lambda: 'pod="a"' not in get(agent, "/metrics")[1], what="the pod's series gone")
        assert "istio_ebpf_pod_state{" not in get(agent, "/metrics")[1]
        assert cli_main(["pods", "--agent", url]) == 0
        assert "(no opted-in pod on this node)" in capsys.readouterr().out
    finally:
        run.close()
    assert cli_main(["pods", "--agent", "http://127.0.0.1:9"]) == 1     # no agent: one line, exit 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no agent answers at http://127.0.0.1:9" in err[0] and "kubectl exec" in err[0]


# ------------------------------------------------------------------------------------ item 9

def test_listener_lookup_of_a_process_that_exited_between_listing_and_stat(monkeypatch):
    """refresh_listeners lists /proc, then stats each pod's /proc/<pid>/ns/net: a pid that exits in
    between must not raise (it escaped NodeAgent.step and ended the agent)."""
    from istio_ebpf_plugin.datapath import listeners

    child = subprocess.Popen(["unshare", "--net", "sleep", "60"])
    path = f"/proc/{child.pid}/ns/net"
    wait_for(lambda: os.stat(path).st_ino != os.stat("/proc/self/ns/net").st_ino, what="own netns")
    listing = listeners.processes_by_netns

    def list_then_exit(root: str = "/proc"):
        found = listing(root)
        child.kill()
        child.wait()
        return found

    monkeypatch.setattr(listeners, "processes_by_netns", list_then_exit)
    by_netns = listeners.processes_by_netns()
    assert list(listeners.find_listeners(path, 15006, by_netns=by_netns)) == []


def test_agent_step_survives_a_failing_listener_refresh(kube, proc):
    store: dict = {}
    a = kube.add(fixture_pod(INJECTED, "a", NODE, ["10.0.11.1"], annotations=OPT_IN))
    pid = proc.start(a["metadata"]["uid"])
    agent = make_agent(proc, store, mode="podip")
    agent.config.listener_refresh_seconds = 0.05
    seen: list[dict] = []

    def refresh(paths):
        seen.append(dict(paths))
        raise FileNotFoundError(2, "No such file or directory", "/proc/1/ns/net")

    run = running(agent)
    try:
        agent._made[0].refresh_listeners = refresh
        wait_for(lambda: len(store) == 1 and len(seen) >= 2, what="refreshes")
        # The pod's recorded process exits; another one of the pod (same netns) stands in.
        uid = a["metadata"]["uid"]
        old_ino = agent.reconciler.states[uid].netns_inode
        twin = proc.root / str(pid + 500)
        (twin / "ns").mkdir(parents=True)
        os.link(proc.root / str(pid) / "ns" / "net", twin / "ns" / "net")    # same inode: same netns
        (twin / "cgroup").write_text((proc.root / str(pid) / "cgroup").read_text())
        proc.stop(pid)
        n = len(seen)
        wait_for(lambda: len(seen) > n + 1, what="more refreshes")
        assert run.thread.is_alive() and agent.healthy()[0]
        assert list(seen[-1].values()) == [str(twin / "ns" / "net")]
        assert agent.reconciler.states[uid].netns_inode == old_ino and len(store) == 1
    finally:
        run.close()


def test_a_new_pods_listener_is_looked_for_often_until_found(kube, proc):
    """Pod-IP mode finds Envoy's 15006 socket from /proc. A pod is added when its sandbox is up, and
    its Envoy listens only after the init containers: found by the 5 s refresh, the pod was Ready
    with inbound refused for up to 5 s (the node e2e's recreated client, connection refused).
    A captured pod with no listener is looked at every listener_pending_seconds; once found, only
    the full refresh looks at it."""
    store: dict = {}
    a = kube.add(fixture_pod(INJECTED, "a", NODE, ["10.0.12.1"], annotations=OPT_IN))
    proc.start(a["metadata"]["uid"])
    agent = make_agent(proc, store, mode="podip")
    agent.config.listener_refresh_seconds = 3600.0     # only the pending look can find it here
    agent.config.listener_pending_seconds = 0.05
    run = running(agent)
    try:
        wait_for(lambda: len(store) == 1, what="pod captured")
        dp = agent._made[0]
        (handle,) = store
        wait_for(lambda: sum(handle in r for r in dp.listener_refreshes) >= 3, what="pending looks")
        wait_for(lambda: (pod_view(agent, "a") or {}).get("state") == "captured", what="/pods shows a captured")
        assert pod_view(agent, "a")["inbound_listener"] is False    # captured, inbound refused until found
        dp.listeners[handle] = 2                  # Envoy listens (IPv4 + IPv6)
        wait_for(lambda: handle in agent._listening, what="listener registered")
        wait_for(lambda: pod_view(agent, "a")["inbound_listener"] is True, what="/pods shows the listener")
        n = len(dp.listener_refreshes)
        time.sleep(0.5)                           # ten pending periods: nothing left to look for
        assert len(dp.listener_refreshes) == n
        assert run.thread.is_alive() and agent.healthy()[0]
    finally:
        run.close()
