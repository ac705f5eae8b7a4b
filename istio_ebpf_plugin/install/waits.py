"""Waiting for deleted objects to be gone, shared by uninstall and install's rollback.

Both delete the agent DaemonSet before its RBAC and Namespace: its pods' preStop clean-up still
needs them, and a Terminating Namespace refuses new objects (a re-install right after would fail).
"""

from __future__ import annotations

import time
from typing import Any

from .. import kube_api
from ..errors import TemporaryError


def selector_of(daemonset: dict[str, Any]) -> str:
    """The DaemonSet's ``matchLabels`` as a label selector ("" when it has none)."""
    labels = (((daemonset.get("spec") or {}).get("selector") or {}).get("matchLabels")) or {}
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def wait_for_pods_gone(namespace: str, selector: str, timeout: float, interval: float = 1.0,
                       clock=time.monotonic, sleep=time.sleep) -> None:
    """Until no pod matches: their preStop clean-up still needs the RBAC and Namespace we delete next."""
    deadline = clock() + timeout
    while True:
        pods = kube_api.list_pods(namespace, selector)
        if not pods:
            return
        if clock() >= deadline:
            raise TemporaryError(f"{len(pods)} agent pod(s) in {namespace} still terminating after {timeout:g}s; "
                                 "run 'istio-ebpf uninstall' again once they are gone")
        sleep(interval)


def wait_for_gone(api_version: str, kind: str, namespace: str | None, name: str, timeout: float,
                  interval: float = 1.0, clock=time.monotonic, sleep=time.sleep) -> None:
    """Until the object is gone (a Namespace stays Terminating while its content is deleted)."""
    deadline = clock() + timeout
    while kube_api.get_object(api_version, kind, namespace, name) is not None:
        if clock() >= deadline:
            raise TemporaryError(f"{kind} {name} still terminating after {timeout:g}s")
        sleep(interval)
