"""Network-namespace helpers: cookie, inode, and running code inside one."""

from __future__ import annotations

import ctypes
import os
import socket
import threading
from typing import Callable, TypeVar

from ..errors import KernelError

CLONE_NEWNET = 0x40000000
SO_NETNS_COOKIE = 71        # Linux 5.14
T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(netns_path: str, fn: Callable[[], T]) -> T:
    """Run fn in a thread that has joined the namespace (setns is per thread)."""
    result: dict[str, object] = {}

    def worker() -> None:
        try:
            fd = os.open(netns_path, os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {netns_path}: {os.strerror(err)}")
            finally:
                os.close(fd)
            result["value"] = fn()
        except BaseException as exc:  # re-raised in the caller
            result["error"] = exc

    t = threading.Thread(target=worker, name="netns")
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["value"]  # type: ignore[return-value]


def netns_cookie(netns_path: str) -> int:
    """The kernel's cookie of a network namespace (what bpf_get_netns_cookie returns)."""

    def read() -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                raw = s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
            except OSError as exc:
                raise KernelError(f"SO_NETNS_COOKIE unsupported (kernel < 5.14): {exc}") from exc
            return int.from_bytes(raw, "little")

    return in_netns(netns_path, read)


def netns_inode(netns_path: str) -> int:
    return os.stat(netns_path).st_ino
