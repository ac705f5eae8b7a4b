"""Schema validation of everything the installer ships, and property tests of manifest parsing."""

from __future__ import annotations


import kubernetes_validate
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support.istio_fixtures import FIXTURES
from istio_ebpf_plugin import PROJECT_ROOT
from istio_ebpf_plugin.errors import UsageError
from istio_ebpf_plugin.install import injector_config, manifests, plan
from support import strategic_merge

MANIFESTS_DIR = PROJECT_ROOT / "manifests"

K8S_VERSION = kubernetes_validate.latest_version()
CONFIG = (FIXTURES / "master" / "rendered" / "istio-sidecar-injector.config.yaml").read_text()


def _validate(doc: manifests.Document) -> None:
    try:
        kubernetes_validate.validate(doc.data, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        raise AssertionError(f"{doc.where()}: {exc.message} at {list(exc.path)}") from None


def test_agent_manifests_validate_against_kubernetes_schemas():
    docs = manifests.agent_documents(MANIFESTS_DIR)
    files = sorted(MANIFESTS_DIR.glob("*.yaml"))
    assert len(docs) >= len(files)  # every file parsed (an empty manifests/ gives no documents)
    for doc in docs:
        _validate(doc)
    # The validator really rejects a broken object (so an empty or passing run means something).
    bad = manifests.Document("", "", 0, {"apiVersion": "apps/v1", "kind": "DaemonSet",
                                         "metadata": {"name": "x"}, "spec": {"template": 5}})
    with pytest.raises(AssertionError):
        _validate(bad)


def test_objects_the_installer_creates_validate():
    from istio_ebpf_plugin.install.plugin import BACKUP_CONFIGMAP

    body = {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": BACKUP_CONFIGMAP, "namespace": "istio-system",
                         "labels": {"app.kubernetes.io/managed-by": "istio-ebpf"}},
            "data": {"istio-sidecar-injector": CONFIG}}
    _validate(manifests.Document("", "", 0, body))


def test_rendered_injector_configmaps_validate(tmp_path, monkeypatch):
    monkeypatch.setenv("ISTIO_EBPF_MANIFESTS_DIR", str(tmp_path))
    for golden in [FIXTURES / "master" / "manifest-generate" / "output" / "pilot_default.golden.yaml",
                   FIXTURES / "v1.14.0" / "gen-istio.yaml"]:
        stream = manifests.split(golden.read_text())
        for doc in manifests.injector_documents(stream):
            manifests.replace_config(doc, injector_config.add(doc.data["data"]["config"]))
            _validate(doc)


# --- property tests: never a traceback, only UsageError, and valid input round-trips ----------

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)
_yamlish = st.lists(st.sampled_from(["---", "a: 1", "kind: ConfigMap", "- x", "  b: [", "data:", "  config: |-",
                                     "    templates:", "      sidecar: |", "        spec: {}", "metadata:",
                                     "  name: istio-sidecar-injector", "'", "{", "}", "# c", "", "\t", "...",
                                     "defaultTemplates: [sidecar]", "? x", "&a b", "*a"]),
                    max_size=25).map("\n".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_text, _yamlish))
def test_stream_parsing_never_crashes(text):
    try:
        stream = manifests.split(text)
    except UsageError as exc:
        assert "\n" not in str(exc)
        return
    assert stream.text() == text  # unchanged documents are byte-identical
    try:
        for doc in manifests.injector_documents(stream):
            manifests.replace_config(doc, injector_config.add(doc.data["data"]["config"], doc.where()))
    except UsageError as exc:
        assert "\n" not in str(exc)


@settings(max_examples=200, deadline=None)
@given(st.one_of(_text, _yamlish))
def test_injector_config_parsing_never_crashes(text):
    for fn in (injector_config.add, injector_config.remove, injector_config.is_installed):
        try:
            fn(text)
        except UsageError as exc:
            assert "\n" not in str(exc)


_names = st.lists(st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True).filter(lambda n: n != "ebpf"),
                  max_size=4, unique=True)


@settings(max_examples=100, deadline=None)
@given(_names, st.sampled_from(["flow", "block", "absent", "empty-flow", "null"]),
       st.sampled_from(["  ", "    ", "\t"[:0] + " "]), st.booleans())
def test_add_then_remove_round_trips_any_layout(defaults, style, indent, trailing_newline):
    sidecar = (FIXTURES / "master" / "injection-template.yaml").read_text()
    lines = ["# header", "policy: enabled"]
    if style == "flow":
        lines.append(f"defaultTemplates: [{', '.join(['sidecar', *defaults])}]")
    elif style == "block":
        lines.append("defaultTemplates:")
        lines += [f"- {n}" for n in ["sidecar", *defaults]]
    elif style == "empty-flow":
        lines.append("defaultTemplates: []")
    elif style == "null":
        lines.append("defaultTemplates:")
    lines.append("templates:")
    body = "".join(indent * 2 + ln if ln.strip() else ln for ln in sidecar.splitlines(keepends=True))
    lines.append(f"{indent}sidecar: |\n{body.rstrip()}")
    for n in defaults:
        lines.append(f"{indent}{n}: |\n{indent * 2}spec: {{}}")
    config = "\n".join(lines) + ("\n" if trailing_newline else "")
    added = injector_config.add(config)
    data = injector_config.parse(added)
    assert data["templates"]["sidecar"] == injector_config.parse(config)["templates"]["sidecar"]
    assert injector_config.effective_defaults(data)[-1] == "ebpf"
    assert injector_config.add(added) == added
    assert injector_config.remove(added) == config


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_node_kernel_strings_give_a_mode_or_one_line_error(release):
    node = {"metadata": {"name": "n"}, "status": {"nodeInfo": {"kernelVersion": release}}}
    try:
        [p] = plan.build([node])
    except UsageError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("node n:")
        return
    assert p.mode in ("cookie", "podip", "unsupported")


def test_strategic_merge_rules():
    pod = {"spec": {"initContainers": [{"name": "a", "image": "x"}, {"name": "b"}],
                    "containers": [{"name": "c", "args": ["1", "2"]}]}}
    patch = {"spec": {"initContainers": [{"name": "a", "$patch": "delete"}, {"name": "z", "image": "v"}],
                      "containers": [{"name": "c", "args": ["3"]}]}}
    out = strategic_merge.merge(pod, patch)
    # Kubernetes puts the new item before the pod's remaining ones (kubectl agrees: test_install_template).
    assert out == {"spec": {"initContainers": [{"name": "z", "image": "v"}, {"name": "b"}],
                            "containers": [{"name": "c", "args": ["3"]}]}}
    assert strategic_merge.merge(pod, {}) == pod
    assert strategic_merge.merge(pod, {"spec": {"initContainers": None}})["spec"].get("initContainers") is None
