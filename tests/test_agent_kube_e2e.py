"""The node agent against a real kube-apiserver 1.20.2, with the token of its own ServiceAccount.

The agent's RBAC objects are applied from manifests/ as they ship, so the real authorizer decides
every call. Pods are real Pod objects (Istio 1.14.0's injected fixtures: 1.20 rejects the native
sidecars of newer ones) bound to a Node object; there is no kubelet, so the test patches their
status.podIP as the kubelet would, and the agent finds their processes in a /proc tree written
the way kubelet names pod cgroups (FakeProc). The datapath is the recording one of
test_agent_loop.py, except in the last test: harness pods (netns + cgroup v2 + real Envoy) with
the real datapath, the real locator and real traffic, their Pod objects on the real apiserver
and their processes in cgroups named the way kubelet names them (kubepods/pod<uid>).
"""

from __future__ import annotations

import copy
import time
import uuid

import pytest

from support.fake_kube import fixture_pod
from istio_ebpf_plugin import DRAINING_ANNOTATION, NODE_MODE_LABEL, kube_api
from istio_ebpf_plugin.agent import node_agent
from istio_ebpf_plugin.agent.node_agent import NodeAgent
from istio_ebpf_plugin.install import manifests
from support.polling import wait_for
from test_agent_kernel import PORT, agent_config, cluster, outbound_requests, wait_outbound_logged  # noqa: F401
from test_agent_loop import FakeProc, Running, get, make_agent

AGENT_NS = "istio-ebpf-system"
OPT_IN = {"istio-ebpf.io/redirect": "ebpf"}


def _eventually(cond, timeout: float, what: str) -> None:
    wait_for(cond, timeout, what, interval=0.2)   # conditions that ask the apiserver or the agent's port


