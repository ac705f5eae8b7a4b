"""install / status / uninstall and ``render | kubectl apply`` against a real kube-apiserver 1.20.2.

The injector and mesh ConfigMaps are what real Helm renders from Istio's istiod charts
(../shared/fixtures/istio/full-charts: master, 1.26.0, 1.14.0, and a revision-tagged one).
Nodes are real Node objects with real kernel version strings. There is no kubelet: where a
kubelet would act (finishing a terminating agent pod after its preStop hook), the test does
it, with the agent's own ServiceAccount token, as the preStop hook would.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from istio_ebpf_plugin import DRAINING_ANNOTATION, NODE_MODE_LABEL, OPT_IN_ANNOTATION, OPT_IN_VALUE, PROJECT_ROOT, \
    kube_api
from istio_ebpf_plugin.cli import main
from istio_ebpf_plugin.install import injector_config, manifests
from istio_ebpf_plugin.install.plugin import BACKUP_CONFIGMAP, INSTALLED_ANNOTATION

CHARTS = PROJECT_ROOT.parent / "shared" / "fixtures" / "istio" / "full-charts"
AGENT_NS = "istio-ebpf-system"
KERNELS = {"new": "6.1.0-18-amd64", "mid": "5.10.0-28-amd64", "old": "4.19.0-26-amd64"}


@pytest.fixture(scope="module")
def tools() -> Path:
    out = subprocess.run(["bash", str(PROJECT_ROOT / "scripts" / "fetch-helm.sh")], check=True,
                         stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def cp(kube_control_plane, monkeypatch):
    """The session's control plane, with kube_api (and kubectl) pointed at it through KUBECONFIG."""
    monkeypatch.setenv("KUBECONFIG", str(kube_control_plane.kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr(kube_api, "_backend_override", None)
    return kube_control_plane


def helm_template(tools: Path, version: str, namespace: str, *sets: str, post_renderer: bool = False) -> str:
    args = [str(tools / "helm"), "template", "istiod", str(CHARTS / version / "istio-discovery"),
            "-n", namespace, "--kube-version", "1.20.2"]
    for s in sets:
        args += ["--set", s]
    if post_renderer:
        args += ["--post-renderer", str(PROJECT_ROOT / ".venv" / "bin" / "istio-ebpf"),
                 "--post-renderer-args", "render"]
    return subprocess.run(args, check=True, stdout=subprocess.PIPE, text=True).stdout


def istio_configmaps(text: str) -> list[dict]:
    """The injector and mesh ConfigMaps of a rendered istiod chart."""
    return [d for d in yaml.safe_load_all(text)
            if d and d.get("kind") == "ConfigMap" and d["metadata"]["name"].startswith("istio")]


def create(cp, path: str, body: dict) -> dict:
    status, out = cp.request("POST", path, body)
    assert status == 201, out
    return out


def make_nodes(cp, token: str) -> list[str]:
    names = []
    for tag, release in KERNELS.items():
        name = f"e2e-{token}-{tag}"
        # The labels every kubelet sets (the DaemonSet selects on them).
        create(cp, "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {
            "name": name, "labels": {"kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                                     "kubernetes.io/hostname": name}}})
        status, out = cp.request("PATCH", f"/api/v1/nodes/{name}/status",
                                 {"status": {"nodeInfo": {"kernelVersion": release},
                                             # Room for pods, so the scheduler binds the agent's pods.
                                             "capacity": {"cpu": "4", "memory": "8Gi", "pods": "110"},
                                             "allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110"},
                                             "conditions": [{"type": "Ready", "status": "True",
                                                             "reason": "KubeletReady", "message": "test"}]}},
                                 content_type="application/merge-patch+json")
        assert status == 200, out
        names.append(name)
    return names


class Kubelet:
    """Stands in for the kubelets (none run here): runs each terminating agent pod's preStop check
    with the agent's token, then confirms the deletion (grace period 0), as a kubelet would."""

    def __init__(self, cp, token: str) -> None:
        self.cp, self.token = cp, token
        self.prestop_status: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.wait(0.3):
            status, pods = self.cp.request("GET", f"/api/v1/namespaces/{AGENT_NS}/pods")
            for pod in pods.get("items", []) if status == 200 else []:
                if not pod["metadata"].get("deletionTimestamp"):
                    continue
                # The preStop hook (`istio-ebpf agent --cleanup --if-uninstalled`) reads its DaemonSet.
                st, _ = self.cp.request("GET", f"/apis/apps/v1/namespaces/{AGENT_NS}/daemonsets/istio-ebpf-agent",
                                        token=self.token)
                self.prestop_status.append(st)
                self.cp.request("DELETE", f"/api/v1/namespaces/{AGENT_NS}/pods/{pod['metadata']['name']}",
                                {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0})

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


@pytest.fixture
def istio(cp, tools):
    """Every chart version's ConfigMaps, each in its own namespace, plus three Nodes. Removed after."""
    token = uuid.uuid4().hex[:6]
    namespaces: dict[str, str] = {}
    for version, sets in (("master", ()), ("1.26.0", ()), ("1.14.0", ()), ("1.26.0", ("revision=canary",))):
        ns = f"istio-{version.replace('.', '')}-{token}"
        if "revision=canary" in sets:
            ns = namespaces["1.26.0"]     # the revision-tagged injector beside the default one
        else:
            create(cp, "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
            namespaces[version] = ns
        for cm in istio_configmaps(helm_template(tools, version, ns, *sets)):
            create(cp, f"/api/v1/namespaces/{ns}/configmaps", cm)
    nodes = make_nodes(cp, token)
    yield namespaces, nodes
    kubelet = Kubelet(cp, "")
    try:
        for ns in namespaces.values():   # after a failure too: leave no agent objects behind
            main(["uninstall", "--timeout", "120", "--istio-namespace", ns])
    finally:
        kubelet.close()
    for name in nodes:
        cp.request("DELETE", f"/api/v1/nodes/{name}")
    for ns in namespaces.values():
        cp.request("DELETE", f"/api/v1/namespaces/{ns}")
    # Namespace deletion is asynchronous: the next test's cluster-wide status would still list these
    # ConfigMaps (uninstalled, so 'ebpf template missing') while the namespace controller empties them.
    wait_until(lambda: all(cp.request("GET", f"/api/v1/namespaces/{ns}")[0] == 404 for ns in namespaces.values()),
               120, "the test's Istio namespaces to be deleted")


def injector_state(cp, ns: str) -> dict[str, dict]:
    status, out = cp.request("GET", f"/api/v1/namespaces/{ns}/configmaps")
    assert status == 200
    return {c["metadata"]["name"]: c for c in out["items"] if c["metadata"]["name"].startswith("istio-sidecar")}


def node_labels(cp, names: list[str]) -> dict[str, str | None]:
    return {n: cp.request("GET", f"/api/v1/nodes/{n}")[1]["metadata"].get("labels", {}).get(NODE_MODE_LABEL)
            for n in names}


def test_install_status_reinstall_uninstall_every_chart(cp, istio, capsys):
    namespaces, nodes = istio
    started = time.monotonic()
    before = {ns: injector_state(cp, ns) for ns in namespaces.values()}
    # The guard must not depend on the text: add <, >, & and non-ASCII to one config.
    ns_master = namespaces["master"]
    cfg = before[ns_master]["istio-sidecar-injector"]["data"]["config"]
    assert any(c in cfg for c in "<>&")
    status, _ = cp.request("PATCH", f"/api/v1/namespaces/{ns_master}/configmaps/istio-sidecar-injector",
                           {"data": {"config": cfg + "\n# café <b> & ü — edited by hand\n"}},
                           content_type="application/merge-patch+json")
    assert status == 200
    before = {ns: injector_state(cp, ns) for ns in namespaces.values()}

    for ns in namespaces.values():
        assert main(["install", "--timeout", "0", "--istio-namespace", ns]) == 0
    err = capsys.readouterr().err
    assert "patched" in err
    installed = {ns: injector_state(cp, ns) for ns in namespaces.values()}
    for ns, cms in installed.items():
        assert set(cms) == set(before[ns])
        for cm in cms.values():
            assert injector_config.is_installed(cm["data"]["config"])
            assert len(cm["metadata"]["annotations"][INSTALLED_ANNOTATION]) == 64
            managers = {f["manager"] for f in cm["metadata"]["managedFields"]}
            assert "istio-ebpf" in managers
    assert node_labels(cp, nodes) == dict(zip(nodes, ["cookie", "podip", "unsupported"], strict=True))
    for kind, path in (("Namespace", f"/api/v1/namespaces/{AGENT_NS}"),
                       ("DaemonSet", f"/apis/apps/v1/namespaces/{AGENT_NS}/daemonsets/istio-ebpf-agent"),
                       ("ClusterRole", "/apis/rbac.authorization.k8s.io/v1/clusterroles/istio-ebpf-agent")):
        assert cp.request("GET", path)[0] == 200, kind

    assert main(["status"]) == 1      # no kubelet: the DaemonSet's pods never become available
    out = capsys.readouterr().out
    assert out.count("ok: ConfigMap") == 4 and "PROBLEM: DaemonSet" in out

    # Again: nothing changes, not even the resourceVersion.
    for ns in namespaces.values():
        assert main(["install", "--timeout", "0", "--istio-namespace", ns]) == 0
    again = {ns: injector_state(cp, ns) for ns in namespaces.values()}
    assert {ns: {n: c["metadata"]["resourceVersion"] for n, c in cms.items()} for ns, cms in again.items()} == \
        {ns: {n: c["metadata"]["resourceVersion"] for n, c in cms.items()} for ns, cms in installed.items()}
    assert "unchanged" in capsys.readouterr().err

    kubelet = Kubelet(cp, cp.service_account_token(AGENT_NS, "istio-ebpf-agent"))
    try:
        for ns in namespaces.values():
            assert main(["uninstall", "--timeout", "120", "--istio-namespace", ns]) == 0
    finally:
        kubelet.close()
    # Agent pods (the DaemonSet controller made one per Node) ran their preStop while RBAC still
    # existed: their token read "DaemonSet gone" (404), never "forbidden" (403) or "unknown" (401).
    assert kubelet.prestop_status and set(kubelet.prestop_status) == {404}
    after = {ns: injector_state(cp, ns) for ns in namespaces.values()}
    for ns, cms in before.items():
        for name, cm in cms.items():
            assert after[ns][name]["data"] == cm["data"]           # byte for byte
            assert INSTALLED_ANNOTATION not in (after[ns][name]["metadata"].get("annotations") or {})
        assert cp.request("GET", f"/api/v1/namespaces/{ns}/configmaps/{BACKUP_CONFIGMAP}")[0] == 404
    assert node_labels(cp, nodes) == dict.fromkeys(nodes)
    assert cp.request("GET", f"/api/v1/namespaces/{AGENT_NS}")[0] == 404   # waited until really gone
    assert cp.request("GET", "/apis/rbac.authorization.k8s.io/v1/clusterroles/istio-ebpf-agent")[0] == 404
    print(f"e2e install/status/reinstall/uninstall: {time.monotonic() - started:.1f}s")


def test_concurrent_edit_is_detected_by_the_server_and_retried(cp, istio, capsys):
    namespaces, _ = istio
    ns = namespaces["1.14.0"]
    path = f"/api/v1/namespaces/{ns}/configmaps/istio-sidecar-injector"

    class Racing(kube_api.HttpBackend):
        raced = 0

        def json_patch_configmap(self, namespace, name, ops):
            if not Racing.raced:     # someone else edits between our read and our patch
                Racing.raced += 1
                cfg = cp.request("GET", path)[1]["data"]["config"]
                edited = {"data": {"config": cfg.replace("policy: enabled", "policy: disabled")}}
                assert cp.request("PATCH", path, edited, content_type="application/merge-patch+json")[0] == 200
            return super().json_patch_configmap(namespace, name, ops)

    previous = kube_api.use_backend(Racing())
    try:
        assert main(["install", "--timeout", "0", "--istio-namespace", ns]) == 0
    finally:
        kube_api.use_backend(previous)
    err = capsys.readouterr().err
    assert "changed by someone else meanwhile" in err
    cfg = cp.request("GET", path)[1]["data"]["config"]
    assert "policy: disabled" in cfg and injector_config.is_installed(cfg)


def test_status_reports_drift_and_install_keeps_the_agents_label(cp, istio, capsys):
    namespaces, nodes = istio
    ns = namespaces["1.26.0"]
    # The agent on the 6.1 node fell back to podip after a failed probe, and said why.
    new = nodes[0]
    assert cp.request("PATCH", f"/api/v1/nodes/{new}", {"metadata": {
        "labels": {NODE_MODE_LABEL: "podip"},
        "annotations": {"istio-ebpf.io/mode-reason": "probe sockops_netns_cookie failed"}}},
        content_type="application/merge-patch+json")[0] == 200
    assert main(["install", "--timeout", "0", "--istio-namespace", ns]) == 0
    assert node_labels(cp, [new]) == {new: "podip"}
    assert "kept (set by the agent" in capsys.readouterr().err
    path = f"/api/v1/namespaces/{ns}/configmaps/istio-sidecar-injector"
    cfg = cp.request("GET", path)[1]["data"]["config"]
    assert cp.request("PATCH", path, {"data": {"config": cfg + "\n# tuned by an operator\n"}},
                      content_type="application/merge-patch+json")[0] == 200
    assert main(["status", "--istio-namespace", ns]) == 1
    assert "config changed since istio-ebpf installed it" in capsys.readouterr().out
    assert main(["install", "--timeout", "0", "--istio-namespace", ns]) == 0
    main(["status", "--istio-namespace", ns])
    assert "config changed since" not in capsys.readouterr().out


DAEMONSET = f"/apis/apps/v1/namespaces/{AGENT_NS}/daemonsets/istio-ebpf-agent"


def app_pod(ns: str, name: str, node: str, ebpf_template: bool) -> dict:
    """An opted-in pod bound to ``node``, as injected with the ebpf template (its node affinity on
    our label) or, ``ebpf_template=False``, as stock Istio injects it after the revert."""
    spec: dict = {"nodeName": node, "containers": [{"name": "app", "image": "app:1"},
                                                   {"name": "istio-proxy", "image": "proxyv2:1",
                                                    "args": ["proxy", "sidecar"]}]}
    if ebpf_template:
        spec["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": NODE_MODE_LABEL, "operator": "In", "values": ["cookie", "podip"]}]}]}}}
        spec["initContainers"] = [{"name": "istio-validation", "image": "proxyv2:1"}]
    else:
        spec["initContainers"] = [{"name": "istio-init", "image": "proxyv2:1"}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": name, "namespace": ns,
        "annotations": {OPT_IN_ANNOTATION: OPT_IN_VALUE, "sidecar.istio.io/status": "{}"}}, "spec": spec}


