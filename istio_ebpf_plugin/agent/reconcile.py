"""Desired state (the node's pods) -> datapath map entries.

One :class:`Reconciler` per agent, driven from one thread. It remembers which
pod (UID) owns which datapath handle, so that:

* an annotation or IP change rewrites the pod's entry in place (``update_pod``);
* a pod whose sandbox was recreated (new network namespace) gets a new entry;
* a handle re-used by a new pod (same pod IP in pod-IP mode, a recycled netns)
  moves to the new owner and the old pod's later DELETED does not remove it;
* a full resync removes every entry no live pod owns, including those a
  previous agent left pinned (restart or upgrade).

A pod with a garbage annotation keeps its last good configuration (never
silently uncaptured because of a typo); a new one stays pending. Both raise an
Event through ``report``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Protocol

from ..datapath.podconfig import PodConfig
from ..errors import KernelError, UsageError
from .locate import PodLocation, PodLocator
from .pod_spec import interception_mode, is_opted_in, pod_config

log = logging.getLogger(__name__)


class DatapathLike(Protocol):
    """Everything the agent calls on :class:`istio_ebpf_plugin.datapath.loader.Datapath`.

    A pod's handle is what ``add_pod`` returned: the datapath's map key (a netns cookie in
    cookie mode, a cgroup id in pod-IP mode), opaque to the agent.
    """

    def load(self) -> object: ...                              # compile, or adopt a previous agent's pins
    def attach_cgroup(self, cgroup_path: str) -> object: ...   # idempotent
    def retire_other_versions(self) -> list[str]: ...          # after an upgrade: the old version's names
    def add_pod(self, netns_path: str, cfg: PodConfig, cgroup_path: str | None = None) -> int: ...
    def update_pod(self, handle: int, cfg: PodConfig) -> None: ...   # KeyError: not a pod of this datapath
    def remove_pod(self, handle: int) -> None: ...
    def pods(self) -> Mapping[int, object]: ...
    def refresh_listeners(self, netns_paths: dict[int, str]) -> int: ...   # handle -> netns path
    def counters(self) -> Mapping[str, int]: ...
    def occupancy(self) -> Mapping[str, int]: ...              # map name -> entries
    def close(self, cleanup: bool = False) -> None: ...


@dataclass
class Record:
    uid: str
    namespace: str
    name: str
    handle: int
    config: PodConfig
    netns_inode: int
    updated: float
    netns_path: str = ""      # pod-IP mode re-registers Envoy's listener from here


Report = Callable[[Mapping[str, Any], str, str, str], None]  # (pod, type, reason, message)
Captured = Callable[[Mapping[str, Any], PodLocation], None]  # a new sandbox's entries are written


def _meta(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = pod.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


class Reconciler:
    def __init__(self, datapath: DatapathLike, locator: PodLocator,
                 report: Report | None = None, captured: Captured | None = None) -> None:
        self.datapath = datapath
        self.locator = locator
        self.report = report or (lambda pod, etype, reason, msg: None)
        self.captured = captured or (lambda pod, where: None)
        self.records: dict[str, Record] = {}
        self.owners: dict[int, str] = {}
        self.pending: dict[str, Mapping[str, Any]] = {}
        self.errors: dict[str, str] = {}         # uid -> last config error reported
        self.stale_removed = 0                    # entries removed at resync that no pod owned

    # ------------------------------------------------------------------ events
    def apply(self, pod: Mapping[str, Any]) -> None:
        """ADDED or MODIFIED (or a listed pod)."""
        uid = str(_meta(pod).get("uid") or "")
        if not uid:
            return
        spec = pod.get("spec")
        spec = spec if isinstance(spec, Mapping) else {}
        phase = (pod.get("status") or {}).get("phase") if isinstance(pod.get("status"), Mapping) else None
        if phase in ("Succeeded", "Failed") or spec.get("hostNetwork") or not is_opted_in(pod):
            self.remove(uid)
            return
        try:
            if interception_mode(pod) == "NONE":
                self.remove(uid)
                return
            config = pod_config(pod)
        except UsageError as exc:
            msg = str(exc)
            if self.errors.get(uid) != msg:
                self.errors[uid] = msg
                kept = "keeping the last good configuration" if uid in self.records else "pod not captured yet"
                self.report(pod, "Warning", "InvalidTrafficAnnotation", f"{msg}; {kept}")
            if uid not in self.records:
                self.pending[uid] = pod
            return
        self.errors.pop(uid, None)
        if not config.pod_ips:
            self.pending[uid] = pod   # not scheduled onto a sandbox yet
            return
        where = self.locator.locate(uid)
        if where is None:
            self.pending[uid] = pod   # containers not running yet
            return
        self.pending.pop(uid, None)
        try:
            self._program(pod, uid, config, where)
        except (OSError, KernelError) as exc:
            # The sandbox went away between finding and programming it: try again shortly.
            log.warning("programming pod %s/%s failed, will retry: %s", _meta(pod).get("namespace"),
                        _meta(pod).get("name"), exc)
            self.pending[uid] = pod

    def remove(self, uid: str) -> None:
        """DELETED, opted out, or finished."""
        self.pending.pop(uid, None)
        self.errors.pop(uid, None)
        rec = self.records.pop(uid, None)
        if rec is None:
            return
        if self.owners.get(rec.handle) == uid:
            del self.owners[rec.handle]
            self.datapath.remove_pod(rec.handle)

    def retry_pending(self) -> None:
        with self.locator.batch():    # one /proc pass for all of them
            for pod in list(self.pending.values()):
                self.apply(pod)

    def resync(self, pods: Iterable[Mapping[str, Any]]) -> None:
        """A complete list of the node's pods: converge the map state to it."""
        pods = list(pods)
        live = {str(_meta(p).get("uid") or "") for p in pods}
        for uid in [u for u in self.records if u not in live]:
            self.remove(uid)
        for uid in [u for u in self.pending if u not in live]:
            self.pending.pop(uid, None)
        with self.locator.batch():    # one /proc pass for all of them
            for pod in pods:
                self.apply(pod)
        # Entries nobody owns: pinned by a previous agent for pods gone since.
        for handle in [h for h in list(self.datapath.pods()) if h not in self.owners]:
            self.datapath.remove_pod(handle)
            self.stale_removed += 1

    # ------------------------------------------------------------------ helpers
    def _program(self, pod: Mapping[str, Any], uid: str, config: PodConfig, where: PodLocation) -> None:
        rec = self.records.get(uid)
        if rec is not None and rec.netns_inode == where.netns_inode and self.owners.get(rec.handle) == uid:
            if rec.config == config:
                return
            try:
                self.datapath.update_pod(rec.handle, config)
                rec.config, rec.updated = config, time.monotonic()
                return
            except KeyError:   # the entry vanished under us (another actor): program it afresh
                pass
        if rec is not None:  # sandbox recreated (new netns) or handle taken over: start afresh
            self.remove(uid)
        handle = self.datapath.add_pod(where.netns_path, config, where.cgroup_path)
        previous = self.owners.get(handle)
        if previous is not None and previous != uid:
            # The handle (pod IP or netns) now belongs to this pod; forget the old owner
            # without touching the entry.
            self.records.pop(previous, None)
            log.info("handle %r moved from pod %s to %s", handle, previous, uid)
        meta = _meta(pod)
        self.records[uid] = Record(uid, str(meta.get("namespace", "")), str(meta.get("name", "")),
                                   handle, config, where.netns_inode, time.monotonic(), where.netns_path)
        self.owners[handle] = uid
        self.captured(pod, where)
