"""Where the files the package ships beside its code live: ``bpf/`` sources and agent ``manifests/``.

The repository's ``bpf/`` and ``manifests/`` are the only copies: pyproject maps them to the
subpackages ``istio_ebpf_plugin.bpf`` and ``istio_ebpf_plugin.manifests`` (package-dir, like
``hooks/`` -> ``istio_ebpf_plugin.hookspecs``), so a wheel carries them as package data and
:mod:`importlib.resources` finds them wherever the package is installed. A plain checkout on
``sys.path`` without any install falls back to the directories beside the package.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

from . import __version__
from .errors import UsageError

#: Environment override of the agent manifests directory (tests, site-specific manifests).
MANIFESTS_ENV = "ISTIO_EBPF_MANIFESTS_DIR"
#: Environment default of ``render --image`` / ``install --image``.
IMAGE_ENV = "ISTIO_EBPF_IMAGE"
IMAGE_REPOSITORY = "ghcr.io/istio-ebpf/agent"

_CHECKOUT = Path(__file__).resolve().parent.parent


def _data_dir(name: str) -> Path | None:
    """The shipped directory ``name`` as a real path, or None when it is not there."""
    try:
        found = importlib.resources.files(f"{__package__}.{name}")
    except ModuleNotFoundError:
        found = None
    # BCC needs a real directory (-I flag), so a zipped install does not count.
    for candidate in (found, _CHECKOUT / name):
        if isinstance(candidate, Path) and candidate.is_dir():
            return candidate
        # A namespace package (no __init__.py) comes back as a MultiplexedPath over its directories.
        for path in getattr(candidate, "_paths", ()):
            if isinstance(path, Path) and path.is_dir():
                return path
    return None


def bpf_dir() -> Path:
    """The eBPF C sources (``*.c``, ``*.h``)."""
    path = _data_dir("bpf")
    if path is None or not any(path.glob("*.c")):
        raise UsageError(f"eBPF sources not found (package data {__package__}.bpf is missing: "
                         "reinstall istio-ebpf)")
    return path


def manifests_dir() -> Path:
    """The agent manifests: ``$ISTIO_EBPF_MANIFESTS_DIR`` if set, else the shipped ones."""
    override = os.environ.get(MANIFESTS_ENV)
    return Path(override) if override else shipped_manifests_dir()


def shipped_manifests_dir() -> Path:
    """The agent manifests that come with the package."""
    path = _data_dir("manifests")
    if path is None:
        raise UsageError(f"agent manifests not found (package data {__package__}.manifests is missing: "
                         f"reinstall istio-ebpf or set {MANIFESTS_ENV})")
    return path


def release_image() -> str:
    """The published agent image of this package version (``make image`` builds it)."""
    return f"{IMAGE_REPOSITORY}:{__version__}"


def chosen_image() -> str | None:
    """``$ISTIO_EBPF_IMAGE`` when set (the environment default of ``--image``)."""
    return os.environ.get(IMAGE_ENV) or None
