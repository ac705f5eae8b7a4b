"""Crash points of an upgrade, for the tests that SIGKILL the agent at each step.

``ISTIO_EBPF_FAILPOINT=<name>`` makes the process SIGKILL itself when it reaches ``<name>``: the
same death as an OOM kill or a node drain's force kill, at an exact step instead of a lucky one.
Unset (always, outside the upgrade tests) it costs one dictionary lookup.

Names (the agent's start-up, in order): ``loaded`` (programs and config maps pinned),
``filled`` (config maps hold every pod of the first list), ``takeover-<n>`` (n links retargeted),
``retire-<n>`` (n pins of the old version removed).
"""

from __future__ import annotations

import os
import signal

ENV = "ISTIO_EBPF_FAILPOINT"


def reached(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
