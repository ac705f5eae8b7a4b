"""Follow the pods of one node: list, then watch from the list's resourceVersion.

The standard informer contract, kept small: list with the field selector
``spec.nodeName=<node>`` (a complete snapshot -> ``("RESYNC", items)``), watch
from its resourceVersion with bookmarks (which only move the resourceVersion
forward), relist when the server answers 410 Gone (an ERROR event with code
410 or an HTTP 410 when opening), relist every ``resync_seconds`` anyway, and
back off on other errors. Events go into a queue the agent's loop drains, so
all map writes happen on one thread.

The thread never dies on an error: a stream cut mid-chunk (urllib3 ``ProtocolError``), a
timeout, an unexpected exception all restart the list-then-watch after a backoff. Repeated
410s back off too (a compaction storm must not become a relist storm). :meth:`PodWatcher.health`
says whether the thread is alive and how long ago the API last answered, for ``/readyz``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable

from .. import kube_api
from ..errors import PermanentError, TemporaryError

log = logging.getLogger(__name__)


class PodWatcher:
    def __init__(self, node_name: str, out: "queue.Queue[tuple[str, Any]]", resync_seconds: float = 300.0,
                 watch_timeout: int = 240, backoff: float = 1.0, max_backoff: float = 30.0,
                 on_relist: Callable[[str], None] | None = None) -> None:
        self.node_name = node_name
        self.out = out
        self.resync_seconds = resync_seconds
        self.watch_timeout = watch_timeout
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.on_relist = on_relist or (lambda reason: None)
        self.resource_version = ""
        self.lists = 0
        self.errors = 0
        self.last_error = ""
        self.last_contact = time.monotonic()   # last successful list or watch event
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="pod-watch", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        # A watch stream blocks until its next event or its timeout; the thread is a daemon,
        # so a stream that does not end in time is abandoned with the process.
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def health(self, stale_after: float) -> tuple[bool, str]:
        """(ok, why): the thread runs and the API answered within ``stale_after`` seconds."""
        if self._thread is not None and not self._thread.is_alive() and not self._stop.is_set():
            return False, "pod watch thread died"
        quiet = time.monotonic() - self.last_contact
        if quiet > stale_after:
            return False, f"pod watch: no answer from the API for {quiet:.0f}s ({self.last_error or 'no error'})"
        return True, "pod watch live"

    def run(self) -> None:
        reason = "start"
        delay = self.backoff
        while not self._stop.is_set():
            listed: float | None = None
            try:
                items, self.resource_version = kube_api.list_node_pods(self.node_name)
                listed = self.last_contact = time.monotonic()
                self.lists += 1
                self.on_relist(reason)
                self.out.put(("RESYNC", items))
                del items       # else this frame keeps a whole list alive through the watch and the next list
                reason = self._watch_until_resync()
                delay = self.backoff
                continue
            except kube_api.ResourceGone as exc:
                reason = "gone"
                self._failed(f"{exc}; relisting", logging.INFO)
            except (TemporaryError, PermanentError) as exc:
                # Permanent errors (RBAC) are not fixed by retrying quickly; keep trying slowly.
                reason = "error"
                self._failed(str(exc), logging.WARNING)
            except Exception as exc:  # never let the thread die: a bug here must not stop capture updates
                reason = "error"
                self._failed(f"unexpected {type(exc).__name__}: {exc}", logging.ERROR, exc_info=True)
            if listed is not None and time.monotonic() - listed > 2 * self.max_backoff:
                delay = self.backoff   # the last cycle worked for a while: this is a new failure, not a series
            self._stop.wait(delay)
            delay = min(delay * 2, self.max_backoff)

    def _failed(self, why: str, level: int, exc_info: bool = False) -> None:
        self.errors += 1
        self.last_error = why
        log.log(level, "pod watch: %s", why, exc_info=exc_info)

    def _watch_until_resync(self) -> str:
        deadline = time.monotonic() + self.resync_seconds
        while not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0 and self.out.empty():
                return "resync"
            # Due, but the agent has not taken everything queued yet (a long resync): listing again
            # now would only queue another whole list (with 500 pods and 222 s resyncs, relists
            # every 5 s once held 924 MiB). Keep watching until it has.
            stream = kube_api.watch_node_pods(self.node_name, self.resource_version,
                                              max(1, int(min(self.watch_timeout, left))))
            try:
                for event in stream:
                    self.last_contact = time.monotonic()
                    if self._handle(event) or time.monotonic() >= deadline:
                        break
                else:
                    self.last_contact = time.monotonic()   # the server ended the stream normally
            finally:
                close = getattr(stream, "close", None)
                if close:
                    close()
        return "stop"

    def _handle(self, event: dict) -> bool:
        """Queue one watch event; True when the watch should stop."""
        etype = event.get("type")
        obj = event.get("object") or {}
        if etype == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise kube_api.ResourceGone(f"watch: {obj.get('message', '410 Gone')}")
            raise TemporaryError(f"watch error {code}: {obj.get('message', '')}")
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if rv:
            self.resource_version = str(rv)   # a BOOKMARK only does this
        if etype in ("ADDED", "MODIFIED", "DELETED"):
            self.out.put((etype, obj))
        return self._stop.is_set()
