"""The proxy's UID and GID as the kernel sees them, for pods in their own user namespace.

A pod with ``hostUsers: false`` runs in a user namespace whose IDs are mapped to a
range of host IDs (``/proc/<pid>/uid_map``: ``inside outside count`` lines). Envoy's
UID 1337 inside is, say, 101337 on the host. The programs compare
``bpf_get_current_uid_gid()``, which returns IDs of the initial user namespace, so the
pod's configuration must carry the host-side proxy UID and GID: :func:`host_config`.

Which user namespace is the pod's: the one that owns its network namespace
(``NS_GET_USERNS`` on it), as a container runtime sets it up for such pods. A process of
the pod in that namespace gives the maps; a process of the pod in a nested namespace (an
app that sandboxes itself) would give the wrong ones, so it is skipped. A netns owned by
the agent's own user namespace (every pod without ``hostUsers: false``) needs no map.

Reading a map from the initial user namespace, the kernel writes the outside IDs as
initial-namespace IDs, whatever the nesting: exactly what the programs compare.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
from pathlib import Path
from typing import Iterable, Sequence

from .podconfig import PodConfig
from ..errors import KernelError, UsageError

#: ioctl(2) on a namespace file: a file descriptor of the user namespace that owns it
#: (linux/nsfs.h: _IO(0xb7, 0x1)).
NS_GET_USERNS = 0xB701

IdMap = Sequence[tuple[int, int, int]]


def parse_id_map(text: str) -> list[tuple[int, int, int]]:
    """``/proc/<pid>/uid_map`` text -> [(inside, outside, count)]."""
    out = []
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 3 or not all(f.isdigit() for f in fields):
            raise KernelError(f"unexpected id map line {line.strip()!r}")
        inside, outside, count = (int(f) for f in fields)
        out.append((inside, outside, count))
    return out


def to_outside(ident: int, id_map: IdMap) -> int | None:
    """The outside ID of ``ident``, None when the map does not cover it."""
    for inside, outside, count in id_map:
        if inside <= ident < inside + count:
            return outside + (ident - inside)
    return None


def _ns_inode(path: str | Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def owner_userns(netns_path: str) -> tuple[int, int]:
    """(device, inode) of the user namespace that owns the network namespace at ``netns_path``."""
    fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        user_fd = fcntl.ioctl(fd, NS_GET_USERNS)
    finally:
        os.close(fd)
    try:
        st = os.fstat(user_fd)
        return st.st_dev, st.st_ino
    finally:
        os.close(user_fd)


def id_maps(netns_path: str, pids: Iterable[int],
            proc_root: str | Path = "/proc") -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]] | None:
    """(uid_map, gid_map) of the user namespace that owns the pod's network namespace, read through
    a process of the pod in it; None when that is the agent's own (IDs are host IDs already).
    Raises :class:`KernelError` when no process of the pod is in that namespace."""
    owner = owner_userns(netns_path)
    if owner == _ns_inode("/proc/self/ns/user"):
        return None
    for pid in pids:
        base = Path(proc_root, str(pid))
        try:
            if _ns_inode(base / "ns" / "user") != owner:
                continue
            return parse_id_map((base / "uid_map").read_text()), parse_id_map((base / "gid_map").read_text())
        except OSError:
            continue          # exited meanwhile: another process of the pod may do
    raise KernelError(f"no process of the pod in the user namespace owning {netns_path}")


def host_ids(uid: int, gid: int, netns_path: str, pids: Iterable[int],
             proc_root: str | Path = "/proc") -> tuple[int, int]:
    """A UID and GID as seen inside the pod -> as the programs see them (host IDs).
    :class:`UsageError` when the pod's user namespace does not map them."""
    maps = id_maps(netns_path, pids, proc_root)
    if maps is None:
        return uid, gid
    host_uid, host_gid = to_outside(uid, maps[0]), to_outside(gid, maps[1])
    if host_uid is None or host_gid is None:
        raise UsageError(f"UID/GID {uid}/{gid} is not mapped in the pod's user namespace (uid_map/gid_map)")
    return host_uid, host_gid


def host_config(config: PodConfig, netns_path: str, pids: Iterable[int],
                proc_root: str | Path = "/proc") -> PodConfig:
    """``config`` with the proxy UID/GID translated to host IDs.

    ``pids``: processes of the pod (tried in order; only those in the netns owner's user
    namespace count), found under ``proc_root``. Unchanged when the netns belongs to the
    agent's own user namespace (the initial one: the agent runs with the host's users).
    Raises :class:`KernelError` when no process of the pod is in that namespace (try
    again later) and :class:`UsageError` when the map does not cover the proxy's IDs
    (no process of the pod can have them: nothing would be exempt).
    """
    maps = id_maps(netns_path, pids, proc_root)
    if maps is None:
        return config
    uid, gid = to_outside(config.proxy_uid, maps[0]), to_outside(config.proxy_gid, maps[1])
    if uid is None or gid is None:
        raise UsageError(f"proxy UID/GID {config.proxy_uid}/{config.proxy_gid} is not mapped in the pod's "
                         "user namespace (uid_map/gid_map): nothing could be exempt from capture")
    return dataclasses.replace(config, proxy_uid=uid, proxy_gid=gid)
