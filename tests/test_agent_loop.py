"""The agent's loop against the fake API (real fixture pods) and a recording datapath.

The kernel side of the same flows is in test_agent_kernel.py; here the point is
the control logic: list/watch/bookmark/410/resync, pod -> entries, restarts,
IP reuse, pending pods, config errors, health and metrics, all through the
real NodeAgent with only kube_api and the datapath object replaced.
"""

from __future__ import annotations

import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from istio_ebpf_plugin import NODE_MODE_LABEL
from support.fake_kube import FakeKube, fixture_pod
from istio_ebpf_plugin.datapath import userns
from istio_ebpf_plugin.agent.locate import PodLocator
from istio_ebpf_plugin.datapath import probe
from istio_ebpf_plugin.agent.node_agent import REASON_ANNOTATION, AgentConfig, NodeAgent
from support.polling import wait_for
from support.recording_datapath import RecordingDatapath, recording_factory

NODE = "node-a"
OPT_IN = {"istio-ebpf.io/redirect": "ebpf"}
ALL_OK = {name: True for name in list(probe._PROBES) + ["cgroup_v2", "bpffs", "so_netns_cookie", "bcc_compile"]}


class FakeProc:
    """A /proc tree with kubelet-style cgroup lines (systemd driver) and ns/net inodes.

    Its ns/net files are plain files, not namespaces: ``in_our_userns`` makes the agent take
    them as network namespaces of its own user namespace (pods with host users)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.next_pid = 1000

    @staticmethod
    def in_our_userns(monkeypatch) -> None:
        own = os.stat("/proc/self/ns/user")
        monkeypatch.setattr(userns, "owner_userns", lambda path: (own.st_dev, own.st_ino))

    def start(self, uid: str, qos: str = "besteffort", started: float | None = None) -> int:
        """A pod's process; ``started``: its start time on CLOCK_BOOTTIME (default: now)."""
        pid = self.next_pid
        self.next_pid += 1
        d = self.root / str(pid)
        (d / "ns").mkdir(parents=True)
        (d / "ns" / "net").write_text("")   # its inode stands for the netns identity
        ticks = round((time.clock_gettime(time.CLOCK_BOOTTIME) if started is None else started) * 100)
        (d / "stat").write_text(f"{pid} (pause) S 1 {pid} {pid} 0 -1 4194560 {' '.join(['0'] * 12)} {ticks} 0 0\n")
        slice_ = f"kubepods-{qos}-pod{uid.replace('-', '_')}.slice"
        (d / "cgroup").write_text(f"0::/kubepods.slice/kubepods-{qos}.slice/{slice_}/cri-containerd-{pid:x}.scope\n")
        return pid

    def stop(self, pid: int) -> None:
        import shutil
        shutil.rmtree(self.root / str(pid))


@pytest.fixture
def kube(monkeypatch):
    return FakeKube(NODE).install(monkeypatch)


@pytest.fixture
def proc(tmp_path, monkeypatch):
    FakeProc.in_our_userns(monkeypatch)
    return FakeProc(tmp_path / "proc")


class Running:
    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent
        self.stop = threading.Event()
        self.steps = 0           # loop iterations: "N more steps" is an event, a sleep is not
        agent.start()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.is_set():
            self.agent.step(0.05)
            self.steps += 1

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.agent.shutdown()



def make_agent(proc: FakeProc, store: dict, mode: str | None = None, release="6.8.0-1015-gke",
               features=None, port=0):
    cfg = AgentConfig(node_name=NODE, mode_override=mode, pin_root="/nonexistent/test-pins",
                      cgroup_root="/sys/fs/cgroup/unified/kubepods-test", proc_root=str(proc.root),
                      host="127.0.0.1", port=port, resync_seconds=300, retry_seconds=0.05, watch_timeout=1,
                      kernel_release=release, features=features or dict(ALL_OK))
    made: list[RecordingDatapath] = []
    agent = NodeAgent(cfg, recording_factory(made, store))
    agent._made = made
    return agent


