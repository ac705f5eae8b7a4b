"""Find a pod's listening sockets from userspace and borrow them (pidfd_getfd).

Used to register Envoy's 15006 listener for sk_lookup when sockops cannot
(pod-IP mode) or could not (the listener predates the pod's map entry).
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import logging
import os
import socket
import struct
from pathlib import Path
from typing import Iterator, Sequence

from .host import cgroup_pids
from .netns import netlink_dump, socket_in

SYS_PIDFD_OPEN = 434
SYS_PIDFD_GETFD = 438
_TCP_LISTEN = "0A"
# sock_diag (linux/sock_diag.h, linux/inet_diag.h)
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
TCPF_LISTEN = 1 << 10
_DIAG_REQ = struct.Struct("=BBBBI48x")       # struct inet_diag_req_v2, inet_diag_sockid zeroed: every socket
_MSG_SPORT, _MSG_SRC, _MSG_INODE = 4, 8, 68  # offsets in struct inet_diag_msg (sport, src: network order)
_libc = ctypes.CDLL(None, use_errno=True)
log = logging.getLogger(__name__)
#: The process exited (or closed the fd) between the /proc read and the syscall: not a failure.
_GONE = (errno.ENOENT, errno.ESRCH, errno.EBADF)
_reported: set[int] = set()   # errnos already logged: one line per kind of failure, not one per refresh


def _report(exc: OSError) -> None:
    """Log a failure to borrow a listener once (the refresh retries it every few seconds)."""
    if exc.errno in _reported:
        return
    _reported.add(exc.errno or 0)
    log.warning("cannot register the pod's 15006 listener for sk_lookup (inbound is refused until it works): "
                "%s: %s", exc.filename or "?", exc.strerror or exc)


def _reaches_pod_ips(family: int, packed: bytes) -> bool:
    """Whether a socket bound to this local address takes connections to the pod's IPs.

    A loopback-bound one does not: Istio's istio-validation init container listens on 127.0.0.1:15006
    (and :15001) while it checks capture, then exits. Registered, that socket's map entry went with it
    and the pod, marked as having its listener, waited for the next full refresh (up to 5 s) before
    Envoy's own wildcard 15006 socket was found: inbound refused for that long after Ready."""
    addr = ipaddress.ip_address(packed[:4] if family == socket.AF_INET else packed[:16])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return not addr.is_loopback


def _diag_listening_inodes(netns_path: str, port: int) -> dict[int, int]:
    """socket inode -> address family, for TCP sockets listening on port, from sock_diag
    (not those bound to loopback: :func:`_reaches_pod_ips`).

    A dump of listening sockets walks only the namespace's listeners; ``/proc/<pid>/net/tcp``
    walks the whole established hash, shared by every namespace: 60 ms a read on this 24 GB
    machine, so adding 20 pods took 4 s in those reads.
    """
    found: dict[int, int] = {}
    with socket_in(netns_path, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as nl:
        for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), start=1):
            req = _DIAG_REQ.pack(family, socket.IPPROTO_TCP, 0, 0, TCPF_LISTEN)
            for mtype, msg in netlink_dump(nl, SOCK_DIAG_BY_FAMILY, req, seq):
                if (mtype == SOCK_DIAG_BY_FAMILY and struct.unpack_from("!H", msg, _MSG_SPORT)[0] == port
                        and _reaches_pod_ips(family, msg[_MSG_SRC:_MSG_SRC + 16])):
                    found[struct.unpack_from("=I", msg, _MSG_INODE)[0]] = family
    return found


def _listening_inodes(pid_dir: Path, port: int) -> dict[int, int]:
    """socket inode -> address family, for TCP sockets listening on port (from /proc: the fallback;
    not those bound to loopback)."""
    found: dict[int, int] = {}
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        try:
            lines = (pid_dir / "net" / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) < 10 or f[3] != _TCP_LISTEN:
                continue
            addr, _, hex_port = f[1].rpartition(":")
            # /proc prints the address as 32-bit words in host (little-endian) order
            packed = b"".join(struct.pack("<I", int(addr[i:i + 8], 16)) for i in range(0, len(addr), 8))
            if int(hex_port, 16) == port and _reaches_pod_ips(family, packed):
                found[int(f[9])] = family
    return found


