"""Network-namespace helpers: cookie, inode, running code inside one, HTTP to a server inside one."""

from __future__ import annotations

import ctypes
import http.client
import ipaddress
import json
import os
import socket
import struct
import threading
from typing import Any, Callable, Iterator, TypeVar

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


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns {what}: {os.strerror(err)}")


def socket_in(netns_path: str, family: int, kind: int, proto: int = 0) -> socket.socket:
    """A socket made in another network namespace (a socket stays in the one it was made in).

    Made in the calling thread, which joins the namespace for one socket() and returns at once:
    a thread per socket (what :func:`in_netns` does) cost 1-2 ms under load, and a full resync of
    500 pods spent a second starting threads.
    """
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(netns_path, os.O_RDONLY)
        try:
            _setns(target, netns_path)
            try:
                return socket.socket(family, kind, proto)
            finally:
                _return_home(home)
        finally:
            os.close(target)
    finally:
        os.close(home)


def netns_cookie(netns_path: str) -> int:
    """The kernel's cookie of a network namespace (what bpf_get_netns_cookie returns)."""
    with socket_in(netns_path, socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            raw = s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
        except OSError as exc:
            raise KernelError(f"SO_NETNS_COOKIE unsupported (kernel < 5.14): {exc}") from exc
    return int.from_bytes(raw, "little")


def _return_home(home: int) -> None:
    """Back to the thread's own namespace; a thread left in a pod's would open its sockets there."""
    try:
        _setns(home, "back to the agent's own network namespace")
    except OSError as exc:      # cannot happen with the fd held open; never carry on if it does
        os.write(2, f"istio-ebpf: fatal: {exc}\n".encode())
        os._exit(70)


# netlink (linux/netlink.h), rtnetlink (linux/rtnetlink.h, linux/if_addr.h)
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
_NLMSG = struct.Struct("=IHHII")             # struct nlmsghdr
_NETLINK_ROUTE, _RTM_GETADDR, _RTM_NEWADDR = 0, 22, 20
_IFA_ADDRESS, _IFA_LOCAL = 1, 2
_RT_SCOPE_UNIVERSE = 0
_LOOPBACK_IFINDEX = 1        # a network namespace's lo is always its first device
_IFADDRMSG = struct.Struct("=BBBBI")         # struct ifaddrmsg
_RTATTR = struct.Struct("=HH")


def netlink_dump(sock: socket.socket, msg_type: int, request: bytes, seq: int = 1) -> Iterator[tuple[int, bytes]]:
    """Send one dump request; yield (type, payload) of every answer up to NLMSG_DONE (an error raises)."""
    sock.send(_NLMSG.pack(_NLMSG.size + len(request), msg_type, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + request)
    while True:
        data = sock.recv(65536)
        off = 0
        while off + _NLMSG.size <= len(data):
            length, mtype, _flags, _seq, _pid = _NLMSG.unpack_from(data, off)
            if mtype == NLMSG_DONE or length < _NLMSG.size:
                return
            payload = data[off + _NLMSG.size:off + length]
            if mtype == NLMSG_ERROR:
                err = -struct.unpack_from("=i", payload)[0]
                raise OSError(err, f"netlink dump {msg_type}: {os.strerror(err)}")
            yield mtype, payload
            off += (length + 3) & ~3


def addresses(netns_path: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
    """The global addresses of a network namespace's interfaces (lo aside): IPv4 first, then IPv6.

    What its CNI plugin assigned, readable as soon as the sandbox runs; the Pod object shows the
    same addresses only after kubelet's next status update.
    """
    found: dict[int, list] = {socket.AF_INET: [], socket.AF_INET6: []}
    with socket_in(netns_path, socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_ROUTE) as nl:
        for mtype, msg in netlink_dump(nl, _RTM_GETADDR, _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
            if mtype != _RTM_NEWADDR:
                continue
            family, _plen, _flags, scope, index = _IFADDRMSG.unpack_from(msg)
            attrs: dict[int, bytes] = {}
            a = _IFADDRMSG.size
            while a + _RTATTR.size <= len(msg):
                alen, atype = _RTATTR.unpack_from(msg, a)
                if alen < _RTATTR.size:
                    break
                attrs[atype] = msg[a + _RTATTR.size:a + alen]
                a += (alen + 3) & ~3
            raw = attrs.get(_IFA_LOCAL) or attrs.get(_IFA_ADDRESS)
            if family in found and raw and scope == _RT_SCOPE_UNIVERSE and index != _LOOPBACK_IFINDEX:
                found[family].append(ipaddress.ip_address(raw))
    return tuple(found[socket.AF_INET] + found[socket.AF_INET6])


def netns_inode(netns_path: str) -> int:
    return os.stat(netns_path).st_ino


def connect(netns_path: str, host: str, port: int, timeout: float = 5.0) -> socket.socket:
    """A TCP socket created in ``netns_path`` (a socket stays in the netns it was made in)
    and connected to host:port there."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = in_netns(netns_path, lambda: socket.socket(family, socket.SOCK_STREAM))
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
    """GET http://host:port/path from inside the netns (e.g. Envoy's admin API); (status, body)."""
    conn = _NetnsHTTPConnection(netns_path, host, port, timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


def http_get_json(netns_path: str, host: str, port: int, path: str, timeout: float = 5.0) -> Any:
    status, body = http_get(netns_path, host, port, path, timeout)
    if status != 200:
        raise KernelError(f"GET {path}: HTTP {status}: {body[:200]}")
    return json.loads(body)