def agent_pods(cp) -> list[dict]:
    status, out = cp.request("GET", f"/api/v1/namespaces/{AGENT_NS}/pods")
    assert status == 200, out
    return out["items"]


def wait_for(what: str, check, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return found


def delete_pod(cp, ns: str, name: str) -> None:
    # No kubelet: a bound pod goes at once only with grace period 0.
    cp.request("DELETE", f"/api/v1/namespaces/{ns}/pods/{name}",
               {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0})


def test_uninstall_drains_until_the_ebpf_injected_pods_are_gone(cp, istio, capsys, monkeypatch):
    """Issue 21 item 1: uninstall reverts the injection, keeps the agent while a pod injected with the
    ebpf template runs (times out non-zero naming it, agent pods marked draining, status says so), and
    completes once the pod is gone; --force removes the agent anyway and names the pod."""
    namespaces, nodes = istio
    ns = namespaces["1.26.0"]
    app = f"app-{uuid.uuid4().hex[:6]}"
    create(cp, "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": app}})
    kubelet = Kubelet(cp, "")
    try:
        assert main(["install", "--timeout", "0", "--istio-namespace", ns]) == 0
        wait_for("an agent pod per Linux node", lambda: len(agent_pods(cp)) == len(nodes))
        create(cp, f"/api/v1/namespaces/{app}/pods", app_pod(app, "client", nodes[0], ebpf_template=True))
        # Restarted after the revert: the opt-in annotation is in its template, istio-init is back.
        create(cp, f"/api/v1/namespaces/{app}/pods", app_pod(app, "restarted", nodes[0], ebpf_template=False))
        capsys.readouterr()

        started = time.monotonic()
        assert main(["uninstall", "--timeout", "2", "--istio-namespace", ns]) == 1
        took = time.monotonic() - started
        err = capsys.readouterr().err
        named = [line for line in err.splitlines() if line.startswith("pod ")]
        assert named == [f"pod {app}/client (node {nodes[0]}): still captured by eBPF; restart it"], err
        assert f"{app}/restarted" not in err and "still depend on eBPF capture after 2s" in err
        assert 2 <= took < 30, took
        assert cp.request("GET", DAEMONSET)[0] == 200                 # the agent stays (fail closed)
        assert not kubelet.prestop_status
        assert all(DRAINING_ANNOTATION in (p["metadata"].get("annotations") or {}) for p in agent_pods(cp))
        cfg = injector_state(cp, ns)["istio-sidecar-injector"]["data"]["config"]
        assert not injector_config.is_installed(cfg)                   # the injection is reverted first
        assert main(["status", "--istio-namespace", ns]) == 1
        out = capsys.readouterr().out
        assert f"DRAINING: pod {app}/client (node {nodes[0]}): still captured by eBPF; restart it" in out
        assert "DRAINING: ConfigMap" in out and "PROBLEM: ConfigMap" not in out, out

        # An install failing after it cancelled the drain rolls that back too: the injection is
        # reverted again, so the agents must drain again, from the same start.
        marks = {p["metadata"]["name"]: p["metadata"]["annotations"][DRAINING_ANNOTATION] for p in agent_pods(cp)}
        monkeypatch.setenv("ISTIO_EBPF_FAILPOINT", "rollout")
        assert main(["install", "--timeout", "5", "--istio-namespace", ns]) == 1
        monkeypatch.delenv("ISTIO_EBPF_FAILPOINT")
        err = capsys.readouterr().err
        assert "the drain of an earlier 'istio-ebpf uninstall' is cancelled" in err, err
        assert {p["metadata"]["name"]: (p["metadata"].get("annotations") or {}).get(DRAINING_ANNOTATION)
                for p in agent_pods(cp)} == marks, err
        assert not injector_config.is_installed(injector_state(cp, ns)["istio-sidecar-injector"]["data"]["config"])

        # Waiting: the pod goes meanwhile, the uninstall completes.
        result: list[int] = []
        waiter = threading.Thread(target=lambda: result.append(
            main(["uninstall", "--timeout", "60", "--istio-namespace", ns])))
        waiter.start()
        seen = ""
        while "  restart " not in seen:
            assert waiter.is_alive(), seen
            seen += capsys.readouterr().err
            time.sleep(0.1)
        delete_pod(cp, app, "client")
        waiter.join(120)
        err = seen + capsys.readouterr().err
        assert result == [0], err
        assert f"draining: {app}/client (node {nodes[0]}) gone" in err and "drained:" in err
        assert cp.request("GET", DAEMONSET)[0] == 404
        assert kubelet.prestop_status

        # --force: removed anyway, the pod named.
        assert main(["install", "--timeout", "0", "--istio-namespace", ns]) == 0
        create(cp, f"/api/v1/namespaces/{app}/pods", app_pod(app, "client2", nodes[1], ebpf_template=True))
        capsys.readouterr()
        assert main(["uninstall", "--force", "--timeout", "60", "--istio-namespace", ns]) == 0
        err = capsys.readouterr().err
        warned = [line for line in err.splitlines() if line.startswith("warning: pod")]
        assert warned == [f"warning: pod {app}/client2 (node {nodes[1]}) now runs without capture: its app's "
                          "traffic bypasses Envoy until the pod is restarted"], err
        assert cp.request("GET", DAEMONSET)[0] == 404
    finally:
        kubelet.close()
        for name in ("client", "restarted", "client2"):
            delete_pod(cp, app, name)
        cp.request("DELETE", f"/api/v1/namespaces/{app}")


