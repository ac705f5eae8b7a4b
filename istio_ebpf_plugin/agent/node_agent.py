"""The node agent: mode selection, publishing, datapath, pod following, health.

Start-up order is what makes restarts and upgrades lossless (docs/agent.md, "Upgrades"):

1. the node lock (one agent per node, also when a rollout surges a second pod);
2. the datapath is loaded: a restart adopts the pins of its own version, an upgrade loads its
   programs and config maps beside the running version (which keeps capturing all along);
3. the first complete pod list is reconciled into this version's config maps (entries of pods
   that vanished while no agent ran are removed);
4. only then does this version take over every hook (``Datapath.take_over``: one atomic
   ``BPF_LINK_UPDATE`` per link) and retire the other versions; the agent is then ready.

A SIGTERM leaves everything pinned; only ``--cleanup`` unpins.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import yaml

from .. import (DRAINING_ANNOTATION, HEARTBEAT_ANNOTATION, INJECTION_TEMPLATE, MODE_REASON_ANNOTATION,
                NODE_MODE_LABEL, kube_api)
from ..datapath import failpoint
from ..datapath.host import DEFAULT_PIN_ROOT
from ..errors import IstioEbpfError
from .health_server import HealthServer
from . import explain_route, pod_view
from .locate import PodLocation, PodLocator, boot_seconds, mount_of, process_started
from .metrics import AgentMetrics
from .mode import ModeDecision, decide
from .pod_events import PodEvents
from .node_lock import NodeLock
from .reconcile import DatapathLike, Reconciler
from .watch import PodWatcher

log = logging.getLogger(__name__)

REASON_ANNOTATION = MODE_REASON_ANNOTATION
PROBES_ANNOTATION = "istio-ebpf.io/probes"


@dataclass
class AgentConfig:
    node_name: str
    mode_override: str | None = None
    pin_root: str = DEFAULT_PIN_ROOT
    cgroup_root: str = "/sys/fs/cgroup"      # where the programs attach (the kubepods parent)
    unsupported_reason: str | None = None    # known before any probe (no cgroup v2): publish unsupported
    proc_root: str = "/proc"
    host: str = "0.0.0.0"
    port: int = 15099
    resync_seconds: float = 300.0
    label_check_seconds: float = 60.0       # re-assert the published node label (someone may overwrite it)
                                            # and renew the heartbeat annotation that `status` checks
    watch_timeout: int = 240                 # server-side watch timeout; a new watch starts after it
    retry_seconds: float = 0.25              # pending pods (no sandbox yet) are retried this often
    failure_backoff: float = 1.0             # a pod that cannot be programmed: first retry after this,
    failure_backoff_max: float = 60.0        # doubling up to this
    sockmap: bool = False
    kernel_release: str | None = None        # tests: pretend to be another kernel
    features: dict[str, bool] | None = None  # tests: forced probe results
    cgroup_for_uid: Callable[[str], str | None] | None = None
    locator: Any = None                      # tests: a ready PodLocator-like object
    event_namespace: str = "default"         # Events about the Node live here
    listener_refresh_seconds: float = 5.0    # pod-IP mode: re-find Envoy's 15006 sockets this often
    # pod-IP mode: a captured pod whose Envoy does not listen on 15006 yet (the pod is added when its
    # sandbox is up, Envoy starts after the init containers) is looked at this often: until then its
    # inbound connections are refused (fail closed), and the pod may turn Ready any moment.
    listener_pending_seconds: float = 0.2
    listener_pending_window: float = 120.0   # ... for this long after it is captured (then every refresh)
    publish_backoff: float = 1.0             # first retry of a failed node publish; doubles up to 5 min
    # /readyz fails when the pod watch got no answer this long. A quiet healthy watch hears from the
    # server at least every watch_timeout (the server ends the stream), so this must exceed it.
    watch_stale_seconds: float = 300.0
    #: sockmap start-up self-test (mode -> (ok, reason)); None = the real one
    sockmap_self_test: Callable[[str], tuple[bool, str]] | None = None
    #: how long to wait for another agent of this node to exit (None: as long as it takes)
    lock_timeout: float | None = None
    #: the agent pods' namespace ($POD_NAMESPACE): an agent pod of this node there carrying
    #: DRAINING_ANNOTATION means ``istio-ebpf uninstall`` drains (None: never draining)
    agent_namespace: str | None = None
    #: read the istio-sidecar-injector ConfigMaps this often: one that lost the ebpf template (a
    #: ``helm upgrade`` of istiod without the post-renderer, an operator) gets a Warning Event on the Node
    injector_check_seconds: float = 60.0


def heartbeat(mode: str, period: float, at: float | None = None) -> str:
    """The value of HEARTBEAT_ANNOTATION: when (``at``, default now), the mode this agent decided, and
    how many seconds until it renews it (``install/plan.heartbeat_age`` reads it)."""
    when = datetime.datetime.fromtimestamp(time.time() if at is None else at, datetime.timezone.utc)
    return json.dumps({"time": when.strftime("%Y-%m-%dT%H:%M:%SZ"), "mode": mode, "period": period},
                      sort_keys=True)


def _default_datapath(mode: str, pin_root: str, sockmap: bool) -> DatapathLike:
    from ..datapath.loader import Datapath

    return Datapath(mode=mode, sockmap=sockmap, pin_root=pin_root)


class NodeAgent:
    def __init__(self, config: AgentConfig,
                 datapath_factory: Callable[[str, str, bool], DatapathLike] = _default_datapath) -> None:
        self.config = config
        self.datapath_factory = datapath_factory
        self.metrics = AgentMetrics()
        self.events: "queue.Queue[tuple[str, Any]]" = queue.Queue()
        self.decision: ModeDecision | None = None
        self.datapath: DatapathLike | None = None
        self.reconciler: Reconciler | None = None
        self.watcher: PodWatcher | None = None
        self.server: HealthServer | None = None
        self.attached = False
        self.synced = False
        self.published = False              # node label/annotations written
        self.event_sent = False             # the mode Event (best effort: never blocks readiness)
        self.node_uid: str | None = None
        self._publish_delay = config.publish_backoff
        self._next_publish = 0.0
        self.heartbeat = time.monotonic()
        self.started_boot = boot_seconds()    # sandboxes older than the agent: no capture latency of ours
        self._view_dirty = False
        self._last_retry = 0.0
        self._last_metrics = 0.0
        self._last_listener_refresh = 0.0
        self._last_pending_refresh = 0.0
        self._listening: set[int] = set()     # pod-IP mode: handles whose 15006 listener is registered
        self._pending_since: dict[int, float] = {}   # pod-IP mode: handle -> first seen without one
        self.pod_events: PodEvents | None = None
        self.lock = NodeLock(config.pin_root)
        #: start-up phases in seconds from start(): lock, loaded, filled, took_over, retired
        self.switch: dict[str, float] = {}
        #: time.monotonic() when start() began (the switch phases count from it)
        self.started_at = 0.0
        self.view: pod_view.PodView | None = None   # what /pods and the per-pod metrics show
        self._pod_counters: Mapping[Any, Mapping[str, int]] = {}
        self.metrics.registry.register(pod_view.PodCollector(lambda: self.view))
        self._drain_marks: set[str] = set()   # uids of this node's agent pods carrying DRAINING_ANNOTATION
        self._last_injector_check = 0.0
        self._last_label_check = time.monotonic()
        self.injectors_without_template: set[str] = set()   # "ns/name" of injector ConfigMaps (last check)
        # "ns/name" -> (resourceVersion, has the template): a config of some 100 KiB is parsed again
        # only when it changed, not by every agent every minute.
        self._injector_seen: dict[str, tuple[str, bool]] = {}
        self._injectors_missing_once: set[str] = set()       # missing at the last check

    @property
    def draining(self) -> bool:
        """True while ``istio-ebpf uninstall`` drains this node (install/drain.py): it marks the agent
        pods with DRAINING_ANNOTATION, which this agent sees on its own pod through its pod watch.
        Capture goes on unchanged; captured pods show ``draining`` in ``istio-ebpf pods``."""
        return bool(self._drain_marks)

    def _note_drain(self, etype: str, pod: Any) -> None:
        """Follow the draining mark of the agent pods of this node (every pod event passes here)."""
        meta = pod.get("metadata") if isinstance(pod, Mapping) else None
        if not isinstance(meta, Mapping) or meta.get("namespace") != self.config.agent_namespace:
            return
        uid = str(meta.get("uid") or meta.get("name") or "")
        annotations = meta.get("annotations")
        marked = etype != "DELETED" and isinstance(annotations, Mapping) and DRAINING_ANNOTATION in annotations
        was = self.draining
        if marked:
            self._drain_marks.add(uid)
        else:
            self._drain_marks.discard(uid)
        if self.draining != was:
            log.info("%s", "draining: 'istio-ebpf uninstall' waits for the captured pods to be restarted; "
                     "capture goes on" if self.draining else "no longer draining")

    # ------------------------------------------------------------------ health
    def healthy(self) -> tuple[bool, str]:
        stale = time.monotonic() - self.heartbeat
        if stale >= 30:
            return False, f"loop heartbeat {stale:.1f}s ago"
        if self.watcher is not None:
            ok, why = self.watcher.health(float("inf"))   # liveness: only a dead thread is fatal
            if not ok:
                return False, why
        return True, f"loop heartbeat {stale:.1f}s ago"

    def ready(self) -> tuple[bool, str]:
        d = self.decision
        if d is None:
            return False, "selecting mode"
        if d.mode == "unsupported":
            # Nothing to attach: the node label keeps opted-in pods away, which is the job done.
            return self.published, f"unsupported: {d.reason}"
        if not self.attached:
            return False, "programs not attached"
        if not self.synced:
            return False, "map state not reconciled with the pod list yet"
        if self.watcher is not None:
            ok, why = self.watcher.health(self.config.watch_stale_seconds)
            if not ok:
                return False, why
        return True, f"{d.mode}: attached, {len(self.reconciler.records) if self.reconciler else 0} pods"

    # ------------------------------------------------------------------ start
    def start(self, serve: bool = True) -> None:
        cfg = self.config
        self.started_at = time.monotonic()
        started = process_started(os.getpid())
        if started is not None:
            # interpreter start and imports: part of "from the agent's start" on a node
            self.switch["exec"] = round(max(0.0, boot_seconds() - started), 3)
        self.lock.acquire(cfg.lock_timeout)
        self._mark("lock")
        if serve and self.server is None:
            self.server = HealthServer(cfg.host, cfg.port, self.healthy, self.ready,
                                       self.metrics.registry,
                                       {"/pods": self._pods_route, "/explain": self._explain_route}).start()
        d, sockmap = self._select_mode()
        if d.mode == "unsupported":
            if cfg.features is None:
                from ..datapath import probe_cache

                probe_cache.discard(cfg.pin_root)    # nothing of ours stays on an iptables node
            self._publish()
            return
        self.datapath = dp = self.datapath_factory(d.mode, cfg.pin_root, sockmap)
        dp.load()     # adopts the pins of a previous agent of the same version; never attaches
        self._mark("loaded")
        failpoint.reached("loaded")
        if not dp.other_versions():
            # A fresh node, or a restart of this version (its programs run every hook already):
            # nothing to take over from, capture is up now, pods follow as the list arrives.
            self._take_over()
        # Otherwise (upgrade, rollback, an interrupted switch) the hooks are taken over once the
        # first pod list is in this version's maps (_dispatch -> _take_over).
        # Pod cgroup paths in /proc are relative to the v2 mount (on hybrid hosts that is
        # /sys/fs/cgroup/unified, not /sys/fs/cgroup): pod-IP mode keys pods by that directory.
        locator = cfg.locator or PodLocator(cfg.proc_root, mount_of(cfg.cgroup_root),
                                            cgroup_for_uid=cfg.cgroup_for_uid, search_root=cfg.cgroup_root)
        self.pod_events = PodEvents()
        self.reconciler = Reconciler(dp, locator, self._report_pod, mode=d.mode,
                                     captured=self._pod_captured,
                                     retry_initial=cfg.failure_backoff, retry_max=cfg.failure_backoff_max)
        self.watcher = PodWatcher(cfg.node_name, self.events, resync_seconds=cfg.resync_seconds,
                                  watch_timeout=cfg.watch_timeout,
                                  on_relist=lambda reason: self.metrics.relists.labels(reason=reason).inc())
        self.watcher.start()

    def _select_mode(self) -> tuple[ModeDecision, bool]:
        """The node's mode (probe verdicts cached in the pin root) and whether sockmap is on."""
        cfg = self.config
        if cfg.unsupported_reason:
            # Nothing can attach here: publish unsupported with the reason and stay up (not capturing)
            # so the label is kept, instead of exiting before any label is written.
            release = cfg.kernel_release or os.uname().release
            self.decision = d = ModeDecision("unsupported", cfg.unsupported_reason, release, "unsupported")
            log.warning("mode unsupported: %s", d.reason)
            self._record_decision(d)
            return d, False
        features = cfg.features
        if features is None:
            # Verdicts cached in the pin root: a restart does not compile the probes again.
            from ..datapath import probe_cache

            features, cached = probe_cache.probe_features(cfg.pin_root)
            log.info("feature probes: %s", "cached in the pin root" if cached else "compiled, now cached")
        self.decision = d = decide(release=cfg.kernel_release, override=cfg.mode_override,
                                   features=features)
        log.info("mode %s: %s", d.mode, d.reason)
        self._record_decision(d)
        if d.mode == "unsupported":
            return d, False
        sockmap = cfg.sockmap and d.sockmap
        if cfg.sockmap and not d.sockmap:
            log.warning("sockmap acceleration requested but its probes failed: staying off")
        if sockmap:
            # Kernels broke sockmap before (FIONREAD, stalls, splice): real transfers first.
            from ..datapath.selftest.sockmap_check import self_test

            ok, why = (cfg.sockmap_self_test or self_test)(d.mode)
            log.log(logging.INFO if ok else logging.WARNING, "%s", why)
            if not ok:
                sockmap = False
                self.metrics.fallback.labels(reason=why[:200]).set(1)
        return d, sockmap

    def prepare(self) -> dict[str, Any]:
        """``istio-ebpf agent --prepare`` (the DaemonSet's init container): compile and pin this
        version's programs and config maps beside the running version, attach nothing, exit.

        The compile is most of an upgrade's time; done here, while the pinned old version still
        captures every hook, the agent that follows adopts the complete pins and goes from its
        start to the old version's retirement without compiling (docs/agent.md, "Upgrades").
        The node lock keeps it apart from a running agent's own load."""
        t0 = time.monotonic()
        self.lock.acquire(self.config.lock_timeout)
        try:
            d, sockmap = self._select_mode()
            if d.mode == "unsupported":
                return {"mode": d.mode, "version": None, "compiled": False,
                        "seconds": round(time.monotonic() - t0, 3)}
            dp = self.datapath_factory(d.mode, self.config.pin_root, sockmap)
            dp.load()
            out = {"mode": d.mode, "version": dp.version,
                   "compiled": not dp.adopted, "seconds": round(time.monotonic() - t0, 3)}
            dp.close(cleanup=False)      # the pins stay for the agent; nothing was attached
            return out
        finally:
            self.lock.release()

    def _mark(self, phase: str) -> None:
        self.switch[phase] = round(time.monotonic() - self.started_at, 4)

    def _take_over(self) -> None:
        """Every opted-in pod of the first list is in this version's maps: now the hooks."""
        dp = self.datapath
        assert dp is not None
        self._mark("filled")
        failpoint.reached("filled")
        out = dp.take_over(self.config.cgroup_root)
        self._mark("took_over")
        retired = dp.retire_other_versions()
        self._mark("retired")
        self.attached = True
        log.info("capture runs on this version (%s, %s); retired %s; start-up phases (s from start(), "
                 "exec: from the process start to start()): %s", dp.version,
                 out, ", ".join(retired) or "nothing", json.dumps(self.switch))
        # Published once capture is up: talking to the API (and importing its client) takes about
        # a second, which should not delay the takeover.
        self._publish()

    def _record_decision(self, d: ModeDecision) -> None:
        self.metrics.mode.labels(mode=d.mode, kernel_release=d.kernel_release).set(1)
        for feature, ok in d.features.items():
            self.metrics.probe.labels(feature=feature).set(1 if ok else 0)
        if d.mode != d.version_mode:
            self.metrics.fallback.labels(reason=d.reason).set(1)

    def _publish(self) -> None:
        """Node label + annotations, then one Event. Failures retry with exponential backoff.

        The Event is best effort: when Events are forbidden (RBAC) the label still counts as
        published and the Event is not retried at all; other failures retry on the same backoff.
        """
        d = self.decision
        assert d is not None
        now = time.monotonic()
        if now < self._next_publish:
            return
        try:
            if not self.published:
                node = self._write_node_metadata()
                self.published = True
                self.node_uid = ((node or {}).get("metadata") or {}).get("uid") or self.node_uid
            if not self.event_sent:
                involved = {"kind": "Node", "name": self.config.node_name, "apiVersion": "v1"}
                if self.node_uid:
                    involved["uid"] = self.node_uid
                try:
                    kube_api.create_event(self.config.event_namespace, involved,
                                          "CaptureMode" if d.mode != "unsupported" else "CaptureUnsupported",
                                          f"eBPF capture mode {d.mode}: {d.reason}",
                                          "Normal" if d.mode == d.version_mode else "Warning")
                except kube_api.Forbidden as exc:
                    log.warning("not allowed to create Events; the node label is published, no Event: %s", exc)
                self.event_sent = True
            self._publish_delay = self.config.publish_backoff
        except IstioEbpfError as exc:
            self._next_publish = now + self._publish_delay
            log.warning("publishing the node mode failed (retry in %.0fs): %s", self._publish_delay, exc)
            self._publish_delay = min(self._publish_delay * 2, 300.0)

    def _write_node_metadata(self) -> Any:
        """The label, its annotations and a new heartbeat, as one merge patch (no read of the Node)."""
        d = self.decision
        assert d is not None
        return kube_api.patch_node_metadata(
            self.config.node_name, {NODE_MODE_LABEL: d.mode},
            {REASON_ANNOTATION: d.reason, PROBES_ANNOTATION: json.dumps(d.features, sort_keys=True),
             HEARTBEAT_ANNOTATION: heartbeat(d.mode, self.config.label_check_seconds)})

    def _reassert_label(self) -> None:
        """Correct a node label someone else (an installer, an operator) changed: the agent's probes win.
        The same patch renews the heartbeat that tells `istio-ebpf status` this agent is alive."""
        if self.decision is None:
            return
        try:
            node = self._write_node_metadata()
        except Exception as exc:  # retried on the next check
            log.warning("re-asserting the node label failed (retry in %.0fs): %s",
                        self.config.label_check_seconds, exc)
            return
        self.node_uid = ((node or {}).get("metadata") or {}).get("uid") or self.node_uid

    def check_injectors(self) -> None:
        """A Warning Event on this Node for each injector ConfigMap that lost the ebpf template since
        the last check (once per loss): pods here that name it in inject.istio.io/templates are then
        refused by Istio's injector. Not while uninstall drains (it removed the template itself)."""
        if self.draining:
            self.injectors_without_template, self._injectors_missing_once = set(), set()
            return
        try:
            cms = kube_api.list_injector_configmaps()
        except IstioEbpfError as exc:
            log.warning("reading the injector ConfigMaps failed: %s", exc)
            return
        missing, seen = set(), {}
        for cm in cms:
            meta = cm.get("metadata") or {}
            where, version = f"{meta.get('namespace')}/{meta.get('name')}", str(meta.get("resourceVersion", ""))
            cached = self._injector_seen.get(where)
            has = cached[1] if cached is not None and version and cached[0] == version \
                else _has_injection_template((cm.get("data") or {}).get("config"))
            seen[where] = (version, has)
            if not has:
                missing.add(where)
        self._injector_seen = seen
        # A loss counts once seen by two checks in a row: uninstall reverts the ConfigMaps a moment
        # before it marks the agents draining, and that revert is no drift.
        confirmed, self._injectors_missing_once = missing & self._injectors_missing_once, missing
        new, self.injectors_without_template = confirmed - self.injectors_without_template, confirmed
        for where in sorted(new):
            log.warning("injector ConfigMap %s has no %s template", where, INJECTION_TEMPLATE)
            involved = {"kind": "Node", "name": self.config.node_name, "apiVersion": "v1"}
            if self.node_uid:
                involved["uid"] = self.node_uid
            try:
                kube_api.create_event(
                    self.config.event_namespace, involved, "InjectorTemplateMissing",
                    f"ConfigMap {where} has no '{INJECTION_TEMPLATE}' template (istiod upgraded or reconciled "
                    "without the istio-ebpf post-renderer?): Istio's injector refuses new pods that name it "
                    "in inject.istio.io/templates; run 'istio-ebpf install' (docs/install.md, Helm)", "Warning")
            except IstioEbpfError as exc:
                log.warning("the InjectorTemplateMissing Event was not created: %s", exc)

    def _report_pod(self, pod: Mapping[str, Any], etype: str, reason: str, message: str) -> None:
        if reason == "InvalidTrafficAnnotation" or "invalid traffic annotation" in message:
            self.metrics.config_errors.inc()
        self._view_dirty = True
        if self.pod_events is not None:
            self.pod_events.post(pod, etype, reason, message)

    def _pods_route(self, query: Mapping[str, list[str]]) -> tuple[int, Any]:
        """``GET /pods``: the node's opted-in pods (``istio-ebpf pods`` reads it)."""
        view = self.view
        if view is None:
            why = self.decision.reason if self.decision is not None and self.decision.mode == "unsupported" \
                else "the agent has not reconciled the node's pods yet"
            return 503, {"error": why}
        return 200, view.as_json()

    def _explain_route(self, query: Mapping[str, list[str]]) -> tuple[int, Any]:
        """``GET /explain``: how the kernel decides one connection of one pod (``istio-ebpf explain``)."""
        d, rec = self.decision, self.reconciler
        unsupported = d.reason if d is not None and d.mode == "unsupported" else None

        def pids(target: pod_view.PodTarget) -> Iterator[int]:
            if rec is None:
                return iter(())
            where = PodLocation(target.cgroup_path, target.netns_path, 0, target.netns_inode or 0)
            return (p for p in rec.locator.pod_pids(where) if p)

        return explain_route.answer(query, self.view, self.datapath, unsupported, pids, self.config.proc_root)

    def refresh_view(self) -> None:
        """Rebuild what /pods and the per-pod metrics show (agent loop only)."""
        rec, d = self.reconciler, self.decision
        if rec is None or d is None:
            return
        self.view = pod_view.build(self.config.node_name, d.mode, self.draining, rec, self._pod_counters,
                                   self._listening if d.mode == "podip" else None)
        self._view_dirty = False

    def _pod_captured(self, pod: Mapping[str, Any], where: PodLocation) -> float | None:
        """Sandbox start -> entries written (for the pod's CaptureReady Event; into the histogram
        for pods this agent saw start, not those whose sandbox predates it)."""
        t0 = self.reconciler.locator.sandbox_started(where) if self.reconciler else None
        if t0 is None:
            return None
        age = max(0.0, boot_seconds() - t0)
        if t0 >= self.started_boot:
            self.metrics.capture_latency.observe(age)
        return age

    # ------------------------------------------------------------------ loop
    def step(self, timeout: float = 0.2) -> None:
        """Drain the event queue once; retries, metrics and publishing on their own cadence."""
        self.heartbeat = time.monotonic()
        capturing = self.attached or (self.decision is not None and self.decision.mode == "unsupported")
        if capturing and not (self.published and self.event_sent):
            self._publish()
        if self.published and time.monotonic() - self._last_label_check >= self.config.label_check_seconds:
            self._last_label_check = time.monotonic()
            self._reassert_label()
        if self.published and time.monotonic() - self._last_injector_check >= self.config.injector_check_seconds:
            self._last_injector_check = time.monotonic()
            self.check_injectors()
        if self.reconciler is None:
            time.sleep(timeout)
            return
        try:
            item = self.events.get(timeout=timeout)
        except queue.Empty:
            item = None
        while item is not None:
            self._dispatch(*item)
            try:
                item = self.events.get_nowait()
            except queue.Empty:
                item = None
        now = time.monotonic()
        if now - self._last_retry >= self.config.retry_seconds:
            self._last_retry = now
            if self.reconciler.retry_pending(now):
                self._view_dirty = True
        if now - self._last_metrics >= 2.0:
            self._last_metrics = now
            self.update_metrics()
        elif self._view_dirty and self.synced:
            self.refresh_view()
        if self.decision is not None and self.decision.mode == "podip":
            if now - self._last_listener_refresh >= self.config.listener_refresh_seconds:
                self._last_listener_refresh = self._last_pending_refresh = now
                self.refresh_listeners()
            elif now - self._last_pending_refresh >= self.config.listener_pending_seconds:
                self._last_pending_refresh = now
                self.refresh_listeners(pending_only=True)

    def refresh_listeners(self, pending_only: bool = False) -> None:
        """Pod-IP mode: no netns cookie in sockops before 5.15, so Envoy's 15006 socket is found from
        userspace: every pod each ``listener_refresh_seconds`` (a restarted Envoy's new socket), and the
        pods with none registered yet each ``listener_pending_seconds`` (a new pod's Envoy starting).
        A pod's recorded /proc/<pid>/ns/net dies with that process: it is looked up again, and
        whatever fails here only waits for the next turn."""
        rec, dp = self.reconciler, self.datapath
        if dp is None or rec is None:
            return
        paths = {}
        now = time.monotonic()
        for st in rec.records.values():
            # A pod whose Envoy never listens (crash-looping) costs a /proc pass per look: not for long.
            if pending_only and (st.handle is None or st.handle in self._listening or
                                 now - self._pending_since.setdefault(st.handle, now)
                                 > self.config.listener_pending_window):
                continue
            if st.netns_path and not os.path.exists(st.netns_path):
                where = rec.locator.locate(st.uid)
                if where is None or where.netns_inode != st.netns_inode:
                    continue     # sandbox gone (or replaced): the pod's next event handles it
                st.netns_path = where.netns_path
            if st.netns_path and st.handle is not None:
                paths[st.handle] = st.netns_path
        if pending_only and not paths:
            return
        try:
            written = dp.refresh_listeners(paths)
            before = set(self._listening)
            if not pending_only:
                self._listening.clear()    # a handle gone or a listener closed is pending again
                # a pod found listening starts a new window when its Envoy restarts
                self._pending_since = {h: t for h, t in self._pending_since.items() if written.get(h) == 0}
            self._listening.update(h for h, n in written.items() if n)
            if self._listening != before:
                self._view_dirty = True    # /pods shows inbound_listener at once
        except Exception as exc:  # noqa: BLE001 - a refresh must never take the agent down
            log.warning("re-registering Envoy's inbound listeners failed (next try in %.0f s): %s",
                        self.config.listener_refresh_seconds, exc)

    def _dispatch(self, etype: str, obj: Any) -> None:
        rec = self.reconciler
        assert rec is not None
        self._view_dirty = True
        if self.config.agent_namespace:
            if etype == "RESYNC":
                marks = self._drain_marks
                self._drain_marks = set()
                for pod in obj:
                    self._note_drain("ADDED", pod)
                if marks and not self._drain_marks:
                    log.info("no longer draining")
            else:
                self._note_drain(etype, obj)
        if etype == "RESYNC":
            start = time.monotonic()
            with self.pod_events.held() if self.pod_events is not None else contextlib.nullcontext():
                rec.resync(obj)
            self.metrics.reconcile_seconds.observe(time.monotonic() - start)
            self.synced = True
            if not self.attached:
                self._take_over()
            self.update_metrics()
        elif etype in ("ADDED", "MODIFIED"):
            rec.apply(obj)
        elif etype == "DELETED":
            rec.remove(str((obj.get("metadata") or {}).get("uid") or ""))

    def update_metrics(self) -> None:
        rec, dp = self.reconciler, self.datapath
        if rec is None or dp is None:
            return
        self.metrics.pods_managed.set(len(rec.records))
        self.metrics.pods_pending.set(len(rec.pending))
        self.metrics.pods_failed.set(len(rec.failed))
        self.metrics.stale_removed.set(rec.stale_removed)
        try:
            for name, n in dp.occupancy().items():
                self.metrics.map_occupancy.labels(map=name).set(n)
            self.metrics.map_entries.set(len(dp.pods()))
            self.metrics.set_counters(dp.counters())
            self._pod_counters = dp.pod_counters()
        except Exception as exc:  # a metrics read must never take the agent down
            log.warning("reading datapath state for metrics failed: %s", exc)
        if self.synced:
            self.refresh_view()

    def run(self, stop: threading.Event) -> None:
        self.start()
        try:
            while not stop.is_set():
                self.step()
        finally:
            self.shutdown(cleanup=False)

    def shutdown(self, cleanup: bool = False) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        if self.pod_events is not None:
            self.pod_events.flush(2.0)
            self.pod_events.stop()
            self.pod_events = None
        if self.datapath is not None:
            self.datapath.close(cleanup=cleanup)
            self.datapath = None
        if self.server is not None:
            self.server.stop()
            self.server = None
        self.lock.release()


def cleanup_node(node_name: str | None, pin_root: str = DEFAULT_PIN_ROOT) -> str:
    """Detach and unpin everything any agent version pinned, and withdraw the node label."""
    from ..datapath.loader import cleanup_pins

    removed = cleanup_pins(pin_root)
    done = f"removed {len(removed)} pinned objects under {pin_root}"
    if node_name:
        try:
            kube_api.patch_node_metadata(node_name, {NODE_MODE_LABEL: None},
                                         {REASON_ANNOTATION: None, PROBES_ANNOTATION: None,
                                          HEARTBEAT_ANNOTATION: None})
        except IstioEbpfError as exc:
            return f"{done}; node label not removed: {exc}"
    return done


def _has_injection_template(config: object) -> bool:
    """Whether an injector ConfigMap's ``data.config`` names the template istio-ebpf installs."""
    try:
        data = yaml.safe_load(config) if isinstance(config, str) else None
    except yaml.YAMLError:
        return False
    templates = data.get("templates") if isinstance(data, dict) else None
    return isinstance(templates, dict) and INJECTION_TEMPLATE in templates