def _getfd(pid: int, target_fd: int) -> int:
    pidfd = _libc.syscall(SYS_PIDFD_OPEN, pid, 0)
    if pidfd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), f"pidfd_open({pid})")
    try:
        fd = _libc.syscall(SYS_PIDFD_GETFD, pidfd, target_fd, 0)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), f"pidfd_getfd({pid}, {target_fd})")
        return fd
    finally:
        os.close(pidfd)


def processes_by_netns(proc: str = "/proc") -> dict[int, list[Path]]:
    """One pass over /proc: network-namespace inode -> /proc/<pid> directories."""
    out: dict[int, list[Path]] = {}
    for pid_dir in Path(proc).iterdir():
        if pid_dir.name.isdigit():
            try:
                out.setdefault(os.stat(pid_dir / "ns" / "net").st_ino, []).append(pid_dir)
            except OSError:
                continue      # the process went away meanwhile
    return out


def find_listeners(netns_path: str, port: int, proc: str = "/proc",
                   by_netns: dict[int, list[Path]] | None = None, cgroup_path: str | None = None,
                   pids: Sequence[int] = ()) -> Iterator[tuple[int, int]]:
    """Yield (family, fd) for each socket listening on port inside the namespace.

    The namespace's listening sockets come first (sock_diag, by socket inode); only when there
    are some are processes searched for the descriptors: the pod's own first (``pids``, else
    those of ``cgroup_path``; an inode names one socket, so their namespaces need no check: a
    stat of each one's namespace link cost ~0.7 ms under load), then, for any still missing,
    the namespace's processes (``by_netns`` from :func:`processes_by_netns`, which saves a
    /proc pass per pod when many are refreshed at once, else a /proc pass).
    The caller owns (and must close) each fd. A ``/proc/<pid>/ns/net`` path whose process has
    exited yields nothing (the caller finds the namespace again).
    """
    try:
        ns_ino = os.stat(netns_path).st_ino
    except OSError as exc:
        if exc.errno not in _GONE:
            _report(exc)
        return
    inodes: dict[int, int] | None
    try:
        inodes = _diag_listening_inodes(netns_path, port)   # one table for all of the namespace's processes
    except OSError:
        inodes = None    # no sock_diag here: each process's /proc view of the same table
    if inodes == {}:
        return
    seen: set[int] = set()
    searched: set[Path] = set()
    if inodes is not None and (pids or cgroup_path):
        own = [Path(proc, str(pid)) for pid in (pids or cgroup_pids(cgroup_path or ""))]
        yield from _borrow(own, inodes, seen)
        if inodes.keys() <= seen:
            return
        searched.update(own)
    if by_netns is None:
        by_netns = processes_by_netns(proc)
    rest = [d for d in by_netns.get(ns_ino, []) if d not in searched]
    if inodes is None:
        for pid_dir in rest:
            try:
                inodes = _listening_inodes(pid_dir, port)
            except ValueError:
                continue
            if inodes:
                break    # none, or the process is gone: the next one's view
        if not inodes:
            return
    yield from _borrow(rest, inodes, seen)


def _borrow(pid_dirs: list[Path], inodes: dict[int, int], seen: set[int]) -> Iterator[tuple[int, int]]:
    """(family, fd) for every socket of ``inodes`` that these processes hold and is not ``seen`` yet."""
    for pid_dir in pid_dirs:
        if inodes.keys() <= seen:
            return
        try:
            for fd_link in (pid_dir / "fd").iterdir():
                target = os.readlink(fd_link)
                if not target.startswith("socket:["):
                    continue
                ino = int(target[8:-1])
                if ino in inodes and ino not in seen:
                    seen.add(ino)
                    yield inodes[ino], _getfd(int(pid_dir.name), int(fd_link.name))
        except ValueError:
            continue
        except OSError as exc:
            if exc.errno not in _GONE:   # gone: the process exited meanwhile
                _report(exc)   # e.g. EACCES on /proc/<pid>/fd: the reason inbound is refused
            continue
