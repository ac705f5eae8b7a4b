"""`istio-ebpf render` on Istio's real manifests, and its errors."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from support.istio_fixtures import FIXTURES
from istio_ebpf_plugin import PROJECT_ROOT
from istio_ebpf_plugin.cli import main
from istio_ebpf_plugin.install import injector_config, manifests

MANIFESTS_DIR = PROJECT_ROOT / "manifests"

ROOT = Path(__file__).resolve().parents[1]
GOLDENS = [FIXTURES / "master" / "manifest-generate" / "output" / "pilot_default.golden.yaml",
           FIXTURES / "master" / "manifest-generate" / "output" / "sidecar_template.golden.yaml",
           FIXTURES / "v1.14.0" / "gen-istio.yaml"]

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
    matchLabels: {app: istio-ebpf-agent}
  template:
    metadata:
      labels: {app: istio-ebpf-agent}
    spec:
      containers:
      - name: agent
        image: example.invalid/istio-ebpf:test
"""


@pytest.fixture
def agent_dir(tmp_path, monkeypatch):
    d = tmp_path / "manifests"
    d.mkdir()
    (d / "10-agent.yaml").write_text(AGENT)
    monkeypatch.setenv("ISTIO_EBPF_MANIFESTS_DIR", str(d))
    return d


def run(args, stdin: str | None = None, env_dir: Path | None = None):
    env = dict(os.environ)
    if env_dir is not None:
        env["ISTIO_EBPF_MANIFESTS_DIR"] = str(env_dir)
    return subprocess.run([str(ROOT / ".venv" / "bin" / "istio-ebpf"), *args], input=stdin,
                          capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("golden", GOLDENS, ids=lambda p: f"{p.parent.parent.parent.name}/{p.name}")
def test_render_changes_only_the_injector_and_appends_the_agent(agent_dir, golden, capsys):
    source = golden.read_text()
    assert main(["render", "-f", str(golden)]) == 0
    out = capsys.readouterr().out
    before = manifests.split(source).documents
    after = manifests.split(out).documents
    agent = manifests.agent_documents(agent_dir)
    assert len(after) == len(before) + len(agent)
    for old, new in zip(before, after, strict=False):
        if old.kind == "ConfigMap" and old.name == "istio-sidecar-injector":
            old_cfg = injector_config.parse(old.data["data"]["config"])
            new_cfg = injector_config.parse(new.data["data"]["config"])
            for name, text in old_cfg["templates"].items():
                assert new_cfg["templates"][name] == text  # every existing template byte-identical
            assert new_cfg["templates"]["ebpf"].startswith("{{- /* istio-ebpf")
            assert new_cfg["defaultTemplates"] == injector_config.effective_defaults(old_cfg) + ["ebpf"]
            assert {k: v for k, v in new.data.items() if k != "data"} == \
                {k: v for k, v in old.data.items() if k != "data"}
            assert new.data["data"]["values"] == old.data["data"]["values"]
            # Only the lines of our two insertions differ.
            added = set(new.text.splitlines()) - set(old.text.splitlines())
            assert all("ebpf" in ln or ln.startswith("        ") or not ln.strip() for ln in added)
        else:
            assert new.separator + new.text == old.separator + old.text  # byte-identical
    assert [d.text for d in after[len(before):]] == [d.text for d in agent]


@pytest.mark.parametrize("golden", GOLDENS, ids=lambda p: p.name)
def test_render_is_idempotent(agent_dir, golden, tmp_path, capsys):
    assert main(["render", "-f", str(golden)]) == 0
    first = capsys.readouterr().out
    (tmp_path / "once.yaml").write_text(first)
    assert main(["render", "-f", str(tmp_path / "once.yaml")]) == 0
    assert capsys.readouterr().out == first


def test_custom_template_and_user_defaults_are_kept(agent_dir, capsys):
    golden = GOLDENS[1]
    assert main(["render", "-f", str(golden)]) == 0
    out = capsys.readouterr().out
    cm = next(d for d in manifests.split(out).documents if d.name == "istio-sidecar-injector")
    cfg = injector_config.parse(cm.data["data"]["config"])
    assert cfg["defaultTemplates"] == ["sidecar", "credential-volume", "ebpf"]
    assert "credential-volume" in cfg["templates"]


def test_render_as_helm_post_renderer_reads_stdin(agent_dir):
    proc = run(["render"], stdin=GOLDENS[2].read_text(), env_dir=agent_dir)
    assert proc.returncode == 0, proc.stderr
    assert "ebpf: |" in proc.stdout and proc.stdout.rstrip().endswith("image: example.invalid/istio-ebpf:test")


def test_revisions_each_get_the_template(agent_dir, capsys, tmp_path):
    text = GOLDENS[0].read_text()
    canary = text.replace("name: istio-sidecar-injector\n  namespace: istio-system",
                          "name: istio-sidecar-injector-canary\n  namespace: istio-system")
    f = tmp_path / "two.yaml"
    f.write_text(text + "---\n" + canary)
    assert main(["render", "-f", str(f)]) == 0
    docs = manifests.split(capsys.readouterr().out).documents
    injectors = [d for d in docs if manifests.injector_revision(d.name) is not None and d.kind == "ConfigMap"
                 and "config" in (d.data.get("data") or {})]
    assert {d.name for d in injectors} == {"istio-sidecar-injector", "istio-sidecar-injector-canary"}
    assert all(injector_config.is_installed(d.data["data"]["config"]) for d in injectors)
    # --revision restricts to one.
    assert main(["render", "-f", str(f), "--revision", "canary"]) == 0
    docs = manifests.split(capsys.readouterr().out).documents
    status = {d.name: injector_config.is_installed(d.data["data"]["config"]) for d in docs
              if d.kind == "ConfigMap" and "config" in (d.data.get("data") or {})
              and manifests.injector_revision(d.name) is not None}
    assert status == {"istio-sidecar-injector": False, "istio-sidecar-injector-canary": True}


def test_mode_override_reaches_the_agent(agent_dir, capsys):
    assert main(["render", "-f", str(GOLDENS[2]), "--mode", "podip"]) == 0
    out = capsys.readouterr().out
    ds = next(d for d in manifests.split(out).documents if d.kind == "DaemonSet")
    env = ds.data["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "ISTIO_EBPF_MODE", "value": "podip"} in env


def _nodes(*kernels: str) -> str:
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": [
        {"metadata": {"name": f"node-{i}", "labels": {}}, "status": {"nodeInfo": {"kernelVersion": k}}}
        for i, k in enumerate(kernels)]})


