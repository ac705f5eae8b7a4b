"""Stopping processes the harness started, by PID (never by name)."""

from __future__ import annotations

import os
import signal
import time


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def stop(pid: int, sig: int = signal.SIGTERM, wait: float = 10.0) -> None:
    """Signal our own process ``pid`` (a child or not); SIGKILL when it outlives ``wait``."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:   # started by an earlier process (make cluster-up): poll instead
            if not alive(pid):
                return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass
