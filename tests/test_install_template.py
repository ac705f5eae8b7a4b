"""The ebpf injection template: valid Go, and its effect on Istio's own injected pods.

For every pod in ``inject/*.injected`` (master and 1.14.0) the template is
executed with Go's text/template, and its output is strategic-merged onto the
injected pod, as istiod does after the sidecar template. Each pod is taken twice:
as Istio injected it without istio-cni, and as Istio injects it with istio-cni
(the fixtures' own ``*.cni.injected`` pods, and for the others the stock init
container block rendered by Go with the release's istio-cni value on).
"""

from __future__ import annotations

import copy
import glob
import json
import re
import subprocess
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from support.istio_fixtures import FIXTURES, ROOT
from istio_ebpf_plugin import NODE_MODE_LABEL, OPT_IN_ANNOTATION, OPT_IN_VALUE
from support import strategic_merge
from istio_ebpf_plugin.install import gotemplate, injector_config
from istio_ebpf_plugin.install import template as tpl

from support import istio_cni_rules
from support.install_gorender import GO_BUILTINS, STUB_FUNCTIONS, GoRenderer, go_binary

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


def _is_cni_pod(pod: dict) -> bool:
    stock = _stock_init(pod["spec"])
    return stock is not None and stock["name"] == "istio-validation"


def _case(version: str, pod: dict, opted_in: bool, cni: bool | None = None) -> dict:
    """Template data mirroring what istiod had when it injected this fixture.

    ``cni``: the injector's istio-cni value (``istio_cni.enabled`` in 1.14,
    ``pilot.cni.enabled`` later); by default what the pod shows (istio-validation).
    """
    meta = pod.get("metadata") or {}
    spec = pod["spec"]
    annotations = dict(meta.get("annotations") or {})
    if opted_in:
        annotations[OPT_IN_ANNOTATION] = OPT_IN_VALUE
    stock = _stock_init(spec)
    args = stock["args"] if stock else []
    proxy_sc = _proxy(spec).get("securityContext") or {}
    values = json.loads((FIXTURES / version / "rendered" / "istio-sidecar-injector.values.json").read_text())
    cni = _is_cni_pod(pod) if cni is None else cni
    if version == "v1.14.0":
        values["istio_cni"] = {"enabled": cni}
    else:
        values["pilot"]["cni"]["enabled"] = cni
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
        # Istio's ENABLE_NATIVE_SIDECARS decision: the fixture shows it (istio-proxy an init container).
        "NativeSidecars": any(c["name"] == "istio-proxy" for c in spec.get("initContainers") or []),
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


def _stock_init_template(version: str) -> str:
    """The stock sidecar template's init container block alone, its istio-cni switch intact."""
    sidecar = _sidecar_template(version)
    switch = tpl.cni_condition(sidecar)
    opening = re.search(r"\{\{-?\s*if\s+" + re.escape(switch) + r"\s*-?\}\}\s*- name: istio-validation", sidecar)
    assert opening, "the sidecar template's istio-cni switch"
    start = opening.start()
    end = gotemplate.matching_end(sidecar, sidecar.index("}}", start) + 2, depth=2)
    block = sidecar[start:end.start]
    defines, decls = tpl.preamble(sidecar, block)
    return "".join(d + "\n" for d in defines + decls) + "spec:\n  initContainers:\n  " + block


@pytest.fixture(scope="module")
def cni_pods(go) -> dict:
    """{(version, fixture): the pod as Istio injects it with istio-cni on}.

    ``*.cni.injected`` fixtures are taken as they are; for the others, istio-init is
    replaced in place by the stock block rendered with the istio-cni value on.
    """
    out = {}
    for version in VERSIONS:
        todo = [(n, p) for v, n, p in PODS if v == version and _stock_init(p["spec"]) is not None
                and not _is_cni_pod(p)]
        results = go.render(_stock_init_template(version), [_case(version, p, False, cni=True) for _, p in todo])
        for (name, pod), res in zip(todo, results, strict=True):
            assert not res["error"], f"{version}/{name}: {res['error']}"
            gate = YAML(typ="safe", pure=True).load(res["rendered"])["spec"]["initContainers"][0]
            stock = _stock_init(pod["spec"])
            # The fixtures hold what the API server returned: quantities normalized ("2000m" -> "2"),
            # and in 1.14 the template's stray init-container restartPolicy dropped by that era's structs.
            gate["resources"] = stock["resources"]
            if "restartPolicy" not in stock:
                gate.pop("restartPolicy", None)
            new = copy.deepcopy(pod)
            inits = new["spec"]["initContainers"]
            inits[next(i for i, c in enumerate(inits) if c["name"] == "istio-init")] = gate
            out[(version, name)] = new
        for v, name, pod in PODS:
            if v == version and (v, name) not in out:
                out[(v, name)] = pod  # already a CNI pod, or nothing istio-cni changes
    return out


def _variant(pods: dict, version: str, name: str, pod: dict, cni: bool) -> dict:
    if not cni:
        return pod
    return pods[(version, name)]


@pytest.fixture(scope="module")
def rendered(go, cni_pods):
    """{(version, fixture, opted_in, cni): (template output, parsed)}, cni: istio-cni on."""
    results = {}
    for version in VERSIONS:
        template = _ebpf_template(version)
        keys, cases = [], []
        for v, name, pod in PODS:
            if v != version:
                continue
            for cni in (False, True):
                if not cni and _is_cni_pod(pod):
                    continue  # Istio's non-CNI injection of the same input is its own fixture
                for opted in (False, True):
                    keys.append((v, name, opted, cni))
                    cases.append(_case(v, _variant(cni_pods, v, name, pod, cni), opted, cni))
        for key, out in zip(keys, go.render(template, cases), strict=True):
            assert not out["error"], f"{key}: {out['error']}"
            results[key] = (out["rendered"], YAML(typ="safe", pure=True).load(out["rendered"]))
    return results


CASES = [(v, n, p, cni) for v, n, p in PODS for cni in (False, True) if cni or not _is_cni_pod(p)]
SIDECAR_CASES = [c for c in CASES if _ebpf_applies(c[2])]


def _case_id(case: tuple) -> str:
    return f"{case[0]}/{case[1]}/{'cni' if case[3] else 'no-cni'}"


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


@pytest.mark.parametrize("version,name,pod,cni", CASES, ids=[_case_id(c) for c in CASES])
def test_unannotated_pod_is_unchanged(rendered, cni_pods, version, name, pod, cni):
    text, patch = rendered[(version, name, False, cni)]
    assert text.strip() == "{}" and patch == {}
    pod = _variant(cni_pods, version, name, pod, cni)
    assert strategic_merge.merge(pod, patch) == pod


def test_cni_pods_are_what_istio_injects_with_istio_cni(cni_pods):
    # The synthesized CNI pod of hello.yaml has Istio's own istio-validation, as in Istio's CNI
    # injection of it (whose istio-proxy differs: it was injected with global.network=network1).
    for version in VERSIONS:
        ours = cni_pods[(version, "hello.yaml.injected#0")]["spec"]
        real = next(p for v, n, p in PODS if v == version and n == "hello.yaml.cni.injected#0")["spec"]
        assert _stock_init(ours) == _stock_init(real), version
        assert [c["name"] for c in ours["initContainers"]] == [c["name"] for c in real["initContainers"]]


def test_pods_outside_our_template_have_no_iptables_container():
    # gateway / grpc-agent / custom templates and hostNetwork pods: our template never runs
    # for them, and they have no istio-init to replace either.
    assert {n for _, n, _ in OTHER_PODS} >= {"gateway.yaml.injected#0", "hello-host-network.yaml.injected#0"}
    for _, name, pod in OTHER_PODS:
        assert _stock_init(pod["spec"]) is None, name


def _caps_added(spec: dict) -> dict[str, list[str]]:
    out = {}
    for c in (spec.get("initContainers") or []) + spec["containers"]:
        add = ((c.get("securityContext") or {}).get("capabilities") or {}).get("add") or []
        if add:
            out[c["name"]] = add
    return out


def _move(names: list[str], name: str, first: bool) -> list[str]:
    if name not in names:
        return names
    rest = [n for n in names if n != name]
    return [name] + rest if first else rest + [name]


def _istio_reorder(names: list[str]) -> list[str]:
    """Istio's reorderPod (pkg/kube/inject/inject.go) on the init container names.

    With a native sidecar: istio-proxy, then istio-validation, then istio-init moved first.
    Otherwise istio-validation first, istio-init and enable-core-dump last ("we want iptables setup
    last so we do not blackhole init containers"). The goldens show both: master's multi-init is
    istio-init, istio-proxy, init-one, init-two; native-sidecar-old-version is other-sidecar, istio-init.
    """
    if "istio-proxy" in names:
        for n in ("istio-proxy", "istio-validation", "istio-init"):
            names = _move(names, n, first=True)
        return names
    names = _move(names, "istio-validation", first=True)
    names = _move(names, "istio-init", first=False)
    return _move(names, "enable-core-dump", first=False)


def test_istio_reorder_reproduces_the_goldens():
    for version, name, pod in PODS:
        inits = [c["name"] for c in pod["spec"].get("initContainers") or []]
        if version == "master":
            assert _istio_reorder(inits) == inits, name


def _is_gate(container: dict) -> bool:
    args = container.get("args") or []
    return args[:1] == ["istio-iptables"] and all(f in args for f in VALIDATION_FLAGS)