def test_render_nodes_prints_plan_on_stderr(agent_dir, tmp_path, capsys):
    nodes = tmp_path / "nodes.json"
    nodes.write_text(_nodes("6.1.0-18-amd64", "5.10.0-28-cloud-amd64", "4.19.0-26-amd64", "5.15.0-1034-aws"))
    assert main(["render", "-f", str(GOLDENS[0]), "--nodes", str(nodes)]) == 0
    cap = capsys.readouterr()
    rows = {ln.split()[0]: ln.split() for ln in cap.err.splitlines() if ln.startswith("node-")}
    assert rows["node-0"][3] == "cookie" and rows["node-1"][3] == "podip"
    assert rows["node-2"][3] == "unsupported" and rows["node-3"][3] == "cookie"
    assert "4 node(s): 2 cookie, 1 podip, 1 unsupported" in cap.err
    assert "node-0" not in cap.out  # stdout carries only manifests
    assert main(["render", "-f", str(GOLDENS[0]), "--nodes", str(nodes), "--mode", "unsupported"]) == 0
    assert "4 node(s): 0 cookie, 0 podip, 4 unsupported" in capsys.readouterr().err


BAD_INPUTS = {
    "not-yaml": ("kind: [\n", "not valid YAML"),
    "no-injector": ("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: istio\ndata:\n  mesh: '{}'\n",
                    "no istio-sidecar-injector ConfigMap"),
    "not-a-mapping": ("- a\n- b\n", "not a Kubernetes object"),
    "bad-config": ("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: istio-sidecar-injector\n"
                   "data:\n  config: |-\n    templates: [unclosed\n", "config is not valid YAML"),
    "config-not-mapping": ("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: istio-sidecar-injector\n"
                           "data:\n  config: just a string\n", "expected a mapping"),
    "no-sidecar-template": ("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: istio-sidecar-injector\n"
                            "data:\n  config: |-\n    templates:\n      gateway: |\n        spec: {}\n",
                            "no 'sidecar' template"),
    "empty": ("", "empty input"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_one_line_exit_2_no_output(agent_dir, case):
    stdin, message = BAD_INPUTS[case]
    proc = run(["render"], stdin=stdin, env_dir=agent_dir)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and message in proc.stderr and "Traceback" not in proc.stderr


def test_ambiguous_revisions(agent_dir, tmp_path):
    text = GOLDENS[0].read_text()
    other = text.replace("namespace: istio-system", "namespace: istio-other")
    proc = run(["render"], stdin=text + "---\n" + other, env_dir=agent_dir)
    assert proc.returncode == 2 and proc.stdout == "" and "ambiguous revisions" in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_foreign_ebpf_template_is_refused(agent_dir):
    text = GOLDENS[0].read_text().replace("    templates:\n      sidecar: |",
                                          "    templates:\n      ebpf: |\n        spec: {}\n      sidecar: |", 1)
    proc = run(["render"], stdin=text, env_dir=agent_dir)
    assert proc.returncode == 2 and proc.stdout == "" and "not written by istio-ebpf" in proc.stderr


@pytest.mark.parametrize("args,message", [
    (["--mode", "turbo"], "unknown mode 'turbo'"),
    (["--nodes", "NODES_GARBAGE"], "unparseable kernel version"),
    (["--nodes", "NODES_NOTJSON"], "not JSON"),
    (["--nodes", "/nonexistent/nodes.json"], "cannot read"),
    (["-f", "/nonexistent/in.yaml"], "cannot read"),
])
def test_bad_options_one_line_exit_2(agent_dir, tmp_path, args, message):
    (tmp_path / "garbage.json").write_text(_nodes("6.1.0", "banana-kernel"))
    (tmp_path / "notjson.json").write_text("{nope")
    args = [a.replace("NODES_GARBAGE", str(tmp_path / "garbage.json"))
             .replace("NODES_NOTJSON", str(tmp_path / "notjson.json")) for a in args]
    proc = run(["render", *args], stdin=GOLDENS[0].read_text(), env_dir=agent_dir)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and proc.stderr.count("\n") == 1 and message in proc.stderr


def test_real_manifests_dir_is_rendered_when_present(capsys, monkeypatch):
    monkeypatch.delenv("ISTIO_EBPF_MANIFESTS_DIR", raising=False)
    files = sorted(MANIFESTS_DIR.glob("*.yaml"))
    assert main(["render", "-f", str(GOLDENS[0])]) == 0
    out = capsys.readouterr().out
    docs = manifests.split(out).documents
    agent = manifests.agent_documents(MANIFESTS_DIR)
    objects = [d for f in files for d in manifests.split(f.read_text()).documents
               if d.data and not str(d.data.get("apiVersion", "")).startswith("kustomize.config.k8s.io/")]
    assert len(agent) == len(objects)
    assert all(d.kind != "Kustomization" for d in docs)  # kustomization.yaml is a build file, not an object
    if agent:
        assert [d.text for d in docs[len(docs) - len(agent):]] == [d.text for d in agent]
    else:  # manifests/ still empty: nothing appended
        assert len(docs) == len(manifests.split(GOLDENS[0].read_text()).documents)


def test_release_image_follows_the_package_version_and_a_site_image_stays(agent_dir, tmp_path, capsys, monkeypatch):
    from istio_ebpf_plugin import __version__

    monkeypatch.delenv("ISTIO_EBPF_IMAGE", raising=False)
    assert main(["render", "-f", str(GOLDENS[0])]) == 0   # the site's own image: kept byte for byte
    assert "image: example.invalid/istio-ebpf:test\n" in capsys.readouterr().out
    (agent_dir / "10-agent.yaml").write_text(AGENT.replace("example.invalid/istio-ebpf:test",
                                                           "ghcr.io/istio-ebpf/agent:0.0.1"))
    assert main(["render", "-f", str(GOLDENS[0])]) == 0   # an older release tag: this version's
    out = capsys.readouterr().out
    assert f"image: ghcr.io/istio-ebpf/agent:{__version__}\n" in out and "agent:0.0.1" not in out
    monkeypatch.delenv("ISTIO_EBPF_MANIFESTS_DIR")
    assert main(["render", "-f", str(GOLDENS[0])]) == 0   # the shipped manifests already carry it
    daemonset = (MANIFESTS_DIR / "daemonset.yaml").read_text()
    # mount-bpffs, prepare-datapath, agent
    assert daemonset.count(f"image: ghcr.io/istio-ebpf/agent:{__version__}\n") == 3
    assert daemonset in capsys.readouterr().out
