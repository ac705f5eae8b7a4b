"""Waiting on an event, for tests: poll a condition, never sleep a fixed time and hope.

Deadlines are generous and scaled by ``ISTIO_EBPF_TIMEOUT_SCALE`` (istio_ebpf_plugin.timeouts):
they only bound how long a broken test hangs, they never decide a passing one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, TypeVar

from istio_ebpf_plugin.timeouts import scaled

T = TypeVar("T")


def wait_for(cond: Callable[[], T], timeout: float = 10.0, what: str = "condition", interval: float = 0.01) -> T:
    """cond()'s first true value; the test fails after ``timeout`` seconds (scaled)."""
    limit = scaled(timeout)
    deadline = time.monotonic() + limit
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit:g} s waiting for {what}")
        time.sleep(interval)


def rmdir_cgroup(path: Path, timeout: float = 10.0) -> None:
    """Remove an empty cgroup directory once the kernel reports it unpopulated (its last
    process has exited, not only been signalled: rmdir fails with EBUSY until then)."""
    def empty() -> bool:
        try:
            return "populated 0" in (path / "cgroup.events").read_text().splitlines()
        except FileNotFoundError:
            return True
    wait_for(empty, timeout, f"cgroup {path} to empty")
    try:
        path.rmdir()
    except FileNotFoundError:
        pass
