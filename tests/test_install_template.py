"""The ebpf injection template: valid Go, and its effect on Istio's own injected pods.

For every pod in ``inject/*.injected`` (master and 1.14.0) the template is
executed with Go's text/template, and its output is strategic-merged onto the
injected pod, as istiod does after the sidecar template.
"""

from __future__ import annotations

import copy
import glob
import json
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from istio_fixtures import FIXTURES
from istio_ebpf_plugin import NODE_MODE_LABEL, OPT_IN_ANNOTATION, OPT_IN_VALUE
import strategic_merge
from istio_ebpf_plugin.install import gotemplate, injector_config
from istio_ebpf_plugin.install import template as tpl

from install_gorender import GO_BUILTINS, STUB_FUNCTIONS, GoRenderer, go_binary

VERSIONS = ("master", "v1.14.0")
VALIDATION_FLAGS = ("--run-validation", "--skip-rule-apply")
EBPF_TERM = {"key": NODE_MODE_LABEL, "operator": "In", "values": ["cookie", "podip"]}


def _yaml_all(path: Path) -> list:
    return [d for d in YAML(typ="safe", pure=True).load_all(path.read_text()) if d]


def _pod_template(obj: dict) -> dict:
    spec = obj.get("spec") or {}
    if "template" in spec:
        return spec["template"]
    if "jobTemplate" in spec:
        return spec["jobTemplate"]["spec"]["template"]
    return obj


def _sidecar_template(version: str) -> str:
    return (FIXTURES / version / "injection-template.yaml").read_text()


def _ebpf_template(version: str) -> str:
    # Build it from the installed ConfigMap's config, as install/render do.
    config = (FIXTURES / version / "rendered" / "istio-sidecar-injector.config.yaml").read_text()
    return injector_config.parse(injector_config.add(config))["templates"]["ebpf"]


def _stock_init(spec: dict) -> dict | None:
    for c in spec.get("initContainers") or []:
        if c["name"] in ("istio-init", "istio-validation"):
            return c
    return None


def _proxy(spec: dict) -> dict:
    return next((c for c in (spec.get("initContainers") or []) + spec["containers"] if c["name"] == "istio-proxy"), {})