def test_render_output_applies_on_a_fresh_cluster(cp, tools):
    """helm template --post-renderer 'istio-ebpf render' | kubectl apply -f - : first try."""
    ns = f"istio-apply-{uuid.uuid4().hex[:6]}"
    text = helm_template(tools, "master", ns, f"global.istioNamespace={ns}", "autoscaleEnabled=false",
                         post_renderer=True)
    kinds = [d["kind"] for d in yaml.safe_load_all(text) if d]
    agent = [d.kind for d in manifests.agent_documents()]
    assert kinds[-len(agent):] == agent and agent.index("Namespace") < agent.index("DaemonSet")
    # helm does not emit the release namespace; `kubectl create namespace` is the documented first step.
    kubectl = [str(tools / "kubectl"), "--kubeconfig", str(cp.kubeconfig)]
    subprocess.run(kubectl + ["create", "namespace", ns], check=True, capture_output=True)
    try:
        applied = subprocess.run(kubectl + ["apply", "-f", "-"], input=text, capture_output=True, text=True)
        assert applied.returncode == 0, applied.stderr
        assert "daemonset.apps/istio-ebpf-agent created" in applied.stdout
    finally:
        subprocess.run(kubectl + ["delete", "--wait=false", "--ignore-not-found", "-f", "-"], input=text,
                       capture_output=True, text=True)
        subprocess.run(kubectl + ["delete", "namespace", ns, "--wait=false"], capture_output=True)
        kubelet = Kubelet(cp, "")
        try:
            deadline = time.monotonic() + 120
            while cp.request("GET", f"/api/v1/namespaces/{AGENT_NS}")[0] != 404 and time.monotonic() < deadline:
                time.sleep(0.5)
        finally:
            kubelet.close()