@pytest.fixture
def world(kube_control_plane, monkeypatch, tmp_path):
    """RBAC from manifests/, a Node, a namespace for pods, and KUBECONFIG = the agent's own token."""
    cp = kube_control_plane
    token = uuid.uuid4().hex[:6]
    node, ns = f"agent-e2e-{token}", f"pods-{token}"
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(cp.kubeconfig))
    monkeypatch.setattr(kube_api, "_backend_override", None)
    rbac = [d for d in manifests.agent_documents() if d.kind not in ("DaemonSet", "Service")]
    for doc in rbac:
        kube_api.apply_object(doc.data)
    assert cp.request("POST", "/api/v1/nodes",
                      {"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}})[0] == 201
    assert cp.request("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                     "metadata": {"name": ns}})[0] == 201
    _eventually(lambda: cp.default_service_account_ready(ns),
                60, "the default ServiceAccount")
    agent_token = cp.service_account_token(AGENT_NS, "istio-ebpf-agent")
    monkeypatch.setenv("KUBECONFIG", str(cp.write_kubeconfig(tmp_path / "agent.kubeconfig", agent_token, "agent")))
    FakeProc.in_our_userns(monkeypatch)
    proc = FakeProc(tmp_path / "proc")
    yield cp, node, ns, proc
    cp.request("DELETE", f"/api/v1/namespaces/{ns}")
    cp.request("DELETE", f"/api/v1/nodes/{node}")


def agent_for(node: str, proc: FakeProc, store: dict, **cfg) -> NodeAgent:
    agent = make_agent(proc, store)
    agent.config.node_name = node
    for k, v in cfg.items():
        setattr(agent.config, k, v)
    return agent


def create_pod(cp, ns: str, node: str, name: str, ip: str | list[str], proc: FakeProc | None,
               fixture: str = "v1.14.0/inject/traffic-annotations.yaml.injected",
               annotations: dict[str, str] | None = None) -> dict:
    """A Pod object bound to ``node``, then its status as the kubelet would write it."""
    ips = [ip] if isinstance(ip, str) else ip
    pod = fixture_pod(fixture, name, node, ips, namespace=ns,
                      annotations=OPT_IN if annotations is None else annotations)
    body = copy.deepcopy(pod)
    body["metadata"] = {k: v for k, v in body["metadata"].items() if k not in ("uid", "resourceVersion")}
    body.pop("status", None)
    status, made = cp.request("POST", f"/api/v1/namespaces/{ns}/pods", body)
    assert status == 201, made
    if proc is not None:
        proc.start(made["metadata"]["uid"])          # its "processes", in a kubelet-named cgroup
    status, out = cp.request("PATCH", f"/api/v1/namespaces/{ns}/pods/{name}/status",
                             {"status": {"phase": "Running", "podIP": ips[0], "podIPs": [{"ip": i} for i in ips]}},
                             content_type="application/merge-patch+json")
    assert status == 200, out
    return made


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_agent_follows_real_pods_with_its_own_token(world):
    cp, node, ns, proc = world
    store: dict = {}
    agent = agent_for(node, proc, store)
    run = Running(agent)
    try:
        _eventually(lambda: agent.synced and agent.published and agent.event_sent, 30, "first sync and publish")
        node_obj = cp.request("GET", f"/api/v1/nodes/{node}")[1]
        assert node_obj["metadata"]["labels"][NODE_MODE_LABEL] == "cookie"
        events = cp.request("GET", "/api/v1/namespaces/default/events")[1]["items"]
        mine = [e for e in events if e["involvedObject"].get("name") == node]
        assert mine and mine[0]["involvedObject"]["uid"] == node_obj["metadata"]["uid"]

        pod = create_pod(cp, ns, node, "a", "10.44.0.5", proc)
        _eventually(lambda: len(store) == 1, 30, "the pod's entry")
        (cfg,) = store.values()
        assert str(cfg.pod_ips[0]) == "10.44.0.5"
        (ready,) = _eventually_events(cp, ns, "a", "CaptureReady")
        assert ready["type"] == "Normal" and "cookie mode" in ready["message"]
        assert ready["involvedObject"]["uid"] == pod["metadata"]["uid"]
        # Deleting the pod removes its entries (no kubelet: confirm the deletion at once).
        assert cp.request("DELETE", f"/api/v1/namespaces/{ns}/pods/a",
                          {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0})[0] == 200
        _eventually(lambda: not store, 30, "removal")
        assert pod["metadata"]["uid"]
        # The token really is the agent's: what RBAC does not grant is refused.
        with pytest.raises(kube_api.Forbidden):
            kube_api.list_nodes()
    finally:
        run.close()


def pod_events(cp, ns: str, name: str, reason: str) -> list[dict]:
    """The pod's Events as the real apiserver stores them."""
    items = cp.request("GET", f"/api/v1/namespaces/{ns}/events")[1]["items"]
    return [e for e in items if e["involvedObject"].get("name") == name and e["reason"] == reason]


def _eventually_events(cp, ns: str, name: str, reason: str, n: int = 1, timeout: float = 30) -> list[dict]:
    _eventually(lambda: len(pod_events(cp, ns, name, reason)) >= n, timeout, f"{n} {reason} Event(s) on {name}")
    return pod_events(cp, ns, name, reason)


def _patch(cp, ns: str, name: str, annotations: dict) -> None:
    assert cp.request("PATCH", f"/api/v1/namespaces/{ns}/pods/{name}", {"metadata": {"annotations": annotations}},
                      content_type="application/merge-patch+json")[0] == 200


def _kubelet_status(cp, ns: str, name: str, ip: str) -> None:
    """What the kubelet writes after a sandbox restart: a status update (a MODIFIED event)."""
    assert cp.request("PATCH", f"/api/v1/namespaces/{ns}/pods/{name}/status",
                      {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                                  "conditions": [{"type": "Ready", "status": "False",
                                                  "reason": f"restart-{uuid.uuid4().hex[:6]}"}]}},
                      content_type="application/merge-patch+json")[0] == 200


def test_opt_in_without_a_sidecar_is_ignored_with_an_event(world):
    """Issue 21 item 2 on a real apiserver: the opt-in on pods Istio did not inject (the webhook's
    object selector skips sidecar.istio.io/inject=false; a spec never injected has no istio-proxy and
    no sidecar.istio.io/status) is ignored, and the pod gets a Warning Event saying why."""
    cp, node, ns, proc = world
    store: dict = {}
    agent = agent_for(node, proc, store)
    run = Running(agent)
    try:
        _eventually(lambda: agent.synced, 30, "first sync")
        create_pod(cp, ns, node, "plain", "10.44.1.1", proc, fixture="v1.14.0/inject/hello.yaml")
        create_pod(cp, ns, node, "inject-off", "10.44.1.2", proc, fixture="v1.14.0/inject/hello.yaml",
                   annotations={**OPT_IN, "sidecar.istio.io/inject": "false"})
        create_pod(cp, ns, node, "sidecar", "10.44.1.3", proc)
        _eventually(lambda: len(store) == 1, 30, "the injected pod captured")
        (plain,) = _eventually_events(cp, ns, "plain", "CaptureIgnored")
        (off,) = _eventually_events(cp, ns, "inject-off", "CaptureIgnored")
        assert plain["type"] == off["type"] == "Warning"
        assert "no istio-proxy container" in plain["message"]
        assert "sidecar.istio.io/inject is 'false'" in off["message"]
        assert [str(c.pod_ips[0]) for c in store.values()] == ["10.44.1.3"]
        steps = run.steps   # pending pods are retried every 0.05 s: 30 steps are many retries
        _eventually(lambda: run.steps >= steps + 30, 30, "30 more agent loop steps")
        assert len(store) == 1 and len(pod_events(cp, ns, "plain", "CaptureIgnored")) == 1
    finally:
        run.close()


def node_events(cp, node: str, reason: str) -> list[dict]:
    """The Node's Events (the agent creates them in namespace default) as the real apiserver stores them."""
    items = cp.request("GET", "/api/v1/namespaces/default/events")[1]["items"]
    return [e for e in items if e["involvedObject"].get("kind") == "Node"
            and e["involvedObject"].get("name") == node and e["reason"] == reason]


def test_injector_configmap_losing_the_ebpf_template_raises_a_warning_event(world, monkeypatch):
    """Issue 21 item 10: a helm upgrade of istiod without the post-renderer (here: the ConfigMap
    replaced by its stock config) drops the ebpf template; the agent, with the shipped RBAC, raises
    one Warning Event on its Node per loss, and again after a repair and a second loss. A config
    is parsed once per resourceVersion, not at every check."""
    cp, node, ns, proc = world
    parsed: list[object] = []
    real_has = node_agent._has_injection_template
    monkeypatch.setattr(node_agent, "_has_injection_template", lambda c: parsed.append(c) or real_has(c))
    path = f"/api/v1/namespaces/{ns}/configmaps/istio-sidecar-injector"
    labels = {"operator.istio.io/component": "Pilot", "istio.io/rev": "default"}
    stock = "policy: enabled\ntemplates:\n  sidecar: |\n    spec: {}\n"
    ours = stock + "  ebpf: |\n    spec: {}\n"
    assert cp.request("POST", f"/api/v1/namespaces/{ns}/configmaps", {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "istio-sidecar-injector", "labels": labels},
        "data": {"config": ours}})[0] == 201

    def set_config(text: str) -> None:
        assert cp.request("PATCH", path, {"data": {"config": text}},
                          content_type="application/merge-patch+json")[0] == 200

    agent = agent_for(node, proc, {}, injector_check_seconds=0.2)
    run = Running(agent)
    try:
        _eventually(lambda: agent.published and agent.synced, 30, "publish")
        steps = run.steps
        _eventually(lambda: run.steps >= steps + 30, 30, "30 more agent loop steps")
        assert node_events(cp, node, "InjectorTemplateMissing") == []    # installed: no Event
        first = agent._last_injector_check
        _eventually(lambda: agent._last_injector_check > first + 0.5, 30, "more injector checks")
        assert parsed == [ours]                                          # several checks, one parse
        set_config(stock)
        _eventually(lambda: node_events(cp, node, "InjectorTemplateMissing"), 30, "the Warning Event")
        (event,) = node_events(cp, node, "InjectorTemplateMissing")
        assert event["type"] == "Warning" and f"ConfigMap {ns}/istio-sidecar-injector" in event["message"]
        assert "istio-ebpf install" in event["message"]
        _eventually(lambda: agent.injectors_without_template == {f"{ns}/istio-sidecar-injector"}, 30, "seen")
        last = agent._last_injector_check
        _eventually(lambda: agent._last_injector_check > last + 0.5, 30, "more injector checks")
        assert len(node_events(cp, node, "InjectorTemplateMissing")) == 1    # once per loss
        set_config(ours)       # istio-ebpf install again
        _eventually(lambda: not agent.injectors_without_template, 30, "the repair seen")
        set_config(stock)      # and the next upgrade drops it again
        _eventually(lambda: sum(e.get("count", 1) for e in node_events(cp, node, "InjectorTemplateMissing")) >= 2,
                    30, "a second Warning Event")
    finally:
        run.close()
        for e in node_events(cp, node, "InjectorTemplateMissing"):
            cp.request("DELETE", f"/api/v1/namespaces/default/events/{e['metadata']['name']}")


def test_uninstall_reverting_the_injector_before_the_drain_mark_raises_no_drift_event(world):
    """Uninstall reverts the injector ConfigMaps a moment before it marks the agent pods draining: an
    agent check in between sees the template gone, and must not call that drift. A loss counts once
    two checks in a row see it (the Event comes one check period later for a real drift)."""
    cp, node, ns, proc = world
    name = f"istio-sidecar-injector-{uuid.uuid4().hex[:6]}"
    path = f"/api/v1/namespaces/{ns}/configmaps/{name}"
    stock = "policy: enabled\ntemplates:\n  sidecar: |\n    spec: {}\n"
    assert cp.request("POST", f"/api/v1/namespaces/{ns}/configmaps", {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "labels": {"operator.istio.io/component": "Pilot", "istio.io/rev": "canary"}},
        "data": {"config": stock + "  ebpf: |\n    spec: {}\n"}})[0] == 201
    agent = agent_for(node, proc, {}, agent_namespace="istio-ebpf-system")

    def drain_mark(on: bool) -> None:      # what the agent's pod watch delivers for its own pod
        annotations = {DRAINING_ANNOTATION: "2026-12-06T00:00:00Z"} if on else {}
        agent._note_drain("MODIFIED", {"metadata": {"namespace": "istio-ebpf-system", "uid": "agent-pod",
                                                    "annotations": annotations}})

    def events() -> list[dict]:
        mine = f"ConfigMap {ns}/{name} "
        return [e for e in node_events(cp, node, "InjectorTemplateMissing") if mine in e["message"]]

    try:
        agent.check_injectors()
        assert cp.request("PATCH", path, {"data": {"config": stock}},
                          content_type="application/merge-patch+json")[0] == 200       # uninstall's revert
        agent.check_injectors()                   # a check before the drain mark arrives
        drain_mark(True)
        agent.check_injectors()
        drain_mark(False)                         # (a drain cancelled while the template stays gone)
        agent.check_injectors()
        assert events() == []
        agent.check_injectors()                   # the second check in a row: a real loss
        (event,) = events()
        assert event["type"] == "Warning"
    finally:
        cp.request("DELETE", path)
        for e in node_events(cp, node, "InjectorTemplateMissing"):
            cp.request("DELETE", f"/api/v1/namespaces/default/events/{e['metadata']['name']}")