def events_applied(kube: FakeKube, agent: NodeAgent) -> None:
    """Wait until the agent has applied every watch event sent so far. They arrive and are
    dispatched in order, so a marker pod (opted in, no IP yet: it only goes pending) sent after
    them marks the point; a state that must NOT change can then be asserted without a sleep."""
    marker = kube.add(fixture_pod("master/inject/hello.yaml.injected", f"mark-{kube.rv}", NODE, [],
                                  annotations=OPT_IN))
    wait_for(lambda: marker["metadata"]["uid"] in agent.reconciler.pending, what="the marker pod (events applied)")


def get(agent: NodeAgent, path: str) -> tuple[int, str]:
    url = f"http://127.0.0.1:{agent.server.port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_pods_followed_through_watch_events(kube, proc):
    a = kube.add(fixture_pod("master/inject/traffic-annotations.yaml.injected", "a", NODE, ["10.0.0.5"],
                             annotations=OPT_IN))
    plain = kube.add(fixture_pod("master/inject/hello.yaml.injected", "plain", NODE, ["10.0.0.6"]))
    elsewhere = kube.add(fixture_pod("master/inject/hello.yaml.injected", "other-node", "node-b",
                                     ["10.0.1.6"], annotations=OPT_IN))
    for p in (a, plain, elsewhere):
        proc.start(p["metadata"]["uid"])
    store: dict = {}
    agent = make_agent(proc, store)
    run = Running(agent)
    try:
        assert get(agent, "/healthz")[0] == 200
        wait_for(lambda: agent.synced, what="first resync")
        assert get(agent, "/readyz") == (200, "cookie: attached, 1 pods\n")
        assert kube.node_labels[NODE_MODE_LABEL] == "cookie"
        assert "all probes passed" in kube.node_annotations[REASON_ANNOTATION]
        assert any(e["reason"] == "CaptureMode" and e["involvedObject"]["kind"] == "Node" for e in kube.events)
        dp = agent._made[0]
        assert dp.attached == ["/sys/fs/cgroup/unified/kubepods-test"]
        (cfg,) = store.values()
        assert cfg.exclude_outbound_ports == (7, 8, 9) and str(cfg.pod_ips[0]) == "10.0.0.5"

        # ADDED (templates opt-in, CNI-style annotations), with its process already running
        b = fixture_pod("master/inject/hello.yaml.cni.injected", "b", NODE, ["10.0.0.7", "fd00::7"],
                        annotations={"inject.istio.io/templates": "sidecar,ebpf"})
        proc.start(b["metadata"]["uid"])
        kube.add(b)
        wait_for(lambda: len(store) == 2, what="pod b added")

        # MODIFIED on a running pod: capture is fixed per sandbox; the pod is told when it applies
        kube.modify(a["metadata"]["uid"], annotations={"traffic.sidecar.istio.io/excludeOutboundPorts": "7,8,9,5432"})
        wait_for(lambda: any(e["reason"] == "CaptureUnchanged" for e in kube.events), what="the Event")
        assert sorted(c.exclude_outbound_ports for c in store.values()) == [(), (7, 8, 9)]
        assert not [c for c in dp.calls if c[0] == "update"]

        # BOOKMARK moves the resourceVersion; the next watch starts from it
        kube.bookmark()
        wait_for(lambda: agent.watcher.resource_version == str(kube.rv), what="bookmark rv")

        # opting out keeps the running sandbox captured; DELETED removes the entries
        kube.modify(b["metadata"]["uid"], annotations={"inject.istio.io/templates": "sidecar"})
        wait_for(lambda: sum(e["reason"] == "CaptureUnchanged" for e in kube.events) == 2, what="opt-out Event")
        assert len(store) == 2
        kube.delete_pod(a["metadata"]["uid"])
        wait_for(lambda: len(store) == 1, what="delete a")
        kube.delete_pod(b["metadata"]["uid"])
        wait_for(lambda: len(store) == 0, what="delete b")

        code, text = get(agent, "/metrics")
        assert code == 200 and "istio_ebpf_pods_managed" in text
        assert 'istio_ebpf_probe_result{feature="sockops_netns_cookie"} 1.0' in text
        assert "istio_ebpf_captured_connections 10.0" in text  # out_redirect + in_redirect_local
    finally:
        run.close()
    assert agent._made[0].closed is False   # SIGTERM path keeps the pins


