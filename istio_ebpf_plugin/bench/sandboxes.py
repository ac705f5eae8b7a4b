"""Stand-in pod sandboxes for scale measurements: a cgroup, a network namespace and a few processes each.

What the agent needs to find and program a pod, without a container runtime: processes whose
``/proc/<pid>/cgroup`` names ``.../pod<uid>/<container>`` (kubelet's cgroupfs layout), all in
the pod's own network namespace. Each sandbox is ``<root>/kubepods/besteffort/pod<uid>/c<k>``
with one process per "container" (``sleep``; the first stands for the pause process, the last
may be a sidecar running as UID 1337), inside ``ip netns`` namespace ``ie-<token>-s<i>``. Every
name carries the harness prefixes, so ``istio-ebpf harness-cleanup`` finds leftovers of a crashed run.
"""

from __future__ import annotations

import ipaddress
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..datapath.selftest.topology import NETNS_DIR, kill_cgroup, remove_cgroup
from ..harness import names


@dataclass(frozen=True)
class Sandbox:
    index: int
    uid: str
    netns: str
    cgroup: Path

    @property
    def netns_path(self) -> str:
        return str(NETNS_DIR / self.netns)

    @property
    def ips(self) -> tuple[str, str]:
        return pod_ips(self.index)


def pod_ips(index: int) -> tuple[str, str]:
    """Pod ``index``'s addresses, from 100.64.0.0/10 and fd00:5ca1::/64: routed nowhere here."""
    return (f"100.64.{index // 250}.{index % 250 + 1}", str(ipaddress.ip_address(f"fd00:5ca1::{index + 1:x}")))


class Sandboxes:
    """``with Sandboxes(token) as fleet: fleet.grow(uids)``; everything removed on exit."""

    def __init__(self, token: str, processes_per_pod: int = 3, sidecar: list[str] | None = None) -> None:
        self.token = token
        self.processes_per_pod = processes_per_pod
        #: the last "container" runs this as UID/GID 1337, like Envoy (e.g. a listener on 15006)
        self.sidecar = sidecar
        self.root = names.cgroup_v2_root() / f"{names.CGROUP_PREFIX}{token}-pods"
        self.pods: list[Sandbox] = []
        self._procs: list[subprocess.Popen] = []

    def __enter__(self) -> "Sandboxes":
        self.root.mkdir()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def grow(self, uids: list[str]) -> list[Sandbox]:
        """One more sandbox per pod UID (the Pod objects' own: the agent finds pods by them)."""
        new = [Sandbox(i, uid, f"{names.NETNS_PREFIX}{self.token}-s{i}",
                       self.root / "kubepods" / "besteffort" / f"pod{uid}")
               for i, uid in enumerate(uids, start=len(self.pods))]
        if not new:
            return []
        subprocess.run(["ip", "-batch", "-"], input="".join(f"netns add {s.netns}\n" for s in new),
                       text=True, check=True, capture_output=True)
        self.pods += new
        for s in new:
            for k in range(self.processes_per_pod):
                container = s.cgroup / f"c{k}"
                container.mkdir(parents=True)
                argv = ["sleep", "infinity"]
                if self.sidecar and k == self.processes_per_pod - 1:
                    argv = ["setpriv", "--reuid=1337", "--regid=1337", "--clear-groups", "--", *self.sidecar]
                # Joins its container's cgroup before it execs into the pod's namespace: no race.
                self._procs.append(subprocess.Popen(
                    ["sh", "-c", 'echo $$ > "$1/cgroup.procs" && c="$2" && shift 2 && exec nsenter --net="$c" -- "$@"',
                     "sandbox", str(container), s.netns_path, *argv],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    start_new_session=True))
        return new

    def close(self) -> None:
        kill_cgroup(self.root)
        for p in self._procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        self._procs.clear()
        remove_cgroup(self.root)
        if self.pods:
            subprocess.run(["ip", "-batch", "-"], input="".join(f"netns del {s.netns}\n" for s in self.pods),
                           text=True, capture_output=True)
        self.pods.clear()