def test_capture_is_fixed_per_sandbox(world):
    """Issue 21 item 7 on a real apiserver: annotation edits (traffic annotations, the opt-in) do not
    change a running sandbox's capture; each gets an Event; the next sandbox follows the Pod."""
    cp, node, ns, proc = world
    store: dict = {}
    agent = agent_for(node, proc, store)
    run = Running(agent)
    try:
        _eventually(lambda: agent.synced, 30, "first sync")
        pod = create_pod(cp, ns, node, "a", "10.44.2.1", proc)
        uid = pod["metadata"]["uid"]
        _eventually(lambda: len(store) == 1, 30, "captured")
        first = next(iter(store))
        _patch(cp, ns, "a", {"traffic.sidecar.istio.io/excludeOutboundPorts": "7,8,9,5432"})
        (ev,) = _eventually_events(cp, ns, "a", "CaptureUnchanged")
        assert ev["type"] == "Normal" and "takes effect when the pod restarts" in ev["message"]
        assert list(store) == [first] and 5432 not in store[first].exclude_outbound_ports
        # The opt-in removed: the running sandbox stays captured.
        _patch(cp, ns, "a", {"istio-ebpf.io/redirect": None})
        _eventually_events(cp, ns, "a", "CaptureUnchanged", 2)
        assert list(store) == [first]
        # A new sandbox (new process, new netns): it follows the Pod as it is now: not opted in.
        old_pid = max(int(p.name) for p in proc.root.iterdir())
        proc.start(uid)
        proc.stop(old_pid)
        _kubelet_status(cp, ns, "a", "10.44.2.1")
        _eventually(lambda: not store, 30, "no capture in the new sandbox")
        # Opted in again while that sandbox runs: Event, not captured; its next sandbox is.
        _patch(cp, ns, "a", OPT_IN)
        _eventually_events(cp, ns, "a", "CaptureUnchanged", 3)
        assert not store
        old_pid = max(int(p.name) for p in proc.root.iterdir())
        proc.start(uid)
        proc.stop(old_pid)
        _kubelet_status(cp, ns, "a", "10.44.2.1")
        _eventually(lambda: len(store) == 1, 30, "captured in the next sandbox")
        assert 5432 in next(iter(store.values())).exclude_outbound_ports
        assert len(pod_events(cp, ns, "a", "CaptureReady")) == 2
    finally:
        run.close()