def test_410_gone_relists_and_converges(kube, proc):
    pods = [kube.add(fixture_pod("master/inject/hello.yaml.injected", f"p{i}", NODE, [f"10.0.0.{10 + i}"],
                                 annotations=OPT_IN)) for i in range(3)]
    for p in pods:
        proc.start(p["metadata"]["uid"])
    store: dict = {}
    agent = make_agent(proc, store)
    run = Running(agent)
    try:
        wait_for(lambda: agent.synced and len(store) == 3, what="3 pods")
        lists_before = kube.list_calls
        # The watch is cut with 410 while, unseen by the agent, one pod went away and one came
        gone = pods[0]["metadata"]["uid"]
        kube.pods.pop(gone)
        new = fixture_pod("master/inject/hello.yaml.injected", "late", NODE, ["10.0.0.99"], annotations=OPT_IN)
        proc.start(new["metadata"]["uid"])
        kube.pods[new["metadata"]["uid"]] = new
        kube.expire()
        wait_for(lambda: kube.list_calls > lists_before, what="relist after 410")
        wait_for(lambda: sorted(str(c.pod_ips[0]) for c in store.values()) == ["10.0.0.11", "10.0.0.12", "10.0.0.99"],
                 what="converged after relist")
        assert agent.watcher.lists >= 2
        assert 'istio_ebpf_pod_relists_total{reason="gone"} 1.0' in get(agent, "/metrics")[1]
    finally:
        run.close()


def test_restart_adopts_pins_and_removes_entries_of_vanished_pods(kube, proc):
    live = kube.add(fixture_pod("master/inject/hello.yaml.injected", "live", NODE, ["10.0.0.20"], annotations=OPT_IN))
    dead = fixture_pod("master/inject/hello.yaml.injected", "dead", NODE, ["10.0.0.21"], annotations=OPT_IN)
    proc.start(live["metadata"]["uid"])
    proc.start(dead["metadata"]["uid"])
    kube.add(dead)
    store: dict = {}   # stands for the pinned maps: it survives the agent
    first = make_agent(proc, store)
    run = Running(first)
    wait_for(lambda: len(store) == 2, what="both pods")
    run.stop.set()
    run.thread.join(5)   # "kill -9": no shutdown, no cleanup
    first.watcher.stop()
    first.server.stop()
    first.lock.release()     # a dead process's abstract socket goes with it
    kube.pods.pop(dead["metadata"]["uid"])   # deleted while no agent ran
    second = make_agent(proc, store)
    assert not second.ready()[0]
    run2 = Running(second)
    try:
        wait_for(lambda: second.synced, what="resync")
        assert [str(c.pod_ips[0]) for c in store.values()] == ["10.0.0.20"]
        assert second.reconciler.stale_removed == 1
        assert second.ready() == (True, "cookie: attached, 1 pods")
    finally:
        run2.close()


def test_pending_pod_is_programmed_when_its_process_appears(kube, proc):
    store: dict = {}
    agent = make_agent(proc, store)
    run = Running(agent)
    try:
        wait_for(lambda: agent.synced)
        p = fixture_pod("master/inject/hello.yaml.injected", "slow", NODE, [], annotations=OPT_IN)
        kube.add(p)   # scheduled, no IP, no sandbox
        wait_for(lambda: p["metadata"]["uid"] in agent.reconciler.pending)
        kube.modify(p["metadata"]["uid"], ips=["10.0.0.30"])
        events_applied(kube, agent)
        steps = run.steps
        wait_for(lambda: run.steps >= steps + 5, what="a few retries of the pending pods")
        assert not store   # IP but no process yet: still pending
        proc.start(p["metadata"]["uid"])
        wait_for(lambda: len(store) == 1, what="retry picked the pod up")
        assert p["metadata"]["uid"] not in agent.reconciler.pending
    finally:
        run.close()


