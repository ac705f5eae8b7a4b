"""manifests/ and the Containerfile: schema-valid, least privilege, and consistent with the CLI."""

from __future__ import annotations

import re
import shlex

import kubernetes_validate
import pytest
import yaml

from istio_ebpf_plugin import PROJECT_ROOT
from istio_ebpf_plugin.cli import build_parser

MANIFESTS_DIR = PROJECT_ROOT / "manifests"

VERSIONS = ["1.29.0", "1.33.0"]
FILES = ["namespace.yaml", "rbac.yaml", "daemonset.yaml", "service.yaml"]


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((MANIFESTS_DIR / name).read_text()) if d]


def daemonset() -> dict:
    (ds,) = docs("daemonset.yaml")
    return ds


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", FILES)
def test_manifests_validate_against_the_kubernetes_schema(name, version):
    for doc in docs(name):
        kubernetes_validate.validate(doc, version, strict=True)


def test_kustomization_lists_every_manifest():
    (k,) = docs("kustomization.yaml")
    assert sorted(k["resources"]) == sorted(FILES)


def test_agent_container_is_not_privileged_and_lists_its_capabilities():
    spec = daemonset()["spec"]["template"]["spec"]
    (agent,) = spec["containers"]
    sc = agent["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == {"BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE", "SYS_RESOURCE",
                                                "DAC_READ_SEARCH"}
    # each capability carries a justification comment right above it
    text = (MANIFESTS_DIR / "daemonset.yaml").read_text().splitlines()
    for cap in sc["capabilities"]["add"]:
        i = next(n for n, line in enumerate(text) if line.strip() == f"- {cap}")
        assert text[i - 1].strip().startswith("#"), cap
    # the only privileged container is the bpffs mount helper
    privileged = [c["name"] for c in spec["initContainers"] + spec["containers"]
                  if c.get("securityContext", {}).get("privileged")]
    assert privileged == ["mount-bpffs"]
    assert spec["hostNetwork"] and spec["hostPID"] and spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}]


