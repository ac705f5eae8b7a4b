"""Desired state (the node's pods) -> datapath map entries, one state per opted-in pod.

One :class:`Reconciler` per agent, driven from one thread. Every opted-in pod of the node
has a :class:`PodState`:

``pending``
    no sandbox yet (no pod IP, no running process): nothing to capture yet. The pod's
    ``istio-validation`` init container keeps it from starting meanwhile.
``captured``
    its entries are in the maps (Event ``CaptureReady``, with the time since its sandbox
    started).
``failed``
    it has a sandbox but cannot be programmed (full maps, an invalid traffic annotation, a
    kernel refusal). It must not run uncaptured, so a deny program is linked into its own
    cgroup and network namespace (every connection it opens or receives is refused) until
    a retry succeeds; retries back off from ``retry_initial`` to ``retry_max``. Event
    ``CaptureFailed`` once per state change, not per retry.
``ignored``
    the opt-in cannot apply (no sidecar, TPROXY, NONE, hostNetwork): Event ``CaptureIgnored``.

Capture is fixed per sandbox, as Istio's is (istio-init, or the istio-cni plugin, runs once
when the sandbox starts): once a sandbox is captured, edits of the Pod object (traffic
annotations, the opt-in itself) do not change it; they take effect when the pod gets a new
sandbox, and the pod gets an Event saying so. A sandbox seen opted in stays under the
agent's care (captured, or refused while failed) until it ends, so removing the opt-in
never lets a running sidecar pod out uncaptured.

It also remembers which pod owns which datapath handle, so a handle taken over by a new pod
is not removed by the old pod's late DELETED, and a full resync removes every entry and
deny link that no live pod owns (left pinned by a previous agent). On the agent's first
resync, pods whose entries a previous agent pinned are adopted as they are: the restart
does not rewrite (and so does not change) any running sandbox's capture.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import time
from dataclasses import dataclass, field
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from ..datapath.explain import Answer, Question
from ..datapath.podconfig import PodConfig
from ..errors import KernelError, UsageError
from . import containers
from .locate import PodLocation, PodLocator
from .pod_spec import ignored, is_opted_in, pod_config

log = logging.getLogger(__name__)

PENDING, CAPTURED, FAILED, IGNORED, DRAINING = "pending", "captured", "failed", "ignored", "draining"
#: Failure categories (the ``reason`` label of the failure metric: a small fixed set).
MAPS_FULL, INVALID_CONFIG, KERNEL = "maps_full", "invalid_config", "kernel"
OPT_IN_ADDED = "opt-in added on a running pod: not captured"


class DatapathLike(Protocol):
    """Everything the agent calls on :class:`istio_ebpf_plugin.datapath.loader.Datapath`.

    A pod's handle is what ``add_pod`` returned: the datapath's map key (a netns cookie in
    cookie mode, a cgroup id in pod-IP mode), opaque to the agent. A deny's handle is what
    ``deny_pod`` returned, opaque too.
    """

    version: str        # this build's name (sources and flags hashed), as pinned under versions/
    adopted: bool       # load() found this version pinned (a restart, or a prepare step ran)

    def load(self) -> object: ...                              # compile, or adopt a previous agent's pins
    def attach_cgroup(self, cgroup_path: str) -> object: ...   # idempotent
    def take_over(self, cgroup_path: str) -> object: ...       # every hook runs this version (after the fill)
    def other_versions(self) -> list: ...                      # pins of other versions: a takeover is due
    def retire_other_versions(self) -> list[str]: ...          # after an upgrade: the old version's names
    def pod_key(self, netns_path: str, cgroup_path: str | None = None) -> int: ...   # add_pod's handle
    def add_pod(self, netns_path: str, cfg: PodConfig, cgroup_path: str | None = None,
                pids: Sequence[int] = ()) -> int: ...   # pids: the pod's processes, if known
    def update_pod(self, handle: int, cfg: PodConfig) -> None: ...   # KeyError: not a pod of this datapath
    def remove_pod(self, handle: int) -> None: ...
    def pods(self) -> Mapping[int, object]: ...
    def refresh_listeners(self, netns_paths: dict[int, str]) -> Mapping[int, int]: ...   # -> entries per handle
    def set_init_bypass(self, handle: int, cgroup_ids: Iterable[int]) -> None: ...   # the pod's listed set
    def counters(self) -> Mapping[str, int]: ...
    def pod_counters(self) -> Mapping[int, Mapping[str, int]]: ...   # handle -> counter name -> value
    def explain(self, handle: int, question: Question) -> Answer: ...   # the kernel's decision (ExplainUnavailable)
    def occupancy(self) -> Mapping[str, int]: ...              # map name -> entries
    def deny_pod(self, netns_path: str, cgroup_path: str) -> int: ...   # refuse the pod's connections
    def allow_pod(self, deny: int) -> None: ...                # undo deny_pod (idempotent, pod may be gone)
    def denied(self) -> Iterable[int]: ...                     # every deny in place (previous agents' too)
    def close(self, cleanup: bool = False) -> None: ...


@dataclass
class PodState:
    uid: str
    namespace: str
    name: str
    pod: Mapping[str, Any]                 # the latest object seen
    state: str = PENDING
    error: str = ""                        # failed: why; pending/ignored: what it waits for / why
    since: float = field(default_factory=time.time)   # wall clock of the last state change
    # The sandbox the pod's capture was decided for (netns_inode None: none seen yet).
    netns_inode: int | None = None
    netns_path: str = ""
    cgroup_path: str = ""
    config: PodConfig | None = None        # captured: the sandbox's configuration, fixed
    handle: int | None = None         # captured: its map key
    deny: int | None = None           # failed: the deny in place
    bypass: frozenset[int] | None = None   # captured: app init container cgroups listed (None: not yet)
    capture_seconds: float | None = None   # sandbox start -> entries written
    failure: str = ""                      # failed: category (MAPS_FULL, ...)
    retry_at: float = 0.0
    retry_delay: float = 0.0
    notice: str = ""                       # the last "takes effect at restart" Event sent
    attempted: Any = None                  # failed: what was tried last (a new object retries at once)
    updated: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class _Wanted:
    """What the Pod object asks for now."""

    kind: str                              # "skip" | "ignore" | "invalid" | "wait" | "capture"
    message: str = ""
    warning: bool = False
    config: PodConfig | None = None


Report = Callable[[Mapping[str, Any], str, str, str], None]  # (pod, type, reason, message)
#: a new sandbox's entries are written: (pod, where) -> seconds since its sandbox started, None if unknown
Captured = Callable[[Mapping[str, Any], PodLocation], "float | None"]


def _meta(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = pod.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _wanted(pod: Mapping[str, Any]) -> _Wanted:
    spec = pod.get("spec")
    spec = spec if isinstance(spec, Mapping) else {}
    status = pod.get("status")
    phase = status.get("phase") if isinstance(status, Mapping) else None
    if phase in ("Succeeded", "Failed") or not is_opted_in(pod):
        return _Wanted("skip")
    try:
        why = ignored(pod)
        if why is not None:
            return _Wanted("ignore", why.reason, why.warning)
        config = pod_config(pod)
    except UsageError as exc:
        return _Wanted("invalid", str(exc), True)
    if not config.pod_ips:
        return _Wanted("wait", "no pod IP yet", config=config)
    return _Wanted("capture", config=config)


def _same_capture(a: PodConfig | None, b: PodConfig | None) -> bool:
    """Equal, the order of the addresses aside (they may have come from the sandbox, not the API)."""
    if a is None or b is None or a == b:
        return a == b
    return set(a.pod_ips) == set(b.pod_ips) and dataclasses.replace(a, pod_ips=b.pod_ips) == b


def _failure_kind(exc: BaseException) -> str:
    text = str(exc)
    if "maps are full" in text or getattr(exc, "errno", None) in (errno.E2BIG, errno.ENOSPC, errno.ENOMEM):
        return MAPS_FULL
    return KERNEL


def _sandbox_gone(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOENT, errno.ESRCH)


class Reconciler:
    def __init__(self, datapath: DatapathLike, locator: PodLocator, report: Report | None = None,
                 mode: str = "", captured: Captured | None = None,
                 retry_initial: float = 1.0, retry_max: float = 60.0) -> None:
        self.datapath = datapath
        self.locator = locator
        self.report = report or (lambda pod, etype, reason, msg: None)
        self.mode = mode
        self.captured = captured or (lambda pod, where: None)
        self.retry_initial, self.retry_max = retry_initial, retry_max
        self.states: dict[str, PodState] = {}
        self.owners: dict[int, str] = {}
        self.stale_removed = 0                    # entries removed at resync that no pod owned
        self.failures: dict[str, int] = {}        # failure category -> failed programming attempts
        self.declined: dict[str, int] = {}        # running pods seen not opted in -> their netns inode
        self._adoptable: set[int] | None = None   # handles pinned before the first resync

    # ------------------------------------------------------------------ views
    @property
    def records(self) -> dict[str, PodState]:
        """Captured pods (uid -> state)."""
        return {u: s for u, s in self.states.items() if s.state == CAPTURED}

    @property
    def pending(self) -> dict[str, PodState]:
        return {u: s for u, s in self.states.items() if s.state == PENDING}

    @property
    def failed(self) -> dict[str, PodState]:
        return {u: s for u, s in self.states.items() if s.state == FAILED}

    # ------------------------------------------------------------------ events
    def apply(self, pod: Mapping[str, Any]) -> None:
        """ADDED or MODIFIED (or a listed pod)."""
        meta = _meta(pod)
        uid = str(meta.get("uid") or "")
        if not uid:
            return
        status = pod.get("status")
        phase = status.get("phase") if isinstance(status, Mapping) else None
        if phase in ("Succeeded", "Failed"):
            self.remove(uid)      # its sandbox is finished: nothing left to capture
            return
        want = _wanted(pod)
        st = self.states.get(uid)
        where: PodLocation | None = None
        if st is None:
            if want.kind == "skip":
                self._decline(uid, phase)
                return
            if uid in self.declined:
                # Opted in while running: like every other edit, for its next sandbox only.
                where = self.locator.locate(uid)
                if where is not None and where.netns_inode == self.declined[uid]:
                    st = self.states[uid] = PodState(uid, str(meta.get("namespace", "")),
                                                     str(meta.get("name", "")), pod)
                    self._hold(st, where, OPT_IN_ADDED)
                    return
                del self.declined[uid]
        else:
            st.pod, st.namespace, st.name = pod, str(meta.get("namespace", "")), str(meta.get("name", ""))
            if st.netns_inode is not None:
                where = self.locator.locate(uid)
                if where is None or where.netns_inode == st.netns_inode:
                    self._same_sandbox(st, want, where)
                    return
                log.info("pod %s/%s has a new sandbox: capture decided afresh", st.namespace, st.name)
                self._end_sandbox(st)
        if want.kind == "skip":
            self.remove(uid)
            self._decline(uid, phase)
            return
        if st is None:
            st = self.states[uid] = PodState(uid, str(meta.get("namespace", "")), str(meta.get("name", "")), pod)
        if want.kind == "ignore":
            where = where or self.locator.locate(uid)
            if where is not None:    # decided for this sandbox
                st.netns_inode, st.netns_path, st.cgroup_path = where.netns_inode, where.netns_path, \
                    where.cgroup_path
            if st.state != IGNORED or st.error != want.message:
                self._set(st, IGNORED, want.message, "Warning" if want.warning else "Normal", "CaptureIgnored",
                          f"istio-ebpf opt-in ignored: {want.message}")
            return
        if want.kind == "wait" and want.config is not None:
            # Only the addresses are missing: the API has them after kubelet's next status update
            # (its relist, up to a second after the sandbox runs), the sandbox's interfaces at once.
            # Capture then does not wait for it, nor does istio-validation, which waits for capture.
            where = where or self.locator.locate(uid)
            ips = self.locator.addresses(where) if where is not None else ()
            if ips:
                want = _Wanted("capture", config=dataclasses.replace(want.config, pod_ips=ips))
        if want.kind == "wait":
            self._set(st, PENDING, want.message)
            return
        where = where or self.locator.locate(uid)
        if where is None:
            self._set(st, PENDING, "no running container yet")
            return
        # A sandbox seen opted in: from now on the agent captures it, or refuses its traffic.
        st.netns_inode, st.netns_path, st.cgroup_path = where.netns_inode, where.netns_path, where.cgroup_path
        self._program(st, want, where)

    def _decline(self, uid: str, phase: Any) -> None:
        """Remember the sandbox of a running pod that is not opted in (an opt-in added later waits
        for its next sandbox). Only the locator's current index is asked: no /proc scan per pod."""
        if phase == "Running" and uid not in self.declined:
            where = self.locator.peek(uid)
            if where is not None:
                self.declined[uid] = where.netns_inode

    def _hold(self, st: PodState, where: PodLocation, why: str) -> None:
        """Not captured, by decision, for this sandbox."""
        st.netns_inode, st.netns_path, st.cgroup_path = where.netns_inode, where.netns_path, where.cgroup_path
        self._set(st, IGNORED, why)
        self._notice(st, "Normal", "CaptureUnchanged", self._unchanged(st))

    @staticmethod
    def _unchanged(st: PodState) -> str:
        return f"{st.error}: this sandbox stays as it started; the change takes effect when the pod restarts " \
            "(new sandbox)"

    def remove(self, uid: str) -> None:
        """DELETED, opted out before its sandbox was seen, or finished."""
        self.declined.pop(uid, None)
        st = self.states.pop(uid, None)
        if st is not None:
            self._end_sandbox(st)

    def retry_pending(self, now: float | None = None) -> int:
        """Pending pods every call (cheap: no writes), failed ones when their backoff is due.
        Returns how many were tried."""
        now = time.monotonic() if now is None else now
        due = [st for st in self.states.values()
               if st.state == PENDING or (st.state == FAILED and now >= st.retry_at)]
        if due:
            with self.locator.batch():    # one /proc pass for all of them
                for st in due:
                    self.apply(st.pod)
        return len(due)

    def resync(self, pods: Iterable[Mapping[str, Any]]) -> None:
        """A complete list of the node's pods: converge the map state to it."""
        pods = list(pods)
        if self._adoptable is None:      # the first list: what a previous agent pinned is adoptable
            self._adoptable = set(self.datapath.pods())
        live = {str(_meta(p).get("uid") or "") for p in pods}
        for uid in [u for u in (*self.states, *self.declined) if u not in live]:
            self.remove(uid)
        with self.locator.batch():    # one /proc pass for all of them
            for pod in pods:
                self.apply(pod)
        self._adoptable = set()
        # Entries nobody owns: pinned by a previous agent for pods gone since.
        for handle in [h for h in list(self.datapath.pods()) if h not in self.owners]:
            self.datapath.remove_pod(handle)
            self.stale_removed += 1
        denies = {st.deny for st in self.states.values() if st.deny is not None}
        for deny in [d for d in self.datapath.denied() if d not in denies]:
            self.datapath.allow_pod(deny)

    # ------------------------------------------------------------------ one sandbox
    def _same_sandbox(self, st: PodState, want: _Wanted, where: PodLocation | None) -> None:
        """The pod's sandbox is the one already decided (or its process is not visible now)."""
        self._follow_init_containers(st)      # its status names the init containers as they start
        if st.state == CAPTURED:
            if want.kind == "capture" and _same_capture(want.config, st.config):
                st.notice = ""
                return
            if want.kind == "invalid":
                self._notice(st, "Warning", "InvalidTrafficAnnotation",
                             f"{want.message}; this sandbox keeps its capture (last good configuration)")
            elif want.kind == "skip":
                self._notice(st, "Normal", "CaptureUnchanged",
                             "opt-in removed on a running pod: this sandbox stays captured (capture is fixed "
                             "when a pod starts, as with Istio); recreate the pod to run it without eBPF capture")
            elif want.kind == "ignore":
                self._notice(st, "Normal", "CaptureUnchanged",
                             f"{want.message}: this sandbox stays captured; the change takes effect when the "
                             "pod restarts (new sandbox)")
            elif want.kind == "capture":
                self._notice(st, "Normal", "CaptureUnchanged",
                             "traffic annotations changed on a running pod: this sandbox keeps the capture it "
                             "started with; the change takes effect when the pod restarts (new sandbox)")
            return
        if st.state == IGNORED:
            if want.kind == "skip":
                self.remove(st.uid)
                if st.netns_inode is not None:
                    self.declined[st.uid] = st.netns_inode
            elif want.kind in ("capture", "invalid") or (want.kind == "ignore" and want.message != st.error):
                self._notice(st, "Normal", "CaptureUnchanged", self._unchanged(st))
            return
        if st.state == FAILED:
            if want.kind in ("capture", "invalid"):
                if want == st.attempted and time.monotonic() < st.retry_at:
                    return      # nothing new: the backoff decides when to try again
                if where is None:     # no process visible right now: wait for the next turn
                    st.retry_at = time.monotonic() + max(st.retry_delay, self.retry_initial)
                    return
                st.netns_path, st.cgroup_path = where.netns_path, where.cgroup_path
                self._program(st, want, where)
                return
            # Opted out or ignored while refused: still refused until the sandbox ends (it may
            # have run captured before, under another agent: letting it go would un-capture it).
            self._notice(st, "Normal", "CaptureUnchanged",
                         "opt-in changed while the pod could not be captured: its connections stay refused "
                         "until the pod restarts (new sandbox)")

    def _program(self, st: PodState, want: _Wanted, where: PodLocation) -> None:
        st.attempted = want
        if want.kind == "invalid" or want.config is None:
            self._fail(st, where, f"invalid traffic annotation: {want.message}", INVALID_CONFIG)
            return
        config = want.config      # as the Pod object states it: what later edits are compared with
        if self._adoptable:
            try:
                key = self.datapath.pod_key(where.netns_path, where.cgroup_path)
            except (OSError, KernelError):
                key = None
            if key is not None and key in self._adoptable and key not in self.owners:
                # Pinned by the previous agent for this very sandbox: kept as it is.
                self._adoptable.discard(key)
                self._own(st, key, config)
                self._set(st, CAPTURED, "")
                self._follow_init_containers(st)
                return
        try:
            # hostUsers: false: the proxy's IDs as the kernel sees them (datapath/userns.py).
            entries = self.locator.host_config(config, where)
        except UsageError as exc:
            self._fail(st, where, str(exc), INVALID_CONFIG)
            return
        except (OSError, KernelError) as exc:
            self._fail(st, where, f"user namespace of the pod not readable: {exc}", KERNEL)
            return
        try:
            handle = self.datapath.add_pod(where.netns_path, entries, where.cgroup_path, where.pids)
        except (OSError, KernelError) as exc:
            if _sandbox_gone(exc):
                # The sandbox went away between finding and programming it: find it again.
                st.netns_inode = None
                if st.state != FAILED:
                    self._set(st, PENDING, "sandbox gone while being programmed")
                return
            self._fail(st, where, str(exc), _failure_kind(exc))
            return
        self._own(st, handle, config)
        if st.deny is not None:
            self.datapath.allow_pod(st.deny)
            st.deny = None
        st.retry_delay = 0.0
        st.capture_seconds = self.captured(st.pod, where)
        took = f"{st.capture_seconds:.2f} s after the sandbox started" if st.capture_seconds is not None \
            else "(sandbox start time unknown)"
        self._set(st, CAPTURED, "", "Normal", "CaptureReady",
                  f"eBPF capture ready ({self.mode or 'eBPF'} mode): entries written {took}")
        self._follow_init_containers(st)

    def _follow_init_containers(self, st: PodState) -> None:
        """``istio-ebpf.io/init-containers: bypass`` (fixed with the sandbox's capture): list the
        app init containers the pod's status names now (agent/containers.py). Whatever is not
        listed stays captured, so a failure here leaves them captured (fail closed)."""
        if st.state != CAPTURED or st.handle is None or st.config is None or not st.config.init_bypass:
            return
        want = containers.bypass_cgroups(st.pod, st.cgroup_path)
        if want == st.bypass:
            return
        try:
            self.datapath.set_init_bypass(st.handle, want)
        except (KeyError, OSError, KernelError) as exc:
            log.warning("pod %s/%s: init containers stay captured: %s", st.namespace, st.name, exc)
            return
        st.bypass = want

    def _own(self, st: PodState, handle: int, config: PodConfig) -> None:
        previous = self.owners.get(handle)
        if previous is not None and previous != st.uid:
            # The handle (a reused pod IP, a recycled netns) now belongs to this pod; the old
            # owner is forgotten without touching the entry (its late DELETED changes nothing).
            self.states.pop(previous, None)
            log.info("handle %r moved from pod %s to %s", handle, previous, st.uid)
        self.owners[handle] = st.uid
        st.handle, st.config, st.updated = handle, config, time.monotonic()

    def _fail(self, st: PodState, where: PodLocation, error: str, kind: str) -> None:
        self.failures[kind] = self.failures.get(kind, 0) + 1
        if st.deny is None:
            try:
                st.deny = self.datapath.deny_pod(where.netns_path, where.cgroup_path)
            except (OSError, KernelError) as exc:
                log.warning("cannot refuse the connections of pod %s/%s: %s", st.namespace, st.name, exc)
                error = f"{error}; refusing its connections failed too: {exc}"
        st.retry_delay = min(max(st.retry_delay * 2, self.retry_initial), self.retry_max)
        st.retry_at = time.monotonic() + st.retry_delay
        if st.state != FAILED or st.failure != kind:
            log.warning("pod %s/%s cannot be captured (%s): refusing its connections, retry in %.1f s",
                        st.namespace, st.name, error, st.retry_delay)
            self._set(st, FAILED, error, "Warning", "CaptureFailed",
                      f"{error}; its connections are refused until it is captured (retrying with backoff)")
        st.error, st.failure = error, kind

    def _end_sandbox(self, st: PodState) -> None:
        """The sandbox is gone (or replaced): its entries and its deny go with it."""
        if st.handle is not None and self.owners.get(st.handle) == st.uid:
            del self.owners[st.handle]
            self.datapath.remove_pod(st.handle)
        if st.deny is not None:
            self.datapath.allow_pod(st.deny)
        st.handle = st.deny = st.config = st.netns_inode = st.bypass = None
        st.netns_path = st.cgroup_path = st.notice = st.failure = ""
        st.retry_delay = 0.0
        st.state = PENDING

    # ------------------------------------------------------------------ helpers
    def _set(self, st: PodState, state: str, error: str, etype: str = "", reason: str = "",
             message: str = "") -> None:
        if st.state != state:
            st.since = time.time()
        st.state, st.error = state, error
        if reason:
            self.report(st.pod, etype, reason, message)

    def _notice(self, st: PodState, etype: str, reason: str, message: str) -> None:
        if st.notice != message:
            st.notice = message
            self.report(st.pod, etype, reason, message)

