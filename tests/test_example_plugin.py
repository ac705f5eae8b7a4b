"""The example third-party plugin (docs/example-plugin), installed with pip, found through its entry point.

It is pip-installed into a temporary target directory (wheel built from its pyproject.toml),
which the ``istio-ebpf`` command then sees on its path exactly like a site-packages entry:
its dist-info carries the entry point in group ``istio_ebpf``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.istio_fixtures import PILOT_GOLDEN, ROOT
from ruamel.yaml import YAML

from istio_ebpf_plugin import plugin

EXAMPLE = ROOT / "docs" / "example-plugin"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("example-plugin-site")
    source = tmp_path_factory.mktemp("example-plugin-src") / "example-plugin"
    shutil.copytree(EXAMPLE, source)    # setuptools writes build/ and egg-info beside the sources
    # --no-deps: istio-ebpf itself is this checkout; --no-build-isolation: build with the venv's setuptools.
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--target", str(target), str(source)], capture_output=True, text=True, timeout=300,
                          cwd=target)
    assert proc.returncode == 0, proc.stderr
    return target


def run_cli(site: Path, *args: str, blocked: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(site))
    env.pop(plugin.BLOCKED_PLUGINS_ENV, None)
    if blocked is not None:
        env[plugin.BLOCKED_PLUGINS_ENV] = blocked
    return subprocess.run([sys.executable, "-m", "istio_ebpf_plugin.cli", *args, "-f", str(PILOT_GOLDEN)],
                          capture_output=True, text=True, env=env, timeout=120, cwd=site)


def kinds(text: str) -> list[tuple[str, str]]:
    return [(d["kind"], d["metadata"]["name"]) for d in YAML(typ="safe", pure=True).load_all(text) if d]


def test_installed_with_its_entry_point(site):
    dist = next(site.glob("istio_ebpf_example_plugin-*.dist-info"))
    text = (dist / "entry_points.txt").read_text()
    assert f"[{plugin.NAME}]" in text and "example = istio_ebpf_example" in text


def test_loaded_through_the_entry_point(site):
    proc = run_cli(site, "render", "--owner-configmap", "team-a")
    assert proc.returncode == 0, proc.stderr
    docs = YAML(typ="safe", pure=True).load_all(proc.stdout)
    owner = [d for d in docs if d and d["kind"] == "ConfigMap" and d["metadata"]["name"] == "istio-ebpf-owner"]
    assert len(owner) == 1 and owner[0]["data"] == {"owner": "team-a"}
    # The built-in plugin ran too: the agent's DaemonSet is there, the input is all there.
    found = kinds(proc.stdout)
    assert ("DaemonSet", "istio-ebpf-agent") in found and set(kinds(PILOT_GOLDEN.read_text())) <= set(found)
    # Without the option the plugin contributes nothing.
    plain = run_cli(site, "render")
    assert plain.returncode == 0, plain.stderr
    assert ("ConfigMap", "istio-ebpf-owner") not in kinds(plain.stdout)


def test_blocked_by_the_environment_variable(site):
    proc = run_cli(site, "render", "--owner-configmap", "team-a", blocked="example")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--owner-configmap" in proc.stderr
    plain = run_cli(site, "render", blocked=" example ")
    assert plain.returncode == 0, plain.stderr
    assert ("DaemonSet", "istio-ebpf-agent") in kinds(plain.stdout)
    # Blocking the built-in one leaves the example working on its own.
    only = run_cli(site, "render", "--owner-configmap", "team-b", blocked="ebpf")
    assert only.returncode == 0, only.stderr
    found = kinds(only.stdout)
    assert ("ConfigMap", "istio-ebpf-owner") in found and ("DaemonSet", "istio-ebpf-agent") not in found
