"""Shared by the ship tests: the wheel built from this checkout, installed as a user would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: What a wheel is built from (a fresh clone holds these; .venv, build/ and caches stay out).
WHEEL_INPUTS = ("pyproject.toml", "README.md", "istio_ebpf_plugin", "hooks", "bpf", "manifests")
#: Debian's python: its venvs (with system site packages) see python3-bpfcc. A venv made from
#: another interpreter (pyenv, a python.org build) cannot import BCC: every probe would fail.
SYSTEM_PYTHON = "/usr/bin/python3"


def run(cmd: list[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)


def check(cmd: list[str], timeout: float = 600, **kw) -> str:
    proc = run(cmd, timeout, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc.stdout


def copy_sources(names: tuple[str, ...], dest: Path) -> Path:
    """The checkout's files and directories ``names`` (relative paths) copied below ``dest``, no caches."""
    for name in names:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest / name)
    return dest


def build_wheel(work: Path) -> Path:
    """``pip wheel`` of a copy of the sources (an in-tree build would write build/ into the clone)."""
    src = copy_sources(WHEEL_INPUTS, work / "src")
    check([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", work / "dist", src])
    wheels = list((work / "dist").glob("istio_ebpf-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def install_wheel(wheel: Path, venv: Path) -> Path:
    """A fresh venv (system site packages, for BCC) with the wheel and its runtime dependencies."""
    check([SYSTEM_PYTHON, "-m", "venv", "--system-site-packages", venv])
    check([venv / "bin" / "pip", "install", "-q", wheel])
    return venv


def helm() -> Path:
    """Real Helm 3.17.1, fetched once into the cache outside the clone."""
    cache = check(["bash", ROOT / "scripts" / "fetch-helm.sh"]).strip().splitlines()[-1]
    return Path(cache) / "helm"


def user_env(**extra: str) -> dict[str, str]:
    """The environment of a user outside the clone: no override pointing back into it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ISTIO_EBPF_", "PYTHON"))}
    env.update(extra)
    return env
