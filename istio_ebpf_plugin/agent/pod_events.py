"""Events on Pods (``CaptureReady``, ``CaptureFailed``, ...), sent from their own thread.

The reconciler decides them on the agent loop; posting them is an API round trip each, and
a first start with hundreds of pods must not wait for hundreds of round trips before it
captures the next pod. So they go through a bounded queue to one sender thread. When the
queue is full (the API is down for long) new Events are dropped and counted, never
blocking capture. A 403 (Events not allowed by RBAC) mutes pod Events for ``mute_seconds``
instead of failing every post.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from typing import Any, Iterator, Mapping

from .. import kube_api
from ..errors import IstioEbpfError

log = logging.getLogger(__name__)


class PodEvents:
    def __init__(self, maxsize: int = 1000, mute_seconds: float = 300.0) -> None:
        self._queue: "queue.Queue[tuple[Mapping[str, Any], str, str, str] | None]" = queue.Queue(maxsize)
        self.mute_seconds = mute_seconds
        self._muted_until = 0.0
        self.sent = 0
        self.dropped = 0
        self._open = threading.Event()
        self._open.set()
        self._thread = threading.Thread(target=self._run, name="pod-events", daemon=True)
        self._thread.start()

    def post(self, pod: Mapping[str, Any], etype: str, reason: str, message: str) -> None:
        """Queue one Event about ``pod`` (never blocks)."""
        try:
            self._queue.put_nowait((pod, etype, reason, message))
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 100 == 0:
                log.warning("pod Event queue full: %d Events dropped (is the API reachable?)", self.dropped)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Nothing is sent inside the block (a full resync): the sender's API round trips took the
        interpreter from the resync, and 500 CaptureReady Events made a first start 3.5 s instead of 1."""
        self._open.clear()
        try:
            yield
        finally:
            self._open.set()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued Event was handled (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._queue.unfinished_tasks

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(5)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            self._open.wait()
            try:
                if item is None:
                    return
                self._send(*item)
            finally:
                self._queue.task_done()

    def _send(self, pod: Mapping[str, Any], etype: str, reason: str, message: str) -> None:
        if time.monotonic() < self._muted_until:
            return
        meta = pod.get("metadata") or {}
        involved = {"kind": "Pod", "apiVersion": "v1", "name": meta.get("name"),
                    "namespace": meta.get("namespace"), "uid": meta.get("uid")}
        try:
            kube_api.create_event(str(meta.get("namespace", "default")), involved, reason, message, etype)
            self.sent += 1
        except kube_api.Forbidden as exc:
            self._muted_until = time.monotonic() + self.mute_seconds
            log.warning("not allowed to create pod Events (muted for %.0f s): %s", self.mute_seconds, exc)
        except IstioEbpfError as exc:
            log.warning("Event %s for pod %s/%s failed: %s", reason, meta.get("namespace"), meta.get("name"), exc)
