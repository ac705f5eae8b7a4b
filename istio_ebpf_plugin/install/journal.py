"""What one ``istio-ebpf install`` run changed, so that a failure at any step undoes it.

Every change goes through the active :class:`Journal` (``record_*`` before or right after
the API call that makes it). On a failure :meth:`Journal.rollback` undoes the entries in
reverse order:

- a patched injector ConfigMap gets its former ``data.config`` and annotation back with a
  JSON patch guarded by a ``test`` of the resourceVersion our patch produced (someone
  else's later edit is never overwritten: that entry is then reported as left);
- an object this run created (agent Namespace, RBAC, DaemonSet, backup ConfigMap) is
  deleted; an object that existed before is left as the run applied it;
- a node label this run set gets its former value back (or is removed).

``ISTIO_EBPF_FAILPOINT`` (tests): a step whose name begins with its value fails before
it changes anything, e.g. ``patch ConfigMap``, ``apply DaemonSet``, ``label node``, ``rollout``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from .. import kube_api
from . import waits
from ..errors import PermanentError

FAILPOINT_ENV = "ISTIO_EBPF_FAILPOINT"


@dataclass
class _Entry:
    what: str
    undo: Callable[[], object]


@dataclass
class Journal:
    entries: list[_Entry] = field(default_factory=list)
    step_name: str = "start"

    def step(self, name: str) -> None:
        """Name the step about to run (the failure message names it); the failpoint acts here."""
        self.step_name = name
        point = os.environ.get(FAILPOINT_ENV, "")
        if point and name.startswith(point):
            raise PermanentError(f"failpoint {FAILPOINT_ENV}={point}")

    def record_configmap_patch(self, before: dict[str, Any], after: dict[str, Any], annotation: str) -> None:
        meta = before.get("metadata") or {}
        ns, name = meta.get("namespace", ""), meta["name"]
        old_config = (before.get("data") or {}).get("config")
        old_ann = (meta.get("annotations") or {}).get(annotation)
        had_annotations = "annotations" in meta
        version = str((after.get("metadata") or {}).get("resourceVersion") or "")

        def undo() -> None:
            ops: list[dict[str, Any]] = [{"op": "test", "path": "/metadata/resourceVersion", "value": version},
                                         {"op": "replace", "path": "/data/config", "value": old_config}]
            pointer = "/metadata/annotations/" + annotation.replace("~", "~0").replace("/", "~1")
            if old_ann is not None:
                ops.append({"op": "replace", "path": pointer, "value": old_ann})
            elif not had_annotations:
                ops.append({"op": "remove", "path": "/metadata/annotations"})
            else:
                ops.append({"op": "remove", "path": pointer})
            kube_api.json_patch_configmap(ns, name, ops)
        self.entries.append(_Entry(f"ConfigMap {ns}/{name} patched", undo))

    def record(self, what: str, undo: Callable[[], object]) -> None:
        self.entries.append(_Entry(what, undo))

    def apply(self, body: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply ``body``; when it did not exist before, record its deletion."""
        meta = body.get("metadata") or {}
        api_version, kind, ns, name = body.get("apiVersion", ""), body.get("kind", ""), meta.get("namespace"), \
            meta["name"]
        existed = kube_api.get_object(api_version, kind, ns or None, name) is not None
        out = kube_api.apply_object(body)
        if not existed:
            self.entries.append(_Entry(f"{kind} {ns + '/' if ns else ''}{name} created", lambda: _delete(body)))
        return out

    def label_node(self, node: dict[str, Any], labels: dict[str, str | None]) -> None:
        meta = node.get("metadata") or {}
        name = meta.get("name", "")
        current = meta.get("labels") or {}
        previous = {k: current.get(k) for k in labels}
        kube_api.label_node(name, labels)
        self.entries.append(_Entry(f"node {name} labelled", lambda: kube_api.label_node(name, previous)))

    def label_node_if_unchanged(self, node: dict[str, Any], key: str, value: str) -> None:
        """As label_node, but only if the Node is still as read (resourceVersion test); else ConcurrentEditError."""
        meta = node.get("metadata") or {}
        name = meta.get("name", "")
        previous = {key: (meta.get("labels") or {}).get(key)}
        kube_api.label_node_if_unchanged(node, key, value)
        self.entries.append(_Entry(f"node {name} labelled", lambda: kube_api.label_node(name, previous)))

    def rollback(self) -> list[str]:
        """Undo every entry, newest first; the entries that could not be undone, with why."""
        left: list[str] = []
        for entry in reversed(self.entries):
            try:
                entry.undo()
            except Exception as exc:  # keep going: undo as much as can be undone
                left.append(f"{entry.what} ({type(exc).__name__}: {exc})")
            else:
                print(f"rolled back: {entry.what}", file=sys.stderr)
        self.entries.clear()
        return left


def _delete(body: dict[str, Any], timeout: float = 60.0) -> None:
    """Delete as uninstall does: a DaemonSet's pods and a Namespace are waited for (install/waits.py)."""
    meta = body.get("metadata") or {}
    api_version, kind, ns, name = body.get("apiVersion", ""), body.get("kind", ""), meta.get("namespace"), \
        meta["name"]
    kube_api.delete_object(api_version, kind, ns or None, name)
    selector = waits.selector_of(body)
    if kind == "DaemonSet" and selector:
        waits.wait_for_pods_gone(ns or "", selector, timeout, interval=0.5)
    elif kind == "Namespace":
        waits.wait_for_gone(api_version, kind, None, name, timeout, interval=0.5)


_ACTIVE: Journal | None = None


def active() -> Journal:
    """The journal of the running install (a throw-away one outside an install)."""
    return _ACTIVE if _ACTIVE is not None else Journal()


def activate(journal: Journal | None) -> Journal | None:
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, journal
    return previous
