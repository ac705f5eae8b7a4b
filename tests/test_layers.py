"""Layering: what runs on a node never imports the lab; no import cycles; test doubles live in tests/.

The product is what a node or an install runs: ``datapath/``, ``agent/``, ``install/``, the
Kubernetes client and the small shared modules (``kernel``, ``errors``, the package root),
plus the hook specifications (``hooks/``). The lab (``harness/``, ``bench/``) may import the
product, never the other way round.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "istio_ebpf_plugin"
PKG = "istio_ebpf_plugin"
LAB = (f"{PKG}.harness", f"{PKG}.bench")
PRODUCT_DIRS = ("datapath", "agent", "install")
PRODUCT_MODULES = ("__init__.py", "kube_api.py", "kernel.py", "errors.py", "plugin.py", "resources.py")
# The command line registers the lab's subcommands too; building it may load only these of the lab.
LAB_REGISTRATION = {f"{PKG}.harness", f"{PKG}.harness.cli", f"{PKG}.bench", f"{PKG}.bench.cli"}
# Test files, their doubles and helpers (tests/support/, imported as ``support.<module>``): what tests/
# puts on sys.path under a top-level name.
TEST_MODULES = ({p.stem for p in (ROOT / "tests").glob("*.py")} - {"conftest"}) | {"support"}


def _module_name(path: Path) -> str:
    if path.is_relative_to(ROOT / "hooks"):
        rel = path.relative_to(ROOT / "hooks").with_suffix("")
        parts = [PKG, "hookspecs", *rel.parts]
    else:
        parts = [PKG, *path.relative_to(PACKAGE).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def product_files() -> list[Path]:
    files = [PACKAGE / m for m in PRODUCT_MODULES if (PACKAGE / m).exists()]
    for d in PRODUCT_DIRS:
        files += sorted((PACKAGE / d).rglob("*.py"))
    files += sorted((ROOT / "hooks").rglob("*.py"))
    return files


def package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "hooks").rglob("*.py"))


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file (functions and TYPE_CHECKING blocks too)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            # "from . import x" names a submodule x when there is one
            found.update(f"{mod}.{a.name}" for a in node.names)
    return found


def _is_lab(module: str) -> bool:
    return any(module == lab or module.startswith(lab + ".") for lab in LAB)


def test_product_files_are_found():
    names = {_module_name(p) for p in product_files()}
    for expected in (f"{PKG}.datapath.loader", f"{PKG}.agent.node_agent", f"{PKG}.install.plugin",
                     f"{PKG}.kube_api", f"{PKG}.datapath.selftest.topology", f"{PKG}.hookspecs"):
        assert expected in names


@pytest.mark.parametrize("path", product_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_product_module_never_imports_the_lab_or_tests(path):
    bad = sorted(m for m in imports_of(path) if _is_lab(m) or m.split(".")[0] in TEST_MODULES)
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_importing_the_whole_product_loads_no_lab_module():
    """What really gets loaded, re-exports and import-time side effects included."""
    modules = sorted({_module_name(p) for p in product_files()})
    code = ("import importlib, json, sys\n"
            f"for m in {modules!r}:\n"
            "    importlib.import_module(m)\n"
            "print(json.dumps(sorted(sys.modules)))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout)
    assert set(modules) <= set(loaded)
    lab = [m for m in loaded if _is_lab(m)]
    assert not lab, f"the product loads lab modules: {lab}"
    doubles = [m for m in loaded if m.split(".")[0] in TEST_MODULES]
    assert not doubles, f"the product loads test modules: {doubles}"


def test_the_command_line_loads_no_lab_code():
    """``istio-ebpf agent`` (the DaemonSet's command) builds the whole parser: the lab's
    subcommands register, their code stays unloaded."""
    code = ("import json, sys\n"
            "from istio_ebpf_plugin.cli import build_parser\n"
            "try:\n"
            "    build_parser().parse_args(['agent', '--help'])\n"
            "except SystemExit:\n"
            "    pass\n"
            "print(json.dumps(sorted(sys.modules)), file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage: istio-ebpf agent" in proc.stdout
    loaded = json.loads(proc.stderr.strip().splitlines()[-1])
    assert f"{PKG}.harness.cli" in loaded and f"{PKG}.agent.cli" in loaded
    lab = sorted(m for m in loaded if _is_lab(m) and m not in LAB_REGISTRATION)
    assert not lab, f"building the command line loads lab modules: {lab}"


def test_no_import_cycle_in_the_package():
    """Including imports inside functions and TYPE_CHECKING blocks: a cycle is a layering smell
    (the harness's node/envoy/istio_iptables/probe once imported each other)."""
    files = {_module_name(p): p for p in package_files()}
    graph = {name: {m for m in imports_of(path) if m in files and m != name} for name, path in files.items()}
    # A package's __init__ re-exporting its own submodules is not a cycle worth reporting.
    for name in graph:
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_test_doubles_live_in_tests_not_in_the_package():
    for path in package_files():
        tree = ast.parse(path.read_text())
        fakes = [n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name.startswith("Fake")]
        assert not fakes, f"{path.relative_to(ROOT)} defines test doubles {fakes}: move them to tests/"
        assert not path.stem.startswith("fake"), path


def test_the_agent_reaches_its_seams_through_their_types():
    """NodeAgent calls the datapath and the pod locator through typed seams (``DatapathLike``,
    ``PodLocator``), never ``getattr``: mypy checks every call."""
    tree = ast.parse((PACKAGE / "agent" / "node_agent.py").read_text())
    calls = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
             and n.func.id in ("getattr", "hasattr")]
    assert not calls, f"agent/node_agent.py: getattr/hasattr at lines {calls}"
