"""The datapath modes this kernel can run, from the feature probes (not from this host).

The same kernel tests run here (6.18: both modes) and in the kernel-matrix VMs (5.10: pod-IP
mode only), so a test takes its mode from the probes instead of assuming cookie mode:

* :func:`host_mode` is the mode the node agent would select here;
* :func:`require_mode` is for tests parametrized over both modes: a mode the probes rule out
  is skipped with the probe's reason (never counted as a pass), after checking that the
  selection indeed refuses it.
"""

from __future__ import annotations

import functools
import os
import uuid

import pytest

from istio_ebpf_plugin.datapath.probe import MODE_REQUIREMENTS, probe_features, select_mode


@functools.cache
def features() -> dict[str, bool]:
    return probe_features()


def missing(mode: str) -> list[str]:
    return [p for p in MODE_REQUIREMENTS[mode] if not features().get(p, False)]


def host_mode() -> str:
    """cookie or podip, as the agent would choose on this kernel; fails if neither is possible."""
    mode, why = select_mode(os.uname().release, features())
    if mode == "unsupported":
        pytest.fail(f"this kernel runs no eBPF datapath mode: {why}")
    return mode


def require_mode(mode: str) -> None:
    gaps = missing(mode)
    if gaps:
        assert select_mode(os.uname().release, features(), override=mode)[0] != mode
        pytest.skip(f"kernel {os.uname().release} cannot run {mode} mode (probes failed: {', '.join(gaps)})")


def unique_pin_root() -> str:
    """A bpffs pin root no other test (or session) uses."""
    return f"/sys/fs/bpf/istio-ebpf-test-{uuid.uuid4().hex[:8]}"