def test_only_the_needed_host_paths():
    spec = daemonset()["spec"]["template"]["spec"]
    host = {v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert host == {"/sys/fs/cgroup", "/sys/fs/bpf", "/proc", "/lib/modules", "/usr/src"}
    (agent,) = spec["containers"]
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    for path in ("/sys/fs/cgroup", "/host/proc", "/lib/modules", "/usr/src"):
        assert mounts[path]["readOnly"] is True
    assert mounts["/sys/fs/bpf"]["mountPropagation"] == "HostToContainer"
    init = spec["initContainers"][0]["volumeMounts"][0]
    assert init["mountPath"] == "/sys/fs/bpf" and init["mountPropagation"] == "Bidirectional"


def test_commands_in_the_daemonset_parse_with_our_cli():
    spec = daemonset()["spec"]["template"]["spec"]
    (agent,) = spec["containers"]
    parser = build_parser()
    pre_stop = agent["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "istio-ebpf"
    args = parser.parse_args(pre_stop[1:])
    assert args.cleanup and args.if_uninstalled
    line = next(ln for ln in agent["args"][0].splitlines() if ln.strip().startswith("exec "))
    argv = shlex.split(line.strip())[1:]
    assert argv[0] == "istio-ebpf"
    args = parser.parse_args(argv[1:])
    assert args.proc_root == "/host/proc" and args.health_port == 15099
    names = {e["name"] for e in agent["env"]}
    assert {"NODE_NAME", "POD_NAMESPACE", "DAEMONSET_NAME"} <= names
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert agent[probe]["httpGet"]["port"] == "health"
    assert agent["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert agent["ports"][0]["containerPort"] == args.health_port


def test_rbac_is_least_privilege():
    rbac = docs("rbac.yaml")
    cluster_role = next(d for d in rbac if d["kind"] == "ClusterRole")
    rules = {r["resources"][0]: set(r["verbs"]) for r in cluster_role["rules"]}
    # configmaps list: the drift check (issue 21 item 10) reads the istio-sidecar-injector ConfigMaps,
    # whose namespaces and revision names are not known in advance; nothing else.
    assert rules == {"pods": {"list", "watch"}, "nodes": {"patch"}, "events": {"create"},
                     "configmaps": {"list"}}
    role = next(d for d in rbac if d["kind"] == "Role")
    assert role["rules"] == [{"apiGroups": ["apps"], "resources": ["daemonsets"],
                              "resourceNames": ["istio-ebpf-agent"], "verbs": ["get"]}]
    assert daemonset()["metadata"]["name"] == "istio-ebpf-agent"


def test_containerfile_uses_setup_sh_steps_that_exist():
    text = (PROJECT_ROOT / "Containerfile").read_text()
    assert re.search(r"^FROM debian:bookworm", text, re.M)
    setup = (PROJECT_ROOT / "scripts" / "setup.sh").read_text()
    used = re.findall(r"^RUN scripts/setup\.sh ([\w-]+)", text, re.M)
    assert used[:2] == ["image-apt", "image-python"]   # runtime only: not the dev/test steps
    for step in set(used):
        assert re.search(rf"^\s+{step}\)", setup, re.M), step
    # `host` is a run-time step: the DaemonSet's init container runs it, the image build does not
    assert "setup.sh host" not in "\n".join(ln for ln in text.splitlines() if ln.startswith("RUN"))
    init = daemonset()["spec"]["template"]["spec"]["initContainers"][0]
    assert init["command"][-2:] == ["/opt/istio-ebpf/src/scripts/setup.sh", "host"]


def test_prepare_init_container_builds_what_the_agent_adopts():
    """The prepare-datapath init container compiles the agent's own version (same image, mode and
    headers) before the agent starts, so an upgrade's switch does not wait for the compile."""
    spec = daemonset()["spec"]["template"]["spec"]
    (agent,) = spec["containers"]
    assert [c["name"] for c in spec["initContainers"]] == ["mount-bpffs", "prepare-datapath"]
    prep = spec["initContainers"][1]
    assert prep["image"] == agent["image"]
    prep_lines, agent_lines = prep["args"][0].splitlines(), agent["args"][0].splitlines()
    assert prep_lines[0] == agent_lines[0]          # the same kernel headers choice
    args = build_parser().parse_args(shlex.split(prep_lines[1].strip())[2:])
    assert args.prepare and not args.cleanup and args.pin_root == "/sys/fs/bpf/istio-ebpf" and not args.sockmap
    env = {e["name"]: e for e in prep["env"]}
    assert env["ISTIO_EBPF_MODE"] == next(e for e in agent["env"] if e["name"] == "ISTIO_EBPF_MODE")
    sc = prep["securityContext"]
    assert sc["privileged"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) <= set(agent["securityContext"]["capabilities"]["add"])
    mounts = {m["mountPath"]: m for m in prep["volumeMounts"]}
    assert mounts["/sys/fs/bpf"]["mountPropagation"] == "HostToContainer"
    assert all(mounts[p]["readOnly"] for p in ("/sys/fs/cgroup", "/lib/modules", "/usr/src"))


def test_mode_override_reaches_the_prepare_step_too():
    from istio_ebpf_plugin.install import manifests

    (doc,) = [d for d in manifests.agent_documents(MANIFESTS_DIR) if d.kind == "DaemonSet"]
    manifests.set_daemonset_env(doc, "ISTIO_EBPF_MODE", "podip")
    spec = doc.data["spec"]["template"]["spec"]
    for c in [spec["containers"][0], spec["initContainers"][1]]:
        assert {"name": "ISTIO_EBPF_MODE", "value": "podip"} in c["env"], c["name"]
    assert "env" not in spec["initContainers"][0]      # the bpffs mount does not read it


# --- admission on modern clusters (Pod Security, AppArmor, SELinux), checked on the rendered output

def _rendered(capsys, *args: str) -> list[dict]:
    from istio_ebpf_plugin.cli import main
    from support.istio_fixtures import FIXTURES

    golden = FIXTURES / "master" / "manifest-generate" / "output" / "pilot_default.golden.yaml"
    assert main(["render", "-f", str(golden), *args]) == 0
    return [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]


def test_namespace_carries_the_pod_security_labels_istio_asks_for_cni(capsys, monkeypatch):
    monkeypatch.delenv("ISTIO_EBPF_MANIFESTS_DIR", raising=False)
    (ns,) = [d for d in _rendered(capsys) if d["kind"] == "Namespace" and d["metadata"]["name"] == "istio-ebpf-system"]
    labels = {k: v for k, v in ns["metadata"]["labels"].items() if k.startswith("pod-security.kubernetes.io/")}
    assert labels == {f"pod-security.kubernetes.io/{mode}{suffix}": value
                      for mode in ("enforce", "warn", "audit")
                      for suffix, value in (("", "privileged"), ("-version", "latest"))}


def test_every_agent_container_is_apparmor_unconfined_by_annotation(capsys, monkeypatch):
    monkeypatch.delenv("ISTIO_EBPF_MANIFESTS_DIR", raising=False)
    (ds,) = [d for d in _rendered(capsys) if d["kind"] == "DaemonSet"]
    template = ds["spec"]["template"]
    names = [c["name"] for c in template["spec"]["initContainers"] + template["spec"]["containers"]]
    prefix = "container.apparmor.security.beta.kubernetes.io/"
    apparmor = {k[len(prefix):]: v for k, v in template["metadata"]["annotations"].items() if k.startswith(prefix)}
    # Exactly the pod's containers: an apiserver rejects an annotation naming a container the pod lacks.
    assert apparmor == dict.fromkeys(names, "unconfined") and len(names) == 3
    # The 1.30+ field is not used: 1.20-1.29 would drop it, and both forms must agree when present.
    assert all("appArmorProfile" not in (c.get("securityContext") or {}) for c in
               template["spec"]["initContainers"] + template["spec"]["containers"])
    assert "appArmorProfile" not in (template["spec"].get("securityContext") or {})


@pytest.mark.parametrize("version", VERSIONS)
def test_selinux_type_option_sets_the_pod_security_context(capsys, monkeypatch, version):
    monkeypatch.delenv("ISTIO_EBPF_MANIFESTS_DIR", raising=False)
    (plain,) = [d for d in _rendered(capsys) if d["kind"] == "DaemonSet"]
    assert "seLinuxOptions" not in (plain["spec"]["template"]["spec"].get("securityContext") or {})
    (ds,) = [d for d in _rendered(capsys, "--selinux-type", "spc_t") if d["kind"] == "DaemonSet"]
    assert ds["spec"]["template"]["spec"]["securityContext"] == {"seLinuxOptions": {"type": "spc_t"}}
    kubernetes_validate.validate(ds, version, strict=True)
    # Nothing else of the DaemonSet changed.
    ds["spec"]["template"]["spec"].pop("securityContext")
    assert ds == plain


def test_bad_selinux_type_is_a_usage_error(capsys, monkeypatch):
    from istio_ebpf_plugin.cli import main
    from support.istio_fixtures import FIXTURES

    monkeypatch.delenv("ISTIO_EBPF_MANIFESTS_DIR", raising=False)
    golden = FIXTURES / "master" / "manifest-generate" / "output" / "pilot_default.golden.yaml"
    assert main(["render", "-f", str(golden), "--selinux-type", "spc_t:s0"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "invalid SELinux type 'spc_t:s0'" in captured.err