@pytest.mark.parametrize("version,name,pod,cni", SIDECAR_CASES, ids=[_case_id(c) for c in SIDECAR_CASES])
def test_opted_in_pod_loses_exactly_the_iptables_init_container(rendered, cni_pods, version, name, pod, cni):
    text, patch = rendered[(version, name, True, cni)]
    pod = _variant(cni_pods, version, name, pod, cni)
    spec = pod["spec"]
    stock = _stock_init(spec)
    mode = _arg_after(stock["args"], "-m") if stock else None
    if mode != "REDIRECT":
        # No iptables init container (interceptionMode NONE) or TPROXY:
        # the template stays out of the way and the pod is injected exactly as stock Istio does.
        assert patch == {}, f"{name}: template acted on a pod it must leave alone"
        return
    assert stock["name"] == ("istio-validation" if cni else "istio-init")
    merged = strategic_merge.merge(pod, patch)
    mspec = merged["spec"]
    names_before = [c["name"] for c in spec.get("initContainers") or []]
    names_after = [c["name"] for c in mspec.get("initContainers") or []]
    # Without istio-cni the gate is istio-validation (istio-init, the iptables container, is deleted);
    # with istio-cni it is istio-init, the name istio-cni's plugin skips (istio-validation deleted).
    gate_name, gone = ("istio-init", "istio-validation") if cni else ("istio-validation", "istio-init")
    assert gone not in names_after
    assert names_after.count(gate_name) == 1
    ours = ("istio-init", "istio-validation", tpl.FIRST_GATE)
    others_before = [c for c in spec.get("initContainers") or [] if c["name"] not in ours]
    others_after = [c for c in mspec.get("initContainers") or [] if c["name"] not in ours]
    assert others_after == others_before, "user init containers / native istio-proxy must be untouched"
    assert mspec["containers"] == spec["containers"]
    assert merged.get("metadata") == pod.get("metadata")
    rest_before = {k: v for k, v in spec.items() if k not in ("initContainers", "affinity")}
    rest_after = {k: v for k, v in mspec.items() if k not in ("initContainers", "affinity")}
    assert rest_after == rest_before
    # No container of the pod needs NET_ADMIN or NET_RAW any more.
    assert _caps_added(mspec) == {}, _caps_added(mspec)
    # The readiness gate: Istio's validation, as the proxy user, no capabilities.
    gate = next(c for c in mspec["initContainers"] if c["name"] == gate_name)
    uid = int(_arg_after(stock["args"], "-u"))
    assert [a for a in gate["args"] if a not in VALIDATION_FLAGS] == \
        [a for a in stock["args"] if a not in VALIDATION_FLAGS + ("--force-apply",)]
    assert all(f in gate["args"] for f in VALIDATION_FLAGS)
    assert _arg_after(gate["args"], "-m") == "REDIRECT"
    sc = gate["securityContext"]
    assert sc["runAsUser"] == uid and sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True
    assert "add" not in sc["capabilities"]
    assert gate["image"] == stock["image"]
    if cni:
        # istio-cni: the stock validation container, renamed (resources as the API server
        # normalizes them; the 1.14 template's stray restartPolicy is dropped by that istiod).
        def same(c: dict) -> dict:
            return {k: v for k, v in c.items() if k not in ("name", "resources", "restartPolicy")}
        for c in mspec["initContainers"]:
            if c["name"] in ("istio-init", tpl.FIRST_GATE):
                assert same(c) == same(stock), c["name"]
    # Where the gates run once Istio has reordered the pod (it reorders after every template; our
    # patch only deletes and adds, so reordering the already ordered fixture gives the same list).
    final = _istio_reorder(names_after)
    gates = [n for n in final if _is_gate(next(c for c in mspec["initContainers"] if c["name"] == n))]
    native = "istio-proxy" in final
    if not cni:
        assert gates == ["istio-validation"]
    elif native:
        assert gates == ["istio-init"]
    else:
        assert gates == [tpl.FIRST_GATE, "istio-init"]
    # A gate runs before any other init container: nothing of the pod runs before capture is
    # verified. And none after a native istio-proxy (Envoy holds 15001/15006 by then).
    assert final[0] == gates[0], final
    if native:
        assert final.index("istio-proxy") > max(final.index(g) for g in gates), final
    assert [n for n in final if n not in gates] == [n for n in _istio_reorder(names_before) if n != stock["name"]]
    # Scheduling: only on nodes that capture.
    terms = mspec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [EBPF_TERM]}]
    # Never an empty/null initContainers (that would wipe the user's init containers).
    assert "initContainers: null" not in text and "initContainers: []" not in text


#: The injection templates each plugin release is checked against as its "own": the fixtures hold
#: injected pods of 1.14.0 and master only (1.22/1.26 inject like master for these pods).
_OWN_TEMPLATES = {"1.14.0": "v1.14.0", "1.22.0": "master", "1.26.0": "master", "master": "master"}