def test_insecure_kubeconfig_warns_once_per_command_not_per_request(cp, tmp_path):
    """``insecure-skip-tls-verify: true``: one line of ours per command, where urllib3 printed its
    two-line InsecureRequestWarning on every request (an install printed it about 12 times)."""
    config = yaml.safe_load(cp.kubeconfig.read_text())
    for cluster in config["clusters"]:
        cluster["cluster"].pop("certificate-authority-data", None)
        cluster["cluster"].pop("certificate-authority", None)
        cluster["cluster"]["insecure-skip-tls-verify"] = True
    insecure = tmp_path / "insecure.kubeconfig"
    insecure.write_text(yaml.safe_dump(config))

    def status(kubeconfig: Path) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
        return subprocess.run([str(PROJECT_ROOT / ".venv" / "bin" / "istio-ebpf"), "status"], capture_output=True,
                              text=True, timeout=120, env=dict(env, KUBECONFIG=str(kubeconfig)))

    def around_insecure() -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess] | None:
        # The module's other tests share this API server; objects they deleted may still be going
        # away, so the insecure run counts only when verified runs before and after it agree.
        before, unverified, after = status(cp.kubeconfig), status(insecure), status(cp.kubeconfig)
        same = (before.returncode, before.stdout, before.stderr) == (after.returncode, after.stdout, after.stderr)
        return (before, unverified) if same else None

    verified, unverified = wait_for("a cluster state that holds across the insecure status run", around_insecure, 120)
    assert unverified.returncode == verified.returncode and unverified.stdout == verified.stdout, unverified.stderr
    assert "InsecureRequestWarning" not in unverified.stderr
    extra = [line for line in unverified.stderr.splitlines() if line not in verified.stderr.splitlines()]
    assert extra == [f"TLS verification is off for {cp.url} (insecure-skip-tls-verify in the kubeconfig): "
                     "the API server's identity is not checked"], unverified.stderr