def _arg_after(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def _case(version: str, pod: dict, opted_in: bool) -> dict:
    """Template data mirroring what istiod had when it injected this fixture."""
    meta = pod.get("metadata") or {}
    spec = pod["spec"]
    annotations = dict(meta.get("annotations") or {})
    if opted_in:
        annotations[OPT_IN_ANNOTATION] = OPT_IN_VALUE
    stock = _stock_init(spec)
    args = stock["args"] if stock else []
    proxy_sc = _proxy(spec).get("securityContext") or {}
    values = json.loads((FIXTURES / version / "rendered" / "istio-sidecar-injector.values.json").read_text())
    if version == "v1.14.0":
        values.setdefault("istio_cni", {"enabled": False})
    if args:
        # The fixtures were injected with different install values (statusPort 123, IP ranges...):
        # recover them from the stock container's own arguments.
        proxy = values["global"]["proxy"]
        for flag, key in (("-i", "includeIPRanges"), ("-x", "excludeIPRanges"), ("-b", "includeInboundPorts"),
                          ("-q", "includeOutboundPorts"), ("-o", "excludeOutboundPorts")):
            proxy[key] = _arg_after(args, flag) if flag in args else ""
        proxy["statusPort"] = 0
        proxy["excludeInboundPorts"] = _arg_after(args, "-d").removeprefix("15090,15021").lstrip(",")
        level = next((a for a in args if a.startswith("--log_output_level=")), None)
        if level:
            values["global"]["logging"]["level"] = level.split("=", 1)[1]
        for key in ("includeOutboundIPRanges", "excludeOutboundIPRanges", "includeInboundPorts",
                    "excludeInboundPorts", "includeOutboundPorts", "excludeOutboundPorts"):
            annotations.pop(f"traffic.sidecar.istio.io/{key}", None)
        annotations.pop("status.sidecar.istio.io/port", None)
    return {
        "ObjectMeta": {"Name": meta.get("name", ""), "Annotations": annotations, "Labels": meta.get("labels") or {}},
        "Spec": spec,
        "Values": values,
        "ProxyConfig": {"InterceptionMode": _arg_after(args, "-m") if args else "REDIRECT",
                        "ProxyMetadata": {e["name"]: e.get("value", "") for e in (stock or {}).get("env") or []}},
        "MeshConfig": {},
        "ProxyImage": stock["image"] if stock else "",
        "ProxyInitImage": stock["image"] if stock else "",
        "ProxyUID": int(_arg_after(args, "-u")) if args else 1337,
        "ProxyGID": int(proxy_sc.get("runAsGroup", 1337)),
    }


def _fixture_pods() -> list[tuple[str, str, dict]]:
    out = []
    for version in VERSIONS:
        for path in sorted(glob.glob(str(FIXTURES / version / "inject" / "*.injected"))):
            for i, obj in enumerate(_yaml_all(Path(path))):
                out.append((version, f"{Path(path).name}#{i}", _pod_template(obj)))
    return out


PODS = _fixture_pods()


def _templates_annotation(pod: dict) -> list[str] | None:
    value = ((pod.get("metadata") or {}).get("annotations") or {}).get("inject.istio.io/templates")
    return [t.strip() for t in value.split(",")] if value is not None else None


def _ebpf_applies(pod: dict) -> bool:
    """Would istiod run our template on this pod if it opted in?

    Only injected pods (hostNetwork ones are not) that use the default templates
    (ours is in defaultTemplates) or list templates including sidecar (they add ebpf).
    """
    injected = "sidecar.istio.io/status" in ((pod.get("metadata") or {}).get("annotations") or {})
    listed = _templates_annotation(pod)
    return injected and (listed is None or "sidecar" in listed)


SIDECAR_PODS = [p for p in PODS if _ebpf_applies(p[2])]
OTHER_PODS = [p for p in PODS if not _ebpf_applies(p[2])]


@pytest.fixture(scope="module")
def go(tmp_path_factory):
    if go_binary() is None:
        pytest.skip("Go toolchain (Debian golang-go) not installed: cannot execute Go templates")
    return GoRenderer(tmp_path_factory.mktemp("gorender"))


@pytest.fixture(scope="module")
def rendered(go):
    """{(version, fixture, opted_in): parsed template output}."""
    results = {}
    for version in VERSIONS:
        template = _ebpf_template(version)
        keys, cases = [], []
        for v, name, pod in PODS:
            if v != version:
                continue
            for opted in (False, True):
                keys.append((v, name, opted))
                cases.append(_case(v, pod, opted))
        for key, out in zip(keys, go.render(template, cases), strict=True):
            assert not out["error"], f"{key}: {out['error']}"
            results[key] = (out["rendered"], YAML(typ="safe", pure=True).load(out["rendered"]))
    return results


def test_fixture_pods_found():
    names = {n for _, n, _ in PODS}
    assert len(PODS) >= 30
    assert "hello.yaml.cni.injected#0" in names and "native-sidecar.yaml.injected#0" in names


@pytest.mark.parametrize("version", VERSIONS)
def test_plain_pod_renders_an_empty_patch(go, version):
    # A pod without the annotation (and without Istio's additions) gets `{}`: merge is a no-op.
    pod = next(p for v, n, p in PODS if v == version and n == "hello.yaml.injected#0")
    case = _case(version, pod, opted_in=False)
    case["Spec"] = {"containers": [c for c in pod["spec"]["containers"] if c["name"] != "istio-proxy"]}
    out = go.render(_ebpf_template(version), [case])[0]
    assert out["error"] == "" and out["rendered"].strip() == "{}"


@pytest.mark.parametrize("version", VERSIONS)
def test_template_uses_only_functions_the_stock_template_uses(version):
    ours = gotemplate.functions_used(_ebpf_template(version))
    stock = gotemplate.functions_used(_sidecar_template(version))
    assert ours <= stock | GO_BUILTINS, ours - stock - GO_BUILTINS
    assert ours <= STUB_FUNCTIONS | GO_BUILTINS  # so the Go execution above covers all of it


@pytest.mark.parametrize("version,name,pod", PODS, ids=[f"{v}/{n}" for v, n, _ in PODS])
def test_unannotated_pod_is_unchanged(rendered, version, name, pod):
    text, patch = rendered[(version, name, False)]
    assert text.strip() == "{}" and patch == {}
    assert strategic_merge.merge(pod, patch) == pod


def test_pods_outside_our_template_have_no_iptables_container():
    # gateway / grpc-agent / custom templates and hostNetwork pods: our template never runs
    # for them, and they have no istio-init to replace either.
    assert {n for _, n, _ in OTHER_PODS} >= {"gateway.yaml.injected#0", "hello-host-network.yaml.injected#0"}
    for _, name, pod in OTHER_PODS:
        assert _stock_init(pod["spec"]) is None, name


@pytest.mark.parametrize("version,name,pod", SIDECAR_PODS, ids=[f"{v}/{n}" for v, n, _ in SIDECAR_PODS])
def test_opted_in_pod_loses_exactly_the_iptables_init_container(rendered, version, name, pod):
    text, patch = rendered[(version, name, True)]
    spec = pod["spec"]
    stock = _stock_init(spec)
    mode = _arg_after(stock["args"], "-m") if stock else None
    if mode != "REDIRECT":
        # No iptables init container (interceptionMode NONE) or TPROXY:
        # the template stays out of the way and the pod is injected exactly as stock Istio does.
        assert patch == {}, f"{name}: template acted on a pod it must leave alone"
        return
    merged = strategic_merge.merge(pod, patch)
    mspec = merged["spec"]
    names_before = [c["name"] for c in spec.get("initContainers") or []]
    names_after = [c["name"] for c in mspec.get("initContainers") or []]
    # istio-init is gone; istio-validation is there (Istio's reorderPod moves it first).
    assert "istio-init" not in names_after
    assert names_after.count("istio-validation") == 1
    others_before = [c for c in spec.get("initContainers") or [] if c["name"] not in ("istio-init", "istio-validation")]
    others_after = [c for c in mspec.get("initContainers") or [] if c["name"] not in ("istio-init", "istio-validation")]
    assert others_after == others_before, "user init containers / native istio-proxy must be untouched"
    assert mspec["containers"] == spec["containers"]
    assert merged.get("metadata") == pod.get("metadata")
    rest_before = {k: v for k, v in spec.items() if k not in ("initContainers", "affinity")}
    rest_after = {k: v for k, v in mspec.items() if k not in ("initContainers", "affinity")}
    assert rest_after == rest_before
    # The readiness gate: Istio's validation, as the proxy user, no capabilities.
    gate = next(c for c in mspec["initContainers"] if c["name"] == "istio-validation")
    uid = int(_arg_after(stock["args"], "-u"))
    assert [a for a in gate["args"] if a not in VALIDATION_FLAGS] == \
        [a for a in stock["args"] if a not in VALIDATION_FLAGS + ("--force-apply",)]
    assert all(f in gate["args"] for f in VALIDATION_FLAGS)
    assert _arg_after(gate["args"], "-m") == "REDIRECT"
    sc = gate["securityContext"]
    assert sc["runAsUser"] == uid and sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True
    assert "add" not in sc["capabilities"]
    assert gate["image"] == stock["image"]
    if stock["name"] == "istio-validation":
        # istio-cni: the stock container is kept, identical.
        assert gate["args"] == stock["args"] and gate["securityContext"] == stock["securityContext"]
        assert names_after == names_before
    else:
        assert names_after == [n for n in names_before if n != "istio-init"] + ["istio-validation"]
    # Scheduling: only on nodes that capture.
    terms = mspec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [EBPF_TERM]}]
    # Never an empty/null initContainers (that would wipe the user's init containers).
    assert "initContainers: null" not in text and "initContainers: []" not in text