def test_watch_survives_apiserver_kill_and_etcd_compaction(world):
    cp, node, ns, proc = world
    store: dict = {}
    agent = agent_for(node, proc, store, watch_timeout=2, watch_stale_seconds=4.0)
    run = Running(agent)
    try:
        _eventually(lambda: agent.synced, 30, "first sync")
        agent.watcher.max_backoff = 2.0
        create_pod(cp, ns, node, "before", "10.44.0.10", proc)
        _eventually(lambda: len(store) == 1, 30, "first pod")

        cp.kill_apiserver()                                 # kill -9: the open watch stream breaks
        _eventually(lambda: get(agent, "/readyz")[0] == 503, 30, "/readyz to report the dead watch")
        assert "pod watch" in get(agent, "/readyz")[1]
        cp.watch_cache = False      # from now on watches read etcd, so a compaction means 410
        cp.start_apiserver()
        _eventually(lambda: get(agent, "/readyz")[0] == 200, 60, "/readyz after the restart")
        assert agent.watcher.errors >= 1 and agent.watcher._thread.is_alive()
        create_pod(cp, ns, node, "after-restart", "10.44.0.11", proc)
        _eventually(lambda: len(store) == 2, 30, "a pod created after the restart")

        # etcd compaction past the agent's resourceVersion: its next watch gets 410 and it relists.
        gone_before = metric(get(agent, "/metrics")[1], "istio_ebpf_pod_relists_total", reason="gone")
        for i in range(2):   # move etcd past the agent's resourceVersion (it sees only its pods)
            assert cp.request("POST", f"/api/v1/namespaces/{ns}/configmaps",
                              {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"bump{i}"}})[0] == 201
        cp.compact_etcd()
        _eventually(lambda: metric(get(agent, "/metrics")[1], "istio_ebpf_pod_relists_total", reason="gone")
                    > gone_before, 30, "a relist after 410 Gone")
        create_pod(cp, ns, node, "after-compaction", "10.44.0.12", proc)
        _eventually(lambda: len(store) == 3, 30, "a pod created after the compaction")
    finally:
        run.close()
        if not cp.watch_cache:
            cp.kill_apiserver()
            cp.watch_cache = True
            cp.start_apiserver()