def cluster_state(cp, ns: str, nodes: list[str]) -> dict:
    """What an install can change: the injector ConfigMaps (config and annotations), the backup
    ConfigMap, every agent object, and the nodes' labels."""
    cms = {name: (cm["data"], cm["metadata"].get("annotations")) for name, cm in injector_state(cp, ns).items()}
    backup = cp.request("GET", f"/api/v1/namespaces/{ns}/configmaps/{BACKUP_CONFIGMAP}")[0]
    agent = {f"{d.kind} {d.name}": cp.request("GET", kube_api.resource_path(
        d.data["apiVersion"], d.kind, d.namespace or None, d.name))[0] for d in manifests.agent_documents()}
    labels = {n: cp.request("GET", f"/api/v1/nodes/{n}")[1]["metadata"].get("labels") for n in nodes}
    return {"configmaps": cms, "backup": backup, "agent": agent, "labels": labels}


@pytest.mark.parametrize("failure", ["patch second ConfigMap", "apply DaemonSet", "label last node",
                                     "rollout (real: no kubelet, --timeout 2)", "post-install hook raises",
                                     "apiserver refuses the DaemonSet (immutable selector)"])
def test_install_failing_at_any_step_leaves_the_cluster_as_it_was(cp, istio, capsys, monkeypatch, failure):
    """Issue 21 item 5: a failure at any step undoes what that run changed (ConfigMap patches by a
    guarded JSON patch, created objects deleted, labels restored); the exit code is 1 and one line
    names the failed step and says it was rolled back."""
    namespaces, nodes = istio
    ns = namespaces["1.26.0"]   # two injectors there: the default and the canary revision
    # One node already carries a label the plan changes (podip there): the rollback must restore it.
    assert cp.request("PATCH", f"/api/v1/nodes/{nodes[1]}", {"metadata": {"labels": {NODE_MODE_LABEL: "cookie"}}},
                      content_type="application/merge-patch+json")[0] == 200
    timeout, step = "0", ""
    blocker = None
    if failure == "patch second ConfigMap":
        second = sorted(injector_state(cp, ns))[-1]
        step = f"patch ConfigMap {ns}/{second}"
    elif failure == "apply DaemonSet":
        step = "apply DaemonSet"
    elif failure == "label last node":
        step = f"label node {nodes[2]}"
    elif failure.startswith("rollout"):
        timeout, step = "2", "rollout DaemonSet"
    elif failure == "post-install hook raises":
        step = "post-install hooks"
        from istio_ebpf_plugin.install import manager

        class Raising:
            @manager.hookimpl
            def istio_ebpf_post_install(self, options, plan):
                raise RuntimeError("a plugin's post-install failed")
        pm = manager.create(load_entrypoints=False)
        pm.register(Raising(), name="raising")
        monkeypatch.setattr(manager, "_PM", pm)
    else:   # an agent DaemonSet of someone else's, whose selector ours cannot change
        create(cp, "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": AGENT_NS}})
        blocker = create(cp, f"/apis/apps/v1/namespaces/{AGENT_NS}/daemonsets", {
            "apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "istio-ebpf-agent"},
            "spec": {"selector": {"matchLabels": {"other": "x"}}, "template": {
                "metadata": {"labels": {"other": "x"}},
                "spec": {"nodeSelector": {"none": "none"}, "containers": [{"name": "c", "image": "c:1"}]}}}})
        step = "apply DaemonSet"
    if step and failure not in ("post-install hook raises",) and not failure.startswith(("rollout", "apiserver")):
        monkeypatch.setenv("ISTIO_EBPF_FAILPOINT", step)
    before = cluster_state(cp, ns, nodes)
    kubelet = Kubelet(cp, "")   # finishes the agent pods the rollback deletes
    try:
        code = main(["install", "--timeout", timeout, "--istio-namespace", ns])
    finally:
        kubelet.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1, err[-5:]
    assert err[-1].startswith(f"istio-ebpf: error: install failed at step '{step}"), err[-1]
    assert "rolled back (" in err[-1], err[-1]
    assert any(line.startswith("rolled back: ConfigMap") for line in err)
    assert cluster_state(cp, ns, nodes) == before
    print(f"{failure}: {err[-1]}")
    if blocker is not None:
        cp.request("DELETE", f"/apis/apps/v1/namespaces/{AGENT_NS}/daemonsets/istio-ebpf-agent")