@pytest.mark.parametrize("release", istio_cni_rules.RELEASES)
def test_istio_cni_skips_opted_in_pods_and_only_those(rendered, cni_pods, release):
    """istio-cni's own skip rules (plugin.go of each release, transcribed with line references in
    tests/support/istio_cni_rules.py) applied to the pods as injected with istio-cni on: every opted-in pod
    falls under the istio-init rule, so the plugin writes no iptables into it; every other sidecar
    pod of the release's own templates gets iptables from istio-cni exactly as before."""
    assert istio_cni_rules.check_references(release) == []
    opted = plain = 0
    for version, name, pod, cni in SIDECAR_CASES:
        if not cni:
            continue
        cni_pod = _variant(cni_pods, version, name, pod, True)
        stock = _stock_init(cni_pod["spec"])
        if stock is None or _arg_after(stock["args"], "-m") != "REDIRECT":
            continue
        if version == _OWN_TEMPLATES[release]:
            # (A 1.14 plugin skips master's native-sidecar pods anyway: one regular container.)
            reasons = istio_cni_rules.skip_reasons(release, cni_pod)
            assert reasons == [], f"{version}/{name}: stock CNI pod skipped by istio-cni: {reasons}"
            plain += 1
        merged = strategic_merge.merge(cni_pod, rendered[(version, name, True, True)][1])
        reasons = istio_cni_rules.skip_reasons(release, merged)
        assert any(r.startswith("istio-init") for r in reasons), f"{version}/{name}: {reasons}"
        opted += 1
        # Not opted in: byte-identical, so istio-cni programs it as before.
        assert strategic_merge.merge(cni_pod, rendered[(version, name, False, True)][1]) == cni_pod
    assert opted >= 20 and plain >= 5, (opted, plain)


def test_istio_cni_rules_are_transcribed_from_the_sources():
    for release in istio_cni_rules.RELEASES:
        assert istio_cni_rules.check_references(release) == []
    # A reference to a wrong line is caught.
    rule = istio_cni_rules.RULES["master"][0]
    moved = istio_cni_rules.Ref(rule.ref.file, rule.ref.line + 1, rule.ref.code)
    lines = istio_cni_rules.source_file("master", moved.file).read_text().splitlines()
    assert moved.code not in lines[moved.line - 1]


def test_every_chart_has_the_istio_cni_switch():
    charts = {"master": FIXTURES / "master" / "injection-template.yaml",
              "1.26.0": FIXTURES / "full-charts" / "1.26.0" / "istio-discovery" / "files" / "injection-template.yaml",
              "1.14.0": FIXTURES / "v1.14.0" / "injection-template.yaml"}
    expected = {"master": ".Values.pilot.cni.enabled", "1.26.0": ".Values.pilot.cni.enabled",
                "1.14.0": ".Values.istio_cni.enabled"}
    for release, path in charts.items():
        sidecar = path.read_text()
        assert tpl.cni_condition(sidecar) == expected[release]
        built = tpl.build(sidecar)
        assert "{{- if " + expected[release] + " }}" in built
        # The extra first gate is left out for native sidecars where the chart knows them.
        assert ("{{- if not $nativeSidecar }}" in built) is (release != "1.14.0")


@pytest.fixture(scope="module")
def kubectl() -> Path:
    out = subprocess.run(["bash", str(ROOT / "scripts" / "fetch-helm.sh")], check=True, capture_output=True,
                         text=True, timeout=600)
    return Path(out.stdout.strip().splitlines()[-1]) / "kubectl"


def test_strategic_merge_double_agrees_with_kubernetes(rendered, cni_pods, kubectl, tmp_path):
    """Every merge the tests above predict, done again by Kubernetes' own strategic merge
    (kubectl 1.29 ``patch --local --type strategic``: apimachinery's code, no server): same pod,
    same order. That covers the deletes, the new gates' places and the untouched containers."""
    checked = 0
    for version, name, pod, cni in SIDECAR_CASES:
        for opted in (True, False):
            text, patch = rendered[(version, name, opted, cni)]
            base = _variant(cni_pods, version, name, pod, cni)
            obj = {"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": "fixture", **(base.get("metadata") or {})}, "spec": base["spec"]}
            src = tmp_path / "pod.json"
            src.write_text(json.dumps(obj))
            proc = subprocess.run([str(kubectl), "patch", "--local", "-f", str(src), "--type", "strategic",
                                   "-p", json.dumps(patch), "-o", "json"], capture_output=True, text=True,
                                  timeout=60)
            assert proc.returncode == 0, proc.stderr
            real = json.loads(proc.stdout)
            assert real["spec"] == strategic_merge.merge(base, patch)["spec"], f"{version}/{name}/{cni}/{opted}"
            checked += 1
    assert checked >= 80


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