def test_forbidden_events_back_off(world):
    cp, node, ns, proc = world
    # A ServiceAccount with the agent's rights minus Events.
    sa = f"noevents-{uuid.uuid4().hex[:6]}"
    rules = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
             {"apiGroups": [""], "resources": ["nodes"], "verbs": ["patch"]}]
    assert cp.request("POST", f"/api/v1/namespaces/{ns}/serviceaccounts",
                      {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa}})[0] == 201
    assert cp.request("POST", "/apis/rbac.authorization.k8s.io/v1/clusterroles", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": sa},
        "rules": rules})[0] == 201
    assert cp.request("POST", "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": sa},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": sa},
        "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": ns}]})[0] == 201
    try:
        import os
        cp.write_kubeconfig(__import__("pathlib").Path(os.environ["KUBECONFIG"]), cp.service_account_token(ns, sa), sa)

        def forbidden_event_posts() -> int:   # from the apiserver's audit log
            return sum(1 for e in cp.audit_events()
                       if e["verb"] == "create" and e["objectRef"].get("resource") == "events"
                       and e["user"]["username"] == f"system:serviceaccount:{ns}:{sa}"
                       and e.get("responseStatus", {}).get("code") == 403)

        before = forbidden_event_posts()
        store: dict = {}
        agent = agent_for(node, proc, store)
        run = Running(agent)
        try:
            _eventually(lambda: agent.published and agent.synced, 30, "publish with Events forbidden")
            _eventually(lambda: forbidden_event_posts() > before, 30, "the refused Event POST in the audit log")
            steps = run.steps   # the old loop retried every 0.2 s: 7 or more forbidden POSTs in 30 steps
            _eventually(lambda: run.steps >= steps + 30, 30, "30 more agent loop steps")
            assert cp.request("GET", f"/api/v1/nodes/{node}")[1]["metadata"]["labels"][NODE_MODE_LABEL] == "cookie"
            assert get(agent, "/readyz")[0] == 200
        finally:
            run.close()
        assert forbidden_event_posts() - before == 1
    finally:
        cp.request("DELETE", f"/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/{sa}")
        cp.request("DELETE", f"/apis/rbac.authorization.k8s.io/v1/clusterroles/{sa}")