def test_status_exits_non_zero_when_a_helm_upgrade_drops_the_ebpf_template(cp, istio, capsys):
    """Issue 21 item 10: istiod upgraded without the post-renderer (the ConfigMap put back to what
    Helm renders) loses the ebpf template; status says so and exits 1; install repairs it."""
    namespaces, _ = istio
    ns = namespaces["1.14.0"]
    path = f"/api/v1/namespaces/{ns}/configmaps/istio-sidecar-injector"
    stock = cp.request("GET", path)[1]["data"]["config"]
    assert main(["install", "--timeout", "0", "--istio-namespace", ns]) == 0
    assert cp.request("PATCH", path, {"data": {"config": stock}}, content_type="application/merge-patch+json")[0] \
        == 200
    capsys.readouterr()
    assert main(["status", "--istio-namespace", ns]) == 1
    assert f"PROBLEM: ConfigMap {ns}/istio-sidecar-injector: ebpf template missing" in capsys.readouterr().out
    assert main(["install", "--timeout", "0", "--istio-namespace", ns]) == 0
    assert injector_config.is_installed(cp.request("GET", path)[1]["data"]["config"])


def test_install_rollback_keeps_someone_elses_edit_and_says_what_is_left(cp, istio, capsys, monkeypatch):
    """Issue 21 item 5: when the injector ConfigMap was edited by someone else after our patch, the
    rollback's guarded patch is refused by the server (their edit is kept), the rest is undone, and
    install exits 3 with a line naming what is left."""
    from istio_ebpf_plugin.install import manager

    namespaces, nodes = istio
    ns = namespaces["1.14.0"]
    path = f"/api/v1/namespaces/{ns}/configmaps/istio-sidecar-injector"

    class EditThenFail:
        @manager.hookimpl
        def istio_ebpf_post_install(self, options, plan):
            cfg = cp.request("GET", path)[1]["data"]["config"]
            assert cp.request("PATCH", path, {"data": {"config": cfg + "\n# an operator's edit\n"}},
                              content_type="application/merge-patch+json")[0] == 200
            raise RuntimeError("a plugin's post-install failed")
    pm = manager.create(load_entrypoints=False)
    pm.register(EditThenFail(), name="edit-then-fail")
    monkeypatch.setattr(manager, "_PM", pm)
    kubelet = Kubelet(cp, "")
    try:
        assert main(["install", "--timeout", "0", "--istio-namespace", ns]) == 3
    finally:
        kubelet.close()
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("istio-ebpf: error: install failed at step 'post-install hooks'"), last
    assert f"rollback incomplete, left as changed: ConfigMap {ns}/istio-sidecar-injector patched" in last, last
    cfg = cp.request("GET", path)[1]["data"]["config"]
    assert cfg.endswith("# an operator's edit\n") and injector_config.is_installed(cfg)
    assert cluster_state(cp, ns, nodes)["agent"] == dict.fromkeys(cluster_state(cp, ns, nodes)["agent"], 404)
    assert cp.request("GET", f"/api/v1/namespaces/{ns}/configmaps/{BACKUP_CONFIGMAP}")[0] == 404
    print(last)


