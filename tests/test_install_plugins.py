"""Hook specifications and the plugin manager."""

from __future__ import annotations

import inspect
import sys
import types

import pytest
from support.istio_fixtures import FIXTURES

from istio_ebpf_plugin import hookspecs
from istio_ebpf_plugin.errors import UsageError
from istio_ebpf_plugin.install import manager, plugin

SPECS = {name: fn for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
         if hasattr(fn, "istio_ebpf_spec")}


def test_there_are_hooks_and_they_share_one_prefix():
    assert len(SPECS) >= 8
    assert all(name.startswith("istio_ebpf_") for name in SPECS)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_hook_is_documented(name):
    doc = inspect.getdoc(SPECS[name]) or ""
    assert "When:" in doc, f"{name}: say when it is called"
    params = [p for p in inspect.signature(SPECS[name]).parameters]
    for param in params:
        assert f":param {param}:" in doc, f"{name}: parameter {param} undocumented"
    assert ":return:" in doc, f"{name}: document the return value"
    firstresult = SPECS[name].istio_ebpf_spec.get("firstresult", False)
    assert ("firstresult: yes" in doc) == firstresult and "firstresult:" in doc


def test_hookspecs_is_not_a_top_level_module():
    assert hookspecs.__name__ == "istio_ebpf_plugin.hookspecs"
    import importlib.util

    assert importlib.util.find_spec("hooks") is None or \
        "istio_ebpf_plugin" not in (importlib.util.find_spec("hooks").origin or "")


def test_builtin_plugin_comes_from_the_entry_point():
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="istio_ebpf") if ep.name == "ebpf"]
    assert eps and eps[0].value == "istio_ebpf_plugin.install.plugin"
    pm = manager.create()
    assert pm.get_plugin("ebpf") is plugin
    assert all(p in {ep.name for ep in entry_points(group="istio_ebpf")} for p, _ in pm.list_name_plugin())


def test_blocking_the_builtin_plugin(monkeypatch):
    monkeypatch.setenv(manager.BLOCK_ENV, " other , ebpf")
    pm = manager.create()
    assert pm.get_plugin("ebpf") is None and pm.is_blocked("ebpf")
    assert pm.hook.istio_ebpf_plan_nodes(nodes=[], options=None) is None


def test_third_party_plugin_from_entry_point_sees_and_changes_the_config(monkeypatch):
    mod = types.ModuleType("ie_test_thirdparty")

    @manager.hookimpl
    def istio_ebpf_edit_injector_config(edit, options):
        edit.config += "\n# touched by third party"

    mod.istio_ebpf_edit_injector_config = istio_ebpf_edit_injector_config
    monkeypatch.setitem(sys.modules, "ie_test_thirdparty", mod)

    class EP:
        name, group, value = "thirdparty", "istio_ebpf", "ie_test_thirdparty"

        def load(self):
            return mod

    class Dist:
        entry_points = [EP()]
        metadata = {"name": "thirdparty"}

    import importlib.metadata

    real = importlib.metadata.distributions
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: [*real(), Dist()])
    pm = manager.create()
    assert pm.get_plugin("thirdparty") is mod and pm.get_plugin("ebpf") is plugin
    from istio_ebpf_plugin.install.pipeline import edit_config

    config = (FIXTURES / "master" / "rendered" / "istio-sidecar-injector.config.yaml").read_text()
    edit = edit_config(pm, "istio-sidecar-injector", "istio-system", config, options=None)
    assert edit.config.endswith("# touched by third party") and "\ntemplates:\n  ebpf: |\n" in edit.config
    monkeypatch.setenv(manager.BLOCK_ENV, "thirdparty")
    assert manager.create().get_plugin("thirdparty") is None


def test_misspelled_hook_is_caught(monkeypatch):
    mod = types.ModuleType("ie_test_typo")

    @manager.hookimpl
    def istio_ebpf_edit_injektor_config(edit, options):  # typo on purpose
        pass

    mod.istio_ebpf_edit_injektor_config = istio_ebpf_edit_injektor_config
    monkeypatch.setitem(manager.BUILTINS, "typo", "ie_test_typo")
    monkeypatch.setitem(sys.modules, "ie_test_typo", mod)
    with pytest.raises(UsageError, match="istio_ebpf_edit_injektor_config"):
        manager.create(load_entrypoints=False)


def test_plugin_implements_only_known_hooks():
    impls = {name for name in dir(plugin) if name.startswith("istio_ebpf_")}
    assert impls and impls <= set(SPECS)
