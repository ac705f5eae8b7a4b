"""install / uninstall / status against a fake API, swapped in at kube_api (and only there).

The same commands run against a real kube-apiserver in test_install_kube_e2e.py. The fake stays for
what the real server does not give on demand: a DaemonSet that rolls out (no kubelet there),
a 403 on listing nodes, a ConfigMap replaced underneath between two commands, and speed.
"""

from __future__ import annotations

import copy
import json

import pytest

from support.fake_kube import FakeKube
from support.istio_fixtures import FIXTURES
from istio_ebpf_plugin import NODE_MODE_LABEL, kube_api
from istio_ebpf_plugin.cli import main
from istio_ebpf_plugin.errors import TemporaryError
from istio_ebpf_plugin.install import injector_config
from istio_ebpf_plugin.install.plugin import BACKUP_CONFIGMAP, INSTALLED_ANNOTATION

CONFIG = (FIXTURES / "master" / "rendered" / "istio-sidecar-injector.config.yaml").read_text()
CONFIG_114 = (FIXTURES / "v1.14.0" / "rendered" / "istio-sidecar-injector.config.yaml").read_text()

AGENT = """\
apiVersion: v1
kind: Namespace
metadata:
  name: istio-ebpf-test
---
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: istio-ebpf-agent
  namespace: istio-ebpf-test
spec:
  selector:
    matchLabels: {app: a}
  template:
    metadata:
      labels: {app: a}
    spec:
      containers:
      - name: agent
        image: example.invalid/agent:test
"""


class ApiError(Exception):
    def __init__(self, status: int, body: str = "") -> None:
        super().__init__(f"({status})")
        self.status, self.body, self.reason = status, body, "error"


@pytest.fixture
def agent_dir(tmp_path, monkeypatch):
    d = tmp_path / "manifests"
    d.mkdir()
    (d / "agent.yaml").write_text(AGENT)
    monkeypatch.setenv("ISTIO_EBPF_MANIFESTS_DIR", str(d))
    return d


@pytest.fixture
def cluster(agent_dir):
    fake = FakeKube(configs={"istio-sidecar-injector": CONFIG, "istio-sidecar-injector-canary": CONFIG_114},
                    kernels={"n-new": "6.1.0-18-amd64", "n-mid": "5.10.0-28-amd64", "n-old": "4.19.0-26-amd64"})
    previous = kube_api.use_installer_backend(fake)
    yield fake
    kube_api.use_installer_backend(previous)


def _cfg(fake, name="istio-sidecar-injector"):
    return fake.configmaps[("istio-system", name)]["data"]["config"]


def test_install_patches_every_revision_applies_agent_labels_nodes(cluster, capsys):
    assert main(["install", "--timeout", "5"]) == 0
    out = capsys.readouterr()
    for name in ("istio-sidecar-injector", "istio-sidecar-injector-canary"):
        cfg = _cfg(cluster, name)
        assert injector_config.is_installed(cfg)
        ann = cluster.configmaps[("istio-system", name)]["metadata"]["annotations"]
        assert len(ann[INSTALLED_ANNOTATION]) == 64
    # Every patch is guarded by a test of the resourceVersion it was computed from.
    for _, ops in cluster.patches:
        assert ops[0] == {"op": "test", "path": "/metadata/resourceVersion", "value": "1"}
        assert ops[1]["op"] == "replace" and ops[1]["path"] == "/data/config"
    assert ("apps/v1", "DaemonSet", "istio-ebpf-test", "istio-ebpf-agent") in cluster.objects
    backup = cluster.objects[("v1", "ConfigMap", "istio-system", BACKUP_CONFIGMAP)]
    assert backup["data"]["istio-sidecar-injector"] == CONFIG
    labels = {n: cluster.nodes[n]["metadata"]["labels"].get(NODE_MODE_LABEL) for n in cluster.nodes}
    assert labels == {"n-new": "cookie", "n-mid": "podip", "n-old": "unsupported"}
    assert "rollout istio-ebpf-test/istio-ebpf-agent: 3/3 updated, 3/3 available" in out.err
    assert "n-old" in out.out and "unsupported" in out.out