def test_install_never_overwrites_a_label_the_agent_publishes_meanwhile(cp, istio, capsys):
    """Issue 21 item 11: the agent publishes unsupported between install's read of the Nodes and its
    label write. The write is a JSON patch testing the resourceVersion read, so the server refuses it
    and install, re-reading, keeps the agent's label (the old merge patch overwrote it with the kernel rule)."""
    namespaces, nodes = istio
    ns = namespaces["1.26.0"]
    raced: list[str] = []

    def agent_publishes(name: str) -> None:
        if not raced and name in nodes:
            raced.append(name)
            assert cp.request("PATCH", f"/api/v1/nodes/{name}", {"metadata": {
                "labels": {NODE_MODE_LABEL: "unsupported"},
                "annotations": {"istio-ebpf.io/mode-reason": "cgroup_v2: no cgroup v2 mount"}}},
                content_type="application/merge-patch+json")[0] == 200

    class Racing(kube_api.HttpBackend):
        def json_patch_node(self, name, ops):
            agent_publishes(name)
            return super().json_patch_node(name, ops)

        def patch_node_labels(self, name, labels):
            if any(v is not None for v in labels.values()):
                agent_publishes(name)
            return super().patch_node_labels(name, labels)

    previous = kube_api.use_backend(Racing())
    try:
        assert main(["install", "--timeout", "0", "--istio-namespace", ns]) == 0
    finally:
        kube_api.use_backend(previous)
    assert raced, "install wrote no node label"
    assert node_labels(cp, raced) == {raced[0]: "unsupported"}
    assert f"node {raced[0]}: label {NODE_MODE_LABEL}=unsupported kept" in capsys.readouterr().err


