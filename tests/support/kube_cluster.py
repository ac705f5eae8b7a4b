"""The real control plane as pytest fixtures (see conftest.py): one per session, stopped at the end."""

from __future__ import annotations

import os
from typing import Iterator

import pytest

from istio_ebpf_plugin.harness.control_plane import ControlPlane, ControlPlaneError, binaries


def start_control_plane(watch_cache: bool = True) -> Iterator[ControlPlane]:
    if os.geteuid() != 0 and not os.environ.get("CI"):
        pytest.skip("the control plane's binaries are built into /var/cache/istio-ebpf as root")
    try:
        bin_dir = binaries()    # builds on a cold machine (make test runs `make kubernetes` first)
    except ControlPlaneError as exc:
        pytest.fail(f"cannot build Kubernetes: {exc}", pytrace=False)
    with ControlPlane.create(bin_dir=bin_dir, watch_cache=watch_cache) as cp:
        yield cp