def test_install_twice_changes_nothing(cluster, capsys):
    assert main(["install", "--timeout", "0"]) == 0
    state = copy.deepcopy(cluster.configmaps)
    n = len(cluster.patches)
    assert main(["install", "--timeout", "0"]) == 0
    assert cluster.configmaps == state and len(cluster.patches) == n
    assert "unchanged" in capsys.readouterr().err


def test_uninstall_restores_exactly(cluster, capsys):
    original = copy.deepcopy(cluster.configmaps)
    assert main(["install", "--timeout", "0"]) == 0
    assert main(["uninstall"]) == 0
    for key, cm in original.items():
        assert cluster.configmaps[key]["data"] == cm["data"]
        assert INSTALLED_ANNOTATION not in (cluster.configmaps[key]["metadata"].get("annotations") or {})
    assert cluster.objects == {}  # agent and backup gone
    assert all(NODE_MODE_LABEL not in n["metadata"]["labels"] for n in cluster.nodes.values())
    assert "restored exactly" in capsys.readouterr().err


def test_concurrent_edit_fails_the_test_op_then_retry_succeeds(cluster, capsys):
    def someone_else(fake):
        cm = fake.configmaps[("istio-system", "istio-sidecar-injector")]
        cm["data"]["config"] = cm["data"]["config"].replace("policy: enabled", "policy: disabled")
        cm["metadata"]["resourceVersion"] = str(int(cm["metadata"]["resourceVersion"]) + 1)

    cluster.before_patch = someone_else
    assert main(["install", "--timeout", "0"]) == 0
    cfg = _cfg(cluster)
    assert "policy: disabled" in cfg  # their edit survived
    assert injector_config.is_installed(cfg)  # ours went in on the retry
    assert "changed by someone else meanwhile" in capsys.readouterr().err


def test_uninstall_after_partial_install(cluster, capsys):
    # Only the default revision got patched, and the agent was never applied.
    cfg = injector_config.add(CONFIG)
    cluster.configmaps[("istio-system", "istio-sidecar-injector")]["data"]["config"] = cfg
    assert main(["uninstall"]) == 0
    assert _cfg(cluster) == CONFIG
    assert _cfg(cluster, "istio-sidecar-injector-canary") == CONFIG_114
    assert "already absent" in capsys.readouterr().err