def test_status_shows_captured_only_where_a_ready_agent_renews_its_label(cp, istio, capsys):
    """Issue 21 item 13: install labels nodes from their kernel before any agent confirms. status used to
    say 'captured by eBPF' from the label alone; now a node is captured only while its agent pod (the
    DaemonSet's, on that node) is Ready and the heartbeat the agent renews with its label is fresh."""
    from istio_ebpf_plugin import HEARTBEAT_ANNOTATION
    from istio_ebpf_plugin.agent.node_agent import heartbeat

    namespaces, nodes = istio
    new, mid, old = nodes
    # A node the DaemonSet does not select (no kubernetes.io/os label yet), Linux amd64 by its nodeInfo:
    # install labels it cookie from its kernel, and no agent pod ever runs there.
    lone = f"{new}-noagent"
    create(cp, "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": lone}})
    try:
        assert cp.request("PATCH", f"/api/v1/nodes/{lone}/status", {"status": {"nodeInfo": {
            "kernelVersion": KERNELS["new"], "operatingSystem": "linux", "architecture": "amd64"}}},
            content_type="application/merge-patch+json")[0] == 200
        for ns in namespaces.values():
            assert main(["install", "--timeout", "0", "--istio-namespace", ns]) == 0
        assert node_labels(cp, [lone, new])[lone] == "cookie"
        capsys.readouterr()

        def status() -> tuple[int, str]:
            rc = main(["status"])
            out = capsys.readouterr()
            assert "captured by eBPF" not in out.err
            return rc, out.out

        def agent_pod(node: str) -> dict:
            found: list[dict] = []

            def bound() -> bool:
                items = cp.request("GET", f"/api/v1/namespaces/{AGENT_NS}/pods")[1]["items"]
                found[:] = [p for p in items if p["spec"].get("nodeName") == node]
                return bool(found)
            wait_until(bound, 60, f"the DaemonSet's pod on {node}")
            return found[0]

        def set_ready(pod: dict, ready: bool) -> None:
            cond = {"type": "Ready", "status": str(ready), "reason": "" if ready else "ContainersNotReady",
                    "lastTransitionTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            st, out = cp.request("PATCH", f"/api/v1/namespaces/{AGENT_NS}/pods/{pod['metadata']['name']}/status",
                                 {"status": {"phase": "Running", "conditions": [cond]}},
                                 content_type="application/strategic-merge-patch+json")
            assert st == 200, out

        def beat(node: str, mode: str, age: float) -> None:
            st, out = cp.request("PATCH", f"/api/v1/nodes/{node}", {"metadata": {"annotations": {
                HEARTBEAT_ANNOTATION: heartbeat(mode, 60.0, time.time() - age)}}},
                content_type="application/merge-patch+json")
            assert st == 200, out

        # 1. No agent pod on a node install labelled cookie: not captured, exit non-zero.
        rc, out = status()
        assert rc == 1
        assert f"PROBLEM: node {lone}: no agent: labelled cookie, no agent pod on this node" in out, out
        # 2. An agent pod that is not Ready (its status set through the API, as a kubelet would).
        pods = {n: agent_pod(n) for n in (new, mid, old)}
        set_ready(pods[new], False)
        rc, out = status()
        assert rc == 1
        assert f"PROBLEM: node {new}: agent not ready: labelled cookie, agent pod {AGENT_NS}/" in out, out
        assert "ContainersNotReady" in out
        # 3. Every agent pod Ready, fresh heartbeats, the agentless node gone: captured, exit 0.
        for pod in pods.values():
            set_ready(pod, True)
        beat(new, "cookie", 5)
        beat(mid, "podip", 5)
        assert cp.request("DELETE", f"/api/v1/nodes/{lone}")[0] == 200
        wait_until(lambda: "3/3 available" in status()[1], 60, "the DaemonSet to count the Ready pods")
        rc, out = status()
        assert rc == 0, out
        assert f"ok: node {new}: captured: cookie, agent pod {AGENT_NS}/" in out
        assert f"ok: node {mid}: captured: podip" in out
        assert f"ok: node {old}: unsupported: kernel {KERNELS['old']}" in out
        # 4. A stale heartbeat (the agent stopped renewing its label 10 min ago): not captured.
        beat(new, "cookie", 600)
        rc, out = status()
        assert rc == 1
        assert f"PROBLEM: node {new}: agent not ready: agent pod {AGENT_NS}/" in out
        assert re.search(r"heartbeat 60\d s old \(stale after 180 s\)", out), out
        assert f"ok: node {mid}: captured" in out
    finally:
        cp.request("DELETE", f"/api/v1/nodes/{lone}")


def wait_until(cond, timeout: float, what: str) -> None:
    from support.polling import wait_for
    wait_for(cond, timeout, what, interval=0.3)
