"""One agent per node: a lock held for the agent's whole life.

Two agents on one node would both load a datapath and retarget the same links, each filling only
its own version's maps (a DaemonSet rolled with maxSurge > 0 does exactly that for a moment). The
agent runs in the host network namespace, where an abstract unix socket name is node-wide and
disappears with the process that bound it, also on SIGKILL: no stale lock file, no clean-up.
The name carries the pin root, so agents of separate pin roots (tests) do not exclude each other.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import socket
import time

from ..errors import IstioEbpfError

log = logging.getLogger(__name__)


class NodeLockTimeout(IstioEbpfError):
    """Another agent held the node lock for the whole wait."""


class NodeLock:
    def __init__(self, pin_root: str) -> None:
        digest = hashlib.sha256(pin_root.encode()).hexdigest()[:16]
        self.name = f"\0istio-ebpf-agent-{digest}"
        self.pin_root = pin_root
        self._sock: socket.socket | None = None

    def try_acquire(self) -> bool:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.name)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
        self._sock = sock
        return True

    def acquire(self, timeout: float | None = None, poll: float = 0.1) -> "NodeLock":
        """Wait until no other agent of this pin root runs (the old pod of a rolling update)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        warned = False
        while not self.try_acquire():
            if not warned:
                log.warning("another istio-ebpf agent runs on this node (pin root %s): waiting for it to exit",
                            self.pin_root)
                warned = True
            if deadline is not None and time.monotonic() >= deadline:
                raise NodeLockTimeout(f"another istio-ebpf agent kept the node lock for {timeout:.0f}s")
            time.sleep(poll)
        if warned:
            log.info("the other agent exited: node lock taken")
        return self

    def release(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    @property
    def held(self) -> bool:
        return self._sock is not None