@pytest.mark.kernel
def test_real_datapath_and_envoy_follow_the_real_api(world, cluster, pin_root):  # noqa: F811 (fixtures)
    """Harness pods (netns + cgroup + real Envoy), their Pod objects on the real apiserver: real traffic."""
    from istio_ebpf_plugin.harness.apps import http_get, url_for

    cp, node_name, ns, _ = world
    hnode, client, server, envoys, _, _ = cluster
    cli = create_pod(cp, ns, node_name, "cli", list(client.pod_ips), None, "v1.14.0/inject/hello.yaml.injected")
    srv = create_pod(cp, ns, node_name, "srv", list(server.pod_ips), None, "v1.14.0/inject/hello.yaml.cni.injected",
                     annotations={"inject.istio.io/templates": "sidecar,ebpf"})
    # The harness names its cgroups its own way; kubelet names them kubepods/pod<uid> (cgroupfs
    # driver). The pods' processes move into such directories, so the agent's real locator finds
    # them from /proc alone, by the UIDs the apiserver gave.
    kubepods = hnode.parent_cgroup / "kubepods"
    moved = {client: kubepods / f"pod{cli['metadata']['uid']}", server: kubepods / f"pod{srv['metadata']['uid']}"}
    cfg = agent_config(hnode, pin_root, {})
    cfg.node_name, cfg.cgroup_for_uid = node_name, None
    agent = NodeAgent(cfg)
    run = None
    try:
        for pod, target in moved.items():
            _move_processes(pod.cgroup_path, target)
        run = Running(agent)
        _eventually(lambda: agent.ready()[0] and len(agent.datapath.pods()) == 2, 60, "agent ready, both pods")
        assert set(agent.datapath.pods()) == {agent.datapath.pod_key(p.netns_path, str(moved[p]))
                                              for p in (client, server)}
        url = url_for(server.ipv4, PORT)
        assert [r["status"] for r in http_get(client, url, count=3)] == [200] * 3
        wait_outbound_logged(envoys["cli"], f"{server.ipv4}:{PORT}")
        before = outbound_requests(envoys["cli"])
        # An annotation PATCH on the real API: the running sandbox keeps its capture (Event).
        _patch(cp, ns, "cli", {"traffic.sidecar.istio.io/excludeOutboundPorts": str(PORT)})
        _eventually_events(cp, ns, "cli", "CaptureUnchanged")
        assert [r["status"] for r in http_get(client, url, count=3)] == [200] * 3
        assert outbound_requests(envoys["cli"]) == before + 3, "no longer through Envoy"
        ready = pod_events(cp, ns, "cli", "CaptureReady") + pod_events(cp, ns, "srv", "CaptureReady")
        assert len(ready) == 2 and all("s after the sandbox started" in e["message"] for e in ready), ready
        # Deleting the Pod object removes its entries.
        assert cp.request("DELETE", f"/api/v1/namespaces/{ns}/pods/srv",
                          {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0})[0] == 200
        client_key = agent.datapath.pod_key(client.netns_path, str(moved[client]))
        _eventually(lambda: set(agent.datapath.pods()) == {client_key}, 30, "srv removed")
    finally:
        if run is not None:
            run.stop.set()
            run.thread.join(5)
        agent.shutdown(cleanup=True)
        for pod, target in moved.items():   # back where the harness removes them
            if target.exists():
                _move_processes(target, pod.cgroup_path)
                target.rmdir()
        if kubepods.exists():
            kubepods.rmdir()


def _move_processes(src, dst) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for _ in range(5):   # a process forked meanwhile shows up on the next read
        pids = (src / "cgroup.procs").read_text().split()
        if not pids:
            return
        for pid in pids:
            try:
                (dst / "cgroup.procs").write_text(pid)
            except ProcessLookupError:
                pass
    raise AssertionError(f"processes keep appearing in {src}")


