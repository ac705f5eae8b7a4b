"""Waits stretched for slow machines.

``ISTIO_EBPF_TIMEOUT_SCALE`` multiplies the harness's and the demo's waits for something
to become ready (Envoy LIVE, a server's READY line, a client finishing). Inside a kernel-matrix
guest emulated by TCG everything runs ~5-10x slower, so the matrix sets it to 8 there.
Timeouts that *are* the measurement (a probe connection expected to be dropped) are not scaled.
"""

from __future__ import annotations

import os

from .errors import UsageError

ENV = "ISTIO_EBPF_TIMEOUT_SCALE"


def scale() -> float:
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return 1.0
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"{ENV}={raw!r} is not a number (e.g. 8 for an emulated VM)") from None
    if not 1.0 <= value <= 100.0:
        raise UsageError(f"{ENV}={raw!r} must be between 1 and 100")
    return value


def scaled(seconds: float) -> float:
    """``seconds`` times :func:`scale`."""
    return seconds * scale()