def agents_running(fake) -> None:
    """What a rolled-out agent leaves (no kubelet here): a Ready agent pod on every node and, on each
    node, the heartbeat the agent renews with its label (else status says no agent / not ready)."""
    from istio_ebpf_plugin import HEARTBEAT_ANNOTATION
    from istio_ebpf_plugin.agent.node_agent import heartbeat

    pods = [{"metadata": {"namespace": "istio-ebpf-test", "name": f"agent-{n}"}, "spec": {"nodeName": n},
             "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}
            for n in fake.nodes]
    fake.list_pods = lambda namespace, selector: copy.deepcopy(pods) if selector else []
    for node in fake.nodes.values():
        mode = node["metadata"]["labels"][NODE_MODE_LABEL]
        node["metadata"].setdefault("annotations", {})[HEARTBEAT_ANNOTATION] = heartbeat(mode, 60.0)


def test_status_reports_istio_upgrade_and_install_repairs(cluster, capsys):
    assert main(["install", "--timeout", "0"]) == 0
    assert main(["status"]) == 1          # labelled, but no agent confirmed any node yet
    assert "PROBLEM: node n-new: no agent: labelled cookie" in capsys.readouterr().out
    agents_running(cluster)
    assert main(["status"]) == 0
    # status links to the per-node pod view (istio-ebpf pods, run in that node's agent pod)
    assert "-- istio-ebpf pods" in capsys.readouterr().out
    # Istio upgraded underneath: the injector ConfigMap is replaced without our template.
    cluster.configmaps[("istio-system", "istio-sidecar-injector")]["data"]["config"] = CONFIG
    assert main(["status"]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM: ConfigMap istio-system/istio-sidecar-injector: ebpf template missing" in out
    assert main(["install", "--timeout", "0"]) == 0
    assert main(["status"]) == 0
    # A sidecar template changed by an upgrade makes ours stale: reported, then repaired.
    stale = injector_config.add(CONFIG).replace('"--run-validation"', '"--run-validation" ', 1)
    cluster.configmaps[("istio-system", "istio-sidecar-injector")]["data"]["config"] = stale
    capsys.readouterr()
    assert main(["status"]) == 1
    assert "stale" in capsys.readouterr().out


def test_dry_run_prints_patches_and_manifests_and_changes_nothing(cluster, capsys):
    before = copy.deepcopy(cluster.configmaps)
    assert main(["install", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert cluster.configmaps == before and cluster.objects == {} and not cluster.patches
    assert out.count("# JSON patch (RFC 6902) for ConfigMap istio-system/") == 2
    assert '"op": "test"' in out and "kind: DaemonSet" in out
    assert all(NODE_MODE_LABEL not in n["metadata"]["labels"] for n in cluster.nodes.values())


def test_cluster_errors_are_classified(cluster, capsys):
    cluster.configmaps.clear()
    assert main(["install", "--timeout", "0"]) == 1
    assert "is Istio installed?" in capsys.readouterr().err

    def forbidden(*a, **k):
        raise ApiError(403, json.dumps({"message": "nodes is forbidden"}))

    cluster.list_nodes = forbidden
    assert main(["status"]) == 1
    err = capsys.readouterr().err
    assert "HTTP 403" in err and "forbidden" in err and err.count("\n") == 1
    assert isinstance(kube_api.classify_api_error(ApiError(503), "x"), TemporaryError)
    assert isinstance(kube_api.classify_api_error(ConnectionError("refused"), "x"), TemporaryError)
    assert isinstance(kube_api.classify_api_error(
        ApiError(422, '{"message": "the server rejected our request due to an error in our request"}'), "x"),
        kube_api.ConcurrentEditError)


def test_garbage_kernel_and_bad_mode_exit_2(cluster, capsys):
    cluster.nodes["n-bad"] = {"metadata": {"name": "n-bad", "labels": {}},
                              "status": {"nodeInfo": {"kernelVersion": "not-a-kernel"}}}
    assert main(["install"]) == 2
    err = capsys.readouterr().err
    assert "n-bad" in err and err.count("\n") == 1
    assert not cluster.patches
    assert main(["install", "--mode", "fast"]) == 2


def test_mode_override_labels_every_node(cluster):
    assert main(["install", "--timeout", "0", "--mode", "podip"]) == 0
    assert {n["metadata"]["labels"][NODE_MODE_LABEL] for n in cluster.nodes.values()} == {"podip"}
    ds = cluster.objects[("apps/v1", "DaemonSet", "istio-ebpf-test", "istio-ebpf-agent")]
    assert {"name": "ISTIO_EBPF_MODE", "value": "podip"} in ds["spec"]["template"]["spec"]["containers"][0]["env"]


def test_install_without_agent_manifests_changes_nothing(cluster, tmp_path, monkeypatch, capsys):
    before = copy.deepcopy(cluster.configmaps)
    monkeypatch.setenv("ISTIO_EBPF_MANIFESTS_DIR", str(tmp_path / "absent"))
    assert main(["install", "--timeout", "0"]) == 2
    err = capsys.readouterr().err.splitlines()   # the rollout plan table, then the error
    assert err[-1].startswith("istio-ebpf: error: agent manifests not found")
    assert not any("error" in line for line in err[:-1])
    assert cluster.configmaps == before and cluster.patches == [] and cluster.objects == {}


def test_install_image_flag_and_environment(cluster, monkeypatch):
    def images():
        ds = cluster.objects[("apps/v1", "DaemonSet", "istio-ebpf-test", "istio-ebpf-agent")]
        return {c["image"] for c in ds["spec"]["template"]["spec"]["containers"]}

    monkeypatch.setenv("ISTIO_EBPF_IMAGE", "registry.example/env:2")
    assert main(["install", "--timeout", "0"]) == 0
    assert images() == {"registry.example/env:2"}
    assert main(["install", "--timeout", "0", "--image", "registry.example/flag:3"]) == 0
    assert images() == {"registry.example/flag:3"}
    assert main(["install", "--timeout", "0", "--image", "bad ref"]) == 2
    assert images() == {"registry.example/flag:3"}