def test_capture_latency_of_pods_started_while_the_agent_ran(kube, proc):
    """istio_ebpf_pod_capture_seconds: sandbox start -> entries written; adopted pods are not counted."""
    old = kube.add(fixture_pod("master/inject/hello.yaml.injected", "old", NODE, ["10.0.0.50"], annotations=OPT_IN))
    proc.start(old["metadata"]["uid"], started=time.clock_gettime(time.CLOCK_BOOTTIME) - 100)
    store: dict = {}
    agent = make_agent(proc, store)
    run = Running(agent)
    try:
        wait_for(lambda: agent.synced and len(store) == 1, what="the old pod")
        assert "istio_ebpf_pod_capture_seconds_count 0.0" in get(agent, "/metrics")[1]
        new = fixture_pod("master/inject/hello.yaml.injected", "new", NODE, [], annotations=OPT_IN)
        proc.start(new["metadata"]["uid"])       # sandbox up; its IP reaches the API later
        kube.add(new)
        wait_for(lambda: new["metadata"]["uid"] in agent.reconciler.pending)
        time.sleep(0.3)
        kube.modify(new["metadata"]["uid"], ips=["10.0.0.51"])
        wait_for(lambda: len(store) == 2, what="the new pod")
        text = get(agent, "/metrics")[1]
        assert "istio_ebpf_pod_capture_seconds_count 1.0" in text
        latency = float(next(line.split()[1] for line in text.splitlines()
                             if line.startswith("istio_ebpf_pod_capture_seconds_sum")))
        assert 0.3 <= latency < 60, latency
    finally:
        run.close()


def test_pod_ip_reused_by_a_new_pod_podip_mode(kube, proc):
    """Pod-IP mode keys pods by their cgroup: a new pod with an old pod's IP is a new entry, and
    the old pod's late DELETED removes only its own."""
    store: dict = {}
    agent = make_agent(proc, store, mode="podip")
    run = Running(agent)
    try:
        wait_for(lambda: agent.synced)
        old = fixture_pod("master/inject/hello.yaml.injected", "old", NODE, ["10.0.0.40"], annotations=OPT_IN)
        proc.start(old["metadata"]["uid"])
        kube.add(old)
        wait_for(lambda: len(store) == 1)
        # The new pod with the same IP arrives before the old one's DELETED (events can be that late)
        new = fixture_pod("master/inject/traffic-annotations.yaml.injected", "new", NODE, ["10.0.0.40"],
                          annotations=OPT_IN)
        proc.start(new["metadata"]["uid"])
        kube.add(new)
        wait_for(lambda: len(store) == 2)
        kube.delete_pod(old["metadata"]["uid"])
        wait_for(lambda: len(store) == 1)
        ((handle, cfg),) = store.items()
        assert cfg.exclude_outbound_ports == (7, 8, 9)
        assert agent.reconciler.owners[handle] == new["metadata"]["uid"]
    finally:
        run.close()


def test_invalid_annotation_keeps_last_good_config_and_raises_event(kube, proc):
    p = kube.add(fixture_pod("master/inject/hello.yaml.injected", "typo", NODE, ["10.0.0.50"], annotations=OPT_IN))
    proc.start(p["metadata"]["uid"])
    store: dict = {}
    agent = make_agent(proc, store)
    run = Running(agent)
    try:
        wait_for(lambda: len(store) == 1)
        kube.modify(p["metadata"]["uid"], annotations={"traffic.sidecar.istio.io/excludeOutboundPorts": "53,dns"})
        wait_for(lambda: any(e["reason"] == "InvalidTrafficAnnotation" for e in kube.events))
        ev = next(e for e in kube.events if e["reason"] == "InvalidTrafficAnnotation")
        assert ev["type"] == "Warning" and "'dns' is not a port" in ev["message"] and "last good" in ev["message"]
        assert ev["involvedObject"]["uid"] == p["metadata"]["uid"]
        (cfg,) = store.values()
        assert cfg.exclude_outbound_ports == ()   # the last good configuration stays
        assert "istio_ebpf_pod_config_errors_total 1.0" in get(agent, "/metrics")[1]
    finally:
        run.close()


