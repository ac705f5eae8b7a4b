"""Find a pod's listening sockets from userspace and borrow them (pidfd_getfd).

Used to register Envoy's 15006 listener for sk_lookup when sockops cannot
(pod-IP mode) or could not (the listener predates the pod's map entry).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
from pathlib import Path
from typing import Iterator

SYS_PIDFD_OPEN = 434
SYS_PIDFD_GETFD = 438
_TCP_LISTEN = "0A"
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


def _listening_inodes(pid_dir: Path, port: int) -> dict[int, int]:
    """socket inode -> address family, for TCP sockets listening on port."""
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
            if int(f[1].rsplit(":", 1)[1], 16) == port:
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
                   by_netns: dict[int, list[Path]] | None = None) -> Iterator[tuple[int, int]]:
    """Yield (family, fd) for each socket listening on port inside the namespace.

    by_netns (from processes_by_netns) saves a /proc pass per pod when many are
    refreshed at once. The caller owns (and must close) each fd.
    """
    ns_ino = os.stat(netns_path).st_ino
    if by_netns is None:
        by_netns = processes_by_netns(proc)
    seen: set[int] = set()
    for pid_dir in by_netns.get(ns_ino, ()):
        try:
            inodes = _listening_inodes(pid_dir, port)
            if not inodes or inodes.keys() <= seen:
                continue
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
