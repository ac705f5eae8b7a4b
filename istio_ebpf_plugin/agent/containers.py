"""A pod's app init containers, by cgroup: ``istio-ebpf.io/init-containers: bypass``.

Without a native sidecar, a pod's own init containers run before Envoy does. Captured, their
connections (DNS included) go to a proxy that is not there yet, so they hang or fail: what
Istio's rules do too, under istio-cni or once capture is in place. A pod that opts in with
the annotation gets its app init containers' connections left uncaptured, as if the pod were
not meshed yet; everything else of the pod stays captured.

iptables works per network namespace and cannot tell containers apart; the cgroup hooks can:
every container has its own cgroup below the pod's. The agent lists, per pod, the cgroup ids
of the containers it identifies as app init containers (``Datapath.set_init_bypass``); the
programs leave a process alone only when its own cgroup is listed (bpf/pod_lookup.h
``init_bypassed``). What is listed:

* the container's name is one of ``spec.initContainers`` and not Istio's own (the gates
  ``istio-validation``/``istio-init``/``istio-ebpf-validation`` must be captured: they verify
  capture; ``istio-proxy``; ``enable-core-dump``), and it is not a native sidecar
  (``restartPolicy: Always``: it runs beside the app containers, so it is one of them);
* its container id is the one the pod's status gives for that name (``status.
  initContainerStatuses[].containerID``, written by kubelet), and a cgroup directory below the
  pod's carries that id in its name (``<id>``, ``cri-containerd-<id>.scope``,
  ``crio-<id>.scope``, ``docker-<id>.scope``).

Everything else is captured: a container the status does not name yet (kubelet publishes a
new container's id after it started, so the first moments of an init container are captured:
it fails closed, never open), an app container, a cgroup a process creates below its own.
An app container's id is never an init container's name in the status, so it is never listed.
Once init containers have exited their cgroups are gone and the list empties by itself.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from ..errors import UsageError

ANNOTATION = "istio-ebpf.io/init-containers"
BYPASS, CAPTURE = "bypass", "capture"
#: Istio's containers among the init containers: never left uncaptured.
ISTIO_CONTAINERS = frozenset({"istio-init", "istio-validation", "istio-ebpf-validation", "istio-proxy",
                              "enable-core-dump"})
_ID = re.compile(r"(?<![0-9a-f])([0-9a-f]{64})(?![0-9a-f])")


def wants_bypass(annotations: Mapping[str, Any]) -> bool:
    """The pod's ``istio-ebpf.io/init-containers`` annotation: ``bypass``, or ``capture`` (the default)."""
    value = annotations.get(ANNOTATION, CAPTURE)
    if value not in (BYPASS, CAPTURE):
        raise UsageError(f"{ANNOTATION}: {str(value)[:40]!r} is not {BYPASS!r} or {CAPTURE!r}")
    return value == BYPASS


def _list(value: Any) -> list[Mapping[str, Any]]:
    return [v for v in value if isinstance(v, Mapping)] if isinstance(value, list) else []


def app_init_containers(pod: Mapping[str, Any]) -> set[str]:
    """Names of the pod's app init containers (not Istio's, not native sidecars)."""
    spec = pod.get("spec")
    spec = spec if isinstance(spec, Mapping) else {}
    return {str(c.get("name")) for c in _list(spec.get("initContainers"))
            if c.get("name") not in ISTIO_CONTAINERS and c.get("restartPolicy") != "Always"}


def container_ids(pod: Mapping[str, Any], names: set[str]) -> set[str]:
    """The current container ids the pod's status gives for init containers named ``names``."""
    status = pod.get("status")
    status = status if isinstance(status, Mapping) else {}
    out = set()
    for st in _list(status.get("initContainerStatuses")):
        if st.get("name") in names:
            m = _ID.search(str(st.get("containerID") or ""))
            if m:
                out.add(m.group(1))
    return out


def container_cgroups(pod_cgroup: str) -> dict[str, int]:
    """Container id -> cgroup id of the container cgroups right below the pod's."""
    out: dict[str, int] = {}
    try:
        entries = list(os.scandir(pod_cgroup))
    except OSError:
        return out
    for e in entries:
        m = _ID.search(e.name)
        if m and e.is_dir(follow_symlinks=False):
            try:
                out[m.group(1)] = os.stat(e.path).st_ino     # a cgroup's id (64-bit kernels)
            except OSError:
                continue
    return out


def bypass_cgroups(pod: Mapping[str, Any], pod_cgroup: str) -> frozenset[int]:
    """The cgroup ids of the pod's app init containers that exist now, as identified above."""
    ids = container_ids(pod, app_init_containers(pod))
    if not ids:
        return frozenset()
    return frozenset(cg for cid, cg in container_cgroups(pod_cgroup).items() if cid in ids)