def test_unsupported_kernel_publishes_and_loads_nothing(kube, proc):
    store: dict = {}
    agent = make_agent(proc, store, release="4.18.0-477.27.1.el8_8.x86_64")
    kube.fail_patch = 1    # the API hiccups once: publishing is retried
    run = Running(agent)
    try:
        wait_for(lambda: agent.published, what="published after retry")
        assert kube.node_labels[NODE_MODE_LABEL] == "unsupported"
        assert "4.18.0-477.27.1.el8_8.x86_64 -> unsupported" in kube.node_annotations[REASON_ANNOTATION]
        assert agent._made == []
        code, text = get(agent, "/readyz")
        assert code == 200 and text.startswith("unsupported")
        ev = next(e for e in kube.events if e["reason"] == "CaptureUnsupported")
        assert ev["type"] == "Normal"   # the kernel says so: expected, not a fallback
    finally:
        run.close()


def test_failed_probe_falls_back_and_says_so_everywhere(kube, proc):
    store: dict = {}
    agent = make_agent(proc, store, features=dict(ALL_OK, sockops_netns_cookie=False))
    run = Running(agent)
    try:
        wait_for(lambda: agent.published)
        assert kube.node_labels[NODE_MODE_LABEL] == "podip"
        reason = kube.node_annotations[REASON_ANNOTATION]
        assert "sockops_netns_cookie" in reason
        ev = next(e for e in kube.events if e["reason"] == "CaptureMode")
        assert ev["type"] == "Warning" and "podip" in ev["message"]
        assert agent._made[0].mode == "podip"
        text = get(agent, "/metrics")[1]
        assert "istio_ebpf_fallback{reason=" in text
        assert 'istio_ebpf_probe_result{feature="sockops_netns_cookie"} 0.0' in text
    finally:
        run.close()


def test_locator_reads_kubelet_cgroup_paths(tmp_path, monkeypatch):
    proc = FakeProc(tmp_path / "proc")
    uid = "7f0c2b8e-1d2a-4c8e-9a51-0b3d2f6e4a10"
    monkeypatch.setattr(PodLocator, "INDEX_TTL", 0.0)  # every locate() sees the current tree
    pid = proc.start(uid, qos="burstable")
    loc = PodLocator(str(proc.root), "/sys/fs/cgroup").locate(uid)
    assert loc.pid == pid and loc.netns_path == str(proc.root / str(pid) / "ns" / "net")
    assert loc.cgroup_path == ("/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/"
                               "kubepods-burstable-pod7f0c2b8e_1d2a_4c8e_9a51_0b3d2f6e4a10.slice")
    # cgroupfs driver spelling
    d = proc.root / "4242"
    (d / "ns").mkdir(parents=True)
    (d / "ns" / "net").write_text("")
    (d / "cgroup").write_text(f"12:memory:/kubepods/burstable/pod{uid}\n0::/kubepods/burstable/pod{uid}/abc\n")
    proc.stop(pid)
    loc = PodLocator(str(proc.root), "/sys/fs/cgroup").locate(uid)
    assert loc.pid == 4242 and loc.cgroup_path == f"/sys/fs/cgroup/kubepods/burstable/pod{uid}"
    assert PodLocator(str(proc.root)).locate("no-such-uid") is None


def test_pod_events_wait_while_held_and_all_go_afterwards(kube):
    """A full resync holds pod Events back (their API round trips would slow it); none is lost."""
    from istio_ebpf_plugin.agent.pod_events import PodEvents

    events = PodEvents()
    pod = fixture_pod("master/inject/hello.yaml.injected", "p", NODE, ["10.0.0.9"])
    try:
        with events.held():
            for i in range(3):
                events.post(pod, "Normal", "CaptureReady", f"ready {i}")
            wait_for(lambda: events._queue.qsize() == 2, what="the sender holding the first Event")
            assert kube.events == [] and events.sent == 0
        assert events.flush(10)
        assert [e["message"] for e in kube.events if e["reason"] == "CaptureReady"] == ["ready 0", "ready 1", "ready 2"]
    finally:
        events.stop()