def test_node_without_cgroup_v2_is_published_unsupported(world, monkeypatch):
    """Issue 21 item 3: no cgroup v2 mount. The CLI used to exit 2 before publishing, leaving install's
    kernel-version label (cookie) in place; now the agent overwrites it with unsupported + reason, and stays up."""
    from istio_ebpf_plugin.agent import cli, mode as agent_mode
    from istio_ebpf_plugin.agent.node_agent import REASON_ANNOTATION

    cp, node, ns, proc = world
    assert cp.request("PATCH", f"/api/v1/nodes/{node}", {"metadata": {"labels": {NODE_MODE_LABEL: "cookie"}}},
                      content_type="application/merge-patch+json")[0] == 200
    seen: dict = {}
    monkeypatch.setattr(agent_mode, "find_cgroup2", lambda: None)
    monkeypatch.setattr(NodeAgent, "run", lambda self, stop: seen.setdefault("config", self.config))
    parser = cli.argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["agent", "--node-name", node])
    assert cli.run(args) == 0                     # did not exit before publishing
    cfg = seen["config"]
    assert cfg.unsupported_reason and "cgroup v2" in cfg.unsupported_reason
    agent = agent_for(node, proc, {}, unsupported_reason=cfg.unsupported_reason)
    agent.start(serve=False)
    # Shut down even on failure: a leaked agent keeps the node lock of the tests' pin root, and the next
    # test's agent waited for it for ever (CI, test_agent_loop, 20 min idle).
    try:
        assert agent.datapath is None and agent.decision is not None and agent.decision.mode == "unsupported"
        _, got = cp.request("GET", f"/api/v1/nodes/{node}")
        assert got["metadata"]["labels"][NODE_MODE_LABEL] == "unsupported"
        assert "cgroup v2" in got["metadata"]["annotations"][REASON_ANNOTATION]
        assert agent.ready() == (True, f"unsupported: {cfg.unsupported_reason}")
    finally:
        agent.shutdown()


def test_agent_corrects_a_node_label_someone_overwrites(world):
    """Issue 21 item 11 (agent side): the agent published unsupported; an installer or operator writes
    cookie over it (then removes it); within one label check period the agent writes its own mode back
    (the old agent published once and never looked again). Each period also renews its heartbeat."""
    from istio_ebpf_plugin import HEARTBEAT_ANNOTATION
    from istio_ebpf_plugin.install import plan

    cp, node, ns, proc = world
    agent = agent_for(node, proc, {}, unsupported_reason="cgroup_v2: no cgroup v2 mount", label_check_seconds=0.5)
    agent.start(serve=False)
    try:
        def label() -> str | None:
            return cp.request("GET", f"/api/v1/nodes/{node}")[1]["metadata"].get("labels", {}).get(NODE_MODE_LABEL)

        def heartbeat() -> str:
            return cp.request("GET", f"/api/v1/nodes/{node}")[1]["metadata"]["annotations"][HEARTBEAT_ANNOTATION]

        def overwrite(value: str | None) -> None:
            assert cp.request("PATCH", f"/api/v1/nodes/{node}", {"metadata": {"labels": {NODE_MODE_LABEL: value}}},
                              content_type="application/merge-patch+json")[0] == 200
            assert label() == value

        checks: list[float] = []
        reassert = agent._reassert_label

        def counted() -> None:
            checks.append(time.monotonic())
            reassert()

        agent._reassert_label = counted
        agent.step(timeout=0.01)
        assert agent.published and label() == "unsupported"
        for wrong in ("cookie", None):
            overwrite(wrong)
            before = len(checks)
            wait_for(lambda: (agent.step(timeout=0.05), label() == "unsupported")[1], 10,
                     f"the agent to correct the label {wrong!r}")
            # An event count, not a time bound (a loaded machine stretches the GETs): the first label
            # check after the overwrite corrected it.
            assert len(checks) - before == 1, checks[before:]
        # The same patch renews the heartbeat that `istio-ebpf status` requires (issue 21 item 13).
        first = heartbeat()
        age, mode, limit = plan.heartbeat_age(first, time.time())
        assert age is not None and age < 5 and mode == "unsupported" and limit == "1.5"
        wait_for(lambda: (agent.step(timeout=0.05), heartbeat() != first)[1], 5, "a renewed heartbeat")
    finally:
        agent.shutdown()
