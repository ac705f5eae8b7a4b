"""Node mode selection: the kernel version rule, confirmed by feature probes.

The version rule (:mod:`istio_ebpf_plugin.kernel`) only says what the kernel
*should* support; backports and stripped configs make it lie in both
directions, so the datapath's probes (tiny programs loaded for real, plus
cgroup v2 and bpffs checks) have the last word through
:func:`istio_ebpf_plugin.datapath.probe.select_mode`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .. import kernel
from ..datapath import host, probe
from ..errors import UsageError


@dataclass(frozen=True)
class ModeDecision:
    mode: str                  # cookie | podip | unsupported
    reason: str                # one line, published as the node annotation
    kernel_release: str
    version_mode: str          # what the version rule alone says
    features: dict[str, bool] = field(default_factory=dict)
    override: str | None = None
    sockmap: bool = False      # acceleration allowed by the probes (still opt-in)


def find_cgroup2() -> str | None:
    """The cgroup v2 mount (pure v2 or the hybrid 'unified' mount), ``None`` without one."""
    root = host.cgroup_v2_root()
    return str(root) if root is not None else None


def decide(release: str | None = None, override: str | None = None,
           features: dict[str, bool] | None = None) -> ModeDecision:
    """Pick the node's mode. ``override`` (auto|cookie|podip|unsupported) is the operator's word,
    but a forced mode whose probes fail is refused (``unsupported``) and says why."""
    release = release if release is not None else os.uname().release
    if override is not None:
        kernel.validate_mode(override)
        if override == "auto":
            override = None
    try:
        version_mode = kernel.mode_for_release(release)
    except UsageError as exc:
        return ModeDecision("unsupported", str(exc), release, "unsupported", {}, override)
    if features is None:
        features = probe.probe_features()
    mode, reason = probe.select_mode(release, features, override=override)
    return ModeDecision(mode, reason, release, version_mode, dict(features), override,
                        mode != "unsupported" and probe.sockmap_supported(mode, features))
