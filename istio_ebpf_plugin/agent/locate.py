"""Pod UID -> (cgroup directory, network namespace) through the host's /proc.

Kubelet names a pod's cgroup after its UID: ``kubepods-besteffort-pod<uid
with _>.slice`` (systemd driver) or ``pod<uid>`` (cgroupfs driver). A
container process of the pod lists that directory in ``/proc/<pid>/cgroup``;
its ``/proc/<pid>/ns/net`` is the pod's network namespace (every container,
the pause one included, shares it).

Under a private cgroup namespace (what containerd gives a non-privileged
container on a pure cgroup v2 host) the kernel writes those paths relative to
the *reader's* namespace root: ``0::/../../pod<uid>/<container>``. Joining that
onto the mount finds nothing, so such a path is resolved by name instead: the
pod's directory is looked up below ``search_root`` (the ``kubepods`` parent the
agent attaches to), matching the components after the last ``..``.

Tests and the local harness name cgroups differently, so ``cgroup_for_uid``
can be injected: it maps a UID to a cgroup directory, and the processes are
then taken from that directory's ``cgroup.procs``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from ..datapath import netns, userns
from ..datapath.host import cgroup_pids
from ..datapath.podconfig import IPAddress, PodConfig


@dataclass(frozen=True)
class PodLocation:
    cgroup_path: str      # absolute cgroup v2 directory of the pod
    netns_path: str       # /proc/<pid>/ns/net of one of its processes
    pid: int
    netns_inode: int      # identity of the namespace (stable while it lives)
    pids: tuple[int, ...] = ()   # every process of the pod the /proc pass saw (pid among them)


def mount_of(path: str) -> str:
    """The mount point holding ``path`` (the cgroup v2 mount for an attach directory)."""
    p = os.path.abspath(path)
    while p != "/" and not os.path.ismount(p):
        p = os.path.dirname(p)
    return p


def boot_seconds() -> float:
    """Now on the clock /proc/<pid>/stat start times count on (seconds since boot)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_started(pid: int, proc_root: Path | str = "/proc") -> float | None:
    """The process's start time in seconds since boot (``starttime``, field 22 of its stat)."""
    try:
        with open(f"{proc_root}/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()    # comm may hold spaces and parentheses
    try:
        return int(fields[19]) / _CLK_TCK
    except (IndexError, ValueError):
        return None


class PodLocator:
    def __init__(self, proc_root: str = "/proc", cgroup_root: str = "/sys/fs/cgroup",
                 cgroup_for_uid: Callable[[str], str | None] | None = None,
                 search_root: str | None = None) -> None:
        self.proc_root = Path(proc_root)
        self.cgroup_root = Path(cgroup_root)     # the cgroup v2 mount the paths are relative to
        self.search_root = Path(search_root) if search_root else self.cgroup_root
        self.cgroup_for_uid = cgroup_for_uid
        self._index: dict[str, PodLocation] = {}
        self._index_time = -1e9
        self._batch = False

    # ------------------------------------------------------------------ public
    def locate(self, uid: str) -> PodLocation | None:
        """Where the pod lives now, ``None`` while it has no running process."""
        if not uid:
            return None
        if self.cgroup_for_uid is not None:
            cg = self.cgroup_for_uid(uid)
            return self._from_cgroup_dir(Path(cg)) if cg else None
        # One pass over /proc indexes every pod; reused briefly so a resync of N pods
        # costs one scan, not N. A miss rescans unless the index is brand new.
        now = time.monotonic()
        if now - self._index_time > self.INDEX_TTL and not self._batch:
            self._rescan(now)
        hit = self._index.get(uid.replace("_", "-"))
        if hit is None and now - self._index_time > self.MISS_RESCAN_AFTER and not self._batch:
            self._rescan(now)
            hit = self._index.get(uid.replace("_", "-"))
        if hit is not None and not self._batch and not os.path.exists(hit.netns_path):
            # Its process exited: find another one of the pod. (Not in a batch, whose pass is just
            # made: a stat of a namespace link costs ~0.7 ms under load, 0.35 s a resync of 500 pods;
            # a sandbox gone since is found out when it is programmed.)
            self._rescan(now)
            hit = self._index.get(uid.replace("_", "-"))
        return hit

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Locate many pods from one pass over /proc (a resync, the pending retries).

        Without it a resync longer than ``INDEX_TTL`` scanned /proc again every second, and a
        scan costs more with every pod: 500 pods' resync took 7 s under load. A pod that has no
        process at the pass is not found (it stays pending and is retried after the batch).
        """
        now = time.monotonic()
        if now - self._index_time > self.MISS_RESCAN_AFTER:
            self._rescan(now)
        self._batch = True
        try:
            yield
        finally:
            self._batch = False

    def peek(self, uid: str) -> PodLocation | None:
        """Like :meth:`locate`, from the current index only: a miss does not rescan /proc."""
        if self.cgroup_for_uid is not None:
            return self.locate(uid)
        now = time.monotonic()
        if now - self._index_time > self.INDEX_TTL and not self._batch:
            self._rescan(now)
        return self._index.get(uid.replace("_", "-"))

    INDEX_TTL = 1.0
    MISS_RESCAN_AFTER = 0.1
    # "pod<uid>" in both cgroup drivers' names (systemd writes the UID with '_').
    _POD_UID = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")

    def _rescan(self, now: float) -> None:
        index: dict[str, PodLocation] = {}
        pids: dict[str, list[int]] = {}       # uid -> every process of the pod seen in the pass
        pod_dirs: dict[str, list[Path]] | None = None   # built once, only if a path needs it
        proc = str(self.proc_root)
        for pid in self._pids():
            try:
                with open(f"{proc}/{pid}/cgroup") as f:
                    text = f.read()
            except OSError:
                continue
            if "pod" not in text:
                continue          # most of a node's processes: not in a pod's cgroup
            for line in text.splitlines():
                hier, _, path = line.partition("::")
                if hier != "0":
                    continue
                parts = path.strip("/").split("/")
                for i, part in enumerate(parts):
                    m = self._POD_UID.search(part)
                    if m:
                        uid = m.group(1).replace("_", "-")
                        pids.setdefault(uid, []).append(pid)
                        if uid not in index:
                            ns = self._netns(pid)
                            if ".." in parts[:i]:
                                if pod_dirs is None:
                                    pod_dirs = self._pod_dirs()
                                cg = self._resolve_relative(parts[:i + 1], pod_dirs)
                            else:
                                cg = self.cgroup_root.joinpath(*parts[:i + 1])
                            if ns and cg is not None:
                                index[uid] = PodLocation(str(cg), ns[0], pid, ns[1])
                        break
        self._index = {uid: dataclasses.replace(loc, pids=tuple(pids[uid])) for uid, loc in index.items()}
        self._index_time = now

    # ------------------------------------------------------------------ helpers
    SEARCH_DEPTH = 4   # kubepods[.slice]/<qos>/pod<uid>: room for one more level (a cgroupRoot)

    def _pod_dirs(self) -> dict[str, list[Path]]:
        """Directory name -> paths, for every pod-named directory below search_root."""
        found: dict[str, list[Path]] = {}
        level = [self.search_root]
        for _ in range(self.SEARCH_DEPTH):
            nxt: list[Path] = []
            for d in level:
                try:
                    entries = list(os.scandir(d))
                except OSError:
                    continue
                for e in entries:
                    if e.is_dir(follow_symlinks=False):
                        p = Path(e.path)
                        if self._POD_UID.search(e.name):
                            found.setdefault(e.name, []).append(p)
                        else:
                            nxt.append(p)
            level = nxt
        return found

    @staticmethod
    def _resolve_relative(parts: list[str], pod_dirs: dict[str, list[Path]]) -> Path | None:
        """``[.., .., besteffort, pod<uid>]`` -> the one directory ending in ``besteffort/pod<uid>``."""
        tail = parts[len(parts) - parts[::-1].index("..") :]
        hits = [p for p in pod_dirs.get(tail[-1], []) if list(p.parts[-len(tail):]) == tail]
        return hits[0] if len(hits) == 1 else None

    def _netns(self, pid: int) -> tuple[str, int] | None:
        path = self.proc_root / str(pid) / "ns" / "net"
        try:
            return str(path), os.stat(path).st_ino
        except OSError:  # process exited or not ours to see
            return None

    def _from_cgroup_dir(self, cg: Path) -> PodLocation | None:
        for d in [cg, *sorted(p for p in cg.rglob("*") if p.is_dir())] if cg.is_dir() else []:
            try:
                pids = [int(x) for x in (d / "cgroup.procs").read_text().split()]
            except (OSError, ValueError):
                continue
            for pid in pids:
                ns = self._netns(pid)
                if ns:
                    return PodLocation(str(cg), ns[0], pid, ns[1])
        return None

    def pod_pids(self, where: PodLocation) -> Iterator[int]:
        """The located process first, then every process of the pod's cgroup tree."""
        yield where.pid
        if where.pids:           # from the /proc pass that found the pod: no cgroup walk
            yield from (p for p in where.pids if p != where.pid)
        elif where.cgroup_path:
            yield from (p for p in cgroup_pids(where.cgroup_path) if p != where.pid)

    def host_config(self, config: PodConfig, where: PodLocation) -> PodConfig:
        """``config`` with the proxy's IDs as the kernel sees them (pods with ``hostUsers: false``)."""
        return userns.host_config(config, where.netns_path, self.pod_pids(where), self.proc_root)

    def addresses(self, where: PodLocation) -> tuple[IPAddress, ...]:
        """The addresses its CNI plugin gave the pod, read in its network namespace (none when
        unreadable): known once the sandbox runs, before kubelet reports them to the API."""
        try:
            return netns.addresses(where.netns_path)
        except OSError:
            return ()

    def sandbox_started(self, where: PodLocation) -> float | None:
        """When the pod's first process started (its sandbox, the pause container), in seconds on
        ``CLOCK_BOOTTIME`` (:func:`boot_seconds`); None when none of its processes can be read."""
        times = [t for t in (process_started(pid, self.proc_root) for pid in self.pod_pids(where)) if t is not None]
        return min(times) if times else None

    def _pids(self) -> Iterator[int]:
        try:
            names = os.listdir(self.proc_root)
        except OSError:
            return
        for n in names:
            if n.isdigit():
                yield int(n)