def test_user_node_affinity_is_kept_and_anded(go):
    pod = copy.deepcopy(next(p for v, n, p in PODS if v == "master" and n == "multi-init.yaml.injected#0"))
    user_terms = [
        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "b"]}]},
        {"matchExpressions": [{"key": "gpu", "operator": "Exists"}],
         "matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]},
    ]
    pod["spec"]["affinity"] = {
        "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": user_terms},
                         "preferredDuringSchedulingIgnoredDuringExecution": [
                             {"weight": 1, "preference": {"matchExpressions": [
                                 {"key": "ssd", "operator": "Exists"}]}}]},
        "podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": []},
    }
    out = go.render(_ebpf_template("master"), [_case("master", pod, True)])[0]
    assert out["error"] == ""
    merged = strategic_merge.merge(pod, YAML(typ="safe", pure=True).load(out["rendered"]))
    aff = merged["spec"]["affinity"]
    terms = aff["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [
        {"matchExpressions": user_terms[0]["matchExpressions"] + [EBPF_TERM]},
        {"matchExpressions": user_terms[1]["matchExpressions"] + [EBPF_TERM],
         "matchFields": user_terms[1]["matchFields"]},
    ]
    assert aff["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"] == \
        pod["spec"]["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert aff["podAntiAffinity"] == pod["spec"]["affinity"]["podAntiAffinity"]


def test_opt_in_needs_the_exact_value(go):
    pod = next(p for v, n, p in PODS if v == "master" and n == "hello.yaml.injected#0")
    case = _case("master", pod, False)
    for value in ("EBPF", "true", "", "ebpf "):
        case["ObjectMeta"]["Annotations"][OPT_IN_ANNOTATION] = value
        assert go.render(_ebpf_template("master"), [case])[0]["rendered"].strip() == "{}"


@pytest.mark.parametrize("templates,opted", [
    ("sidecar,ebpf", True), ("ebpf,sidecar", True), ("sidecar, ebpf", True), ("sidecar,ebpf-canary", True),
    ("sidecar", False), ("sidecar,ebpfx", False), ("sidecar,myebpf", False), ("", False),
])
def test_opt_in_by_listing_the_template(go, templates, opted):
    """`inject.istio.io/templates: sidecar,ebpf` opts in without the redirect annotation,
    with the same list rule as the agent's is_opted_in."""
    from istio_ebpf_plugin.agent.pod_spec import is_opted_in

    pod = next(p for v, n, p in PODS if v == "master" and n == "hello.yaml.injected#0")
    case = _case("master", pod, False)
    case["ObjectMeta"]["Annotations"]["inject.istio.io/templates"] = templates
    out = go.render(_ebpf_template("master"), [case])[0]["rendered"]
    assert (out.strip() != "{}") is opted
    if opted:
        assert "$patch: delete" in out and "istio-validation" in out
    assert is_opted_in({"metadata": {"annotations": {"inject.istio.io/templates": templates}}}) is opted


def test_validation_block_is_cut_from_the_stock_template():
    for version in VERSIONS:
        block = tpl.validation_block(_sidecar_template(version))
        assert "--run-validation" in block and "NET_ADMIN" in block  # the cni condition became `not true`
        assert "- name:" not in block.split("\n", 1)[0]
    with pytest.raises(Exception, match="no istio-init"):
        tpl.validation_block("spec:\n  containers: []\n")
