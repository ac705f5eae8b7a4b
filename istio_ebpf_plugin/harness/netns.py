"""Open sockets inside a pod's network namespace from the test process itself.

A network namespace is per thread: we switch the calling thread into the pod netns,
create the socket (a socket stays in the netns it was created in) and switch back.
Used for Envoy's admin API on the pod's 127.0.0.1:15000 without spawning a process.
"""

from __future__ import annotations

import ctypes
import http.client
import json
import os
import socket
from contextlib import contextmanager
from typing import Iterator

from ..errors import KernelError

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise KernelError(f"setns(CLONE_NEWNET) failed: {os.strerror(err)}")


@contextmanager
def entered(netns_path: str) -> Iterator[None]:
    """Run the body with the calling thread in ``netns_path``; always switches back."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(netns_path, os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


def connect(netns_path: str, host: str, port: int, timeout: float = 5.0) -> socket.socket:
    """A TCP socket created in ``netns_path`` and connected to host:port (in that netns)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with entered(netns_path):
        sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class _NetnsHTTPConnection(http.client.HTTPConnection):
    def __init__(self, netns_path: str, host: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._netns_path = netns_path

    def connect(self) -> None:
        self.sock = connect(self._netns_path, self.host, self.port, self.timeout)  # type: ignore[arg-type]


def http_get(netns_path: str, host: str, port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    """GET http://host:port/path from inside the netns; (status, body)."""
    conn = _NetnsHTTPConnection(netns_path, host, port, timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


def http_post(netns_path: str, host: str, port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    conn = _NetnsHTTPConnection(netns_path, host, port, timeout)
    try:
        conn.request("POST", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


def http_get_json(netns_path: str, host: str, port: int, path: str, timeout: float = 5.0) -> object:
    status, body = http_get(netns_path, host, port, path, timeout)
    if status != 200:
        raise KernelError(f"GET {path}: HTTP {status}: {body[:200]}")
    return json.loads(body)
