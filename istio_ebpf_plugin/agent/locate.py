"""Pod UID -> (cgroup directory, network namespace) through the host's /proc.

Kubelet names a pod's cgroup after its UID: ``kubepods-besteffort-pod<uid
with _>.slice`` (systemd driver) or ``pod<uid>`` (cgroupfs driver). A
container process of the pod lists that directory in ``/proc/<pid>/cgroup``;
its ``/proc/<pid>/ns/net`` is the pod's network namespace (every container,
the pause one included, shares it).

Tests and the local harness name cgroups differently, so ``cgroup_for_uid``
can be injected: it maps a UID to a cgroup directory, and the processes are
then taken from that directory's ``cgroup.procs``.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator


@dataclass(frozen=True)
class PodLocation:
    cgroup_path: str      # absolute cgroup v2 directory of the pod
    netns_path: str       # /proc/<pid>/ns/net of one of its processes
    pid: int
    netns_inode: int      # identity of the namespace (stable while it lives)


class PodLocator:
    def __init__(self, proc_root: str = "/proc", cgroup_root: str = "/sys/fs/cgroup",
                 cgroup_for_uid: Callable[[str], str | None] | None = None) -> None:
        self.proc_root = Path(proc_root)
        self.cgroup_root = Path(cgroup_root)
        self.cgroup_for_uid = cgroup_for_uid
        self._index: dict[str, PodLocation] = {}
        self._index_time = -1e9

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
        if now - self._index_time > self.INDEX_TTL:
            self._rescan(now)
        hit = self._index.get(uid.replace("_", "-"))
        if hit is None and now - self._index_time > self.MISS_RESCAN_AFTER:
            self._rescan(now)
            hit = self._index.get(uid.replace("_", "-"))
        if hit is not None and not os.path.exists(hit.netns_path):
            self._rescan(now)   # its process exited: find another one of the pod
            hit = self._index.get(uid.replace("_", "-"))
        return hit

    INDEX_TTL = 1.0
    MISS_RESCAN_AFTER = 0.1
    # "pod<uid>" in both cgroup drivers' names (systemd writes the UID with '_').
    _POD_UID = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")

    def _rescan(self, now: float) -> None:
        index: dict[str, PodLocation] = {}
        for pid in self._pids():
            try:
                text = (self.proc_root / str(pid) / "cgroup").read_text()
            except OSError:
                continue
            for line in text.splitlines():
                hier, _, path = line.partition("::")
                if hier != "0":
                    continue
                parts = path.strip("/").split("/")
                for i, part in enumerate(parts):
                    m = self._POD_UID.search(part)
                    if m:
                        uid = m.group(1).replace("_", "-")
                        if uid not in index:
                            ns = self._netns(pid)
                            if ns:
                                index[uid] = PodLocation(str(self.cgroup_root.joinpath(*parts[:i + 1])),
                                                         ns[0], pid, ns[1])
                        break
        self._index, self._index_time = index, now

    # ------------------------------------------------------------------ helpers
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

    def _pids(self) -> Iterator[int]:
        try:
            names = os.listdir(self.proc_root)
        except OSError:
            return
        for n in names:
            if n.isdigit():
                yield int(n)
