"""The kernel's invocation floor: what an EMPTY program costs at each cgroup hook the datapath uses.

``run_time_ns`` (``BPF_ENABLE_STATS``) of a program includes the kernel's cost of calling it (and of
the statistics themselves). The datapath's sockops runs 9 times per connection whether or not it
asks for callbacks, so part of the "ns per connection" figure is fixed by the hook, not by our code.
Here empty programs sit at the same hooks of a private cgroup, a child in that cgroup and in its
own network namespace makes loopback connections, and each program's ns per run is read the way
:mod:`.bpf_cost` reads the datapath's. Repeats give a median and its range: a floor, measured in
this run, that the datapath's own figures can be set against.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..datapath import libbpf
from .bpf_cost import StatsSwitch

CGROUP_ROOT = Path("/sys/fs/cgroup/unified")
#: hook -> (BCC program type name, attach type), the datapath's own constants
HOOKS = {"sockops": ("SOCK_OPS", libbpf.SOCK_OPS), "connect4": ("CGROUP_SOCK_ADDR", libbpf.CGROUP_INET4_CONNECT),
         "sock_release": ("CGROUP_SOCK", libbpf.CGROUP_INET_SOCK_RELEASE)}
_SOURCE = "".join(f"int empty_{hook}(void *ctx) {{ return 1; }}\n" for hook in HOOKS)
# The child: lo up in its own netns, N connect/accept/close pairs over loopback.
_CHILD = """
import socket, subprocess, sys
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(512)
for _ in range(int(sys.argv[1])):
    c = socket.create_connection(srv.getsockname()); a, _ = srv.accept(); c.close(); a.close()
"""


@dataclass(frozen=True)
class Floor:
    hook: str
    ns_per_run: list[float]        # one figure per repeat
    runs_per_connection: float

    @property
    def median(self) -> float:
        return statistics.median(self.ns_per_run)

    def line(self) -> str:
        lo, hi = min(self.ns_per_run), max(self.ns_per_run)
        return (f"{self.hook}: {self.median:.1f} ns per run [{lo:.1f}-{hi:.1f} over {len(self.ns_per_run)} "
                f"repeats], {self.runs_per_connection:.1f} runs per loopback connection -> "
                f"{self.median * self.runs_per_connection:.0f} ns per connection")


def measure(connections: int = 2000, repeats: int = 3) -> list[Floor]:
    """Empty programs at the datapath's hooks of a private cgroup; ``repeats`` runs of ``connections``."""
    from bcc import BPF

    bpf = BPF(text=_SOURCE)
    progs = {hook: bpf.load_func(f"empty_{hook}", getattr(BPF, kind), attach_type=attach)
             for hook, (kind, attach) in HOOKS.items()}
    cgroup = CGROUP_ROOT / f"istio-ebpf-floor-{uuid.uuid4().hex[:8]}"
    cgroup.mkdir()
    cg_fd = os.open(cgroup, os.O_RDONLY)
    attached: list[str] = []
    per_run: dict[str, list[float]] = {hook: [] for hook in HOOKS}
    runs: dict[str, int] = dict.fromkeys(HOOKS, 0)
    try:
        for hook, (_, attach) in HOOKS.items():
            libbpf.prog_attach(progs[hook].fd, cg_fd, attach)
            attached.append(hook)
        with StatsSwitch() as stats:
            if stats.fd is None:
                raise OSError(stats.error)
            for _ in range(repeats):
                before = {hook: libbpf.prog_run_stats(p.fd) for hook, p in progs.items()}
                # Into the cgroup first, then a new netns (unshare), as the lab's pods do.
                subprocess.run(["sh", "-c", f'echo $$ > "{cgroup}/cgroup.procs" && exec unshare -n "$0" -c "$1" "$2"',
                                sys.executable, _CHILD, str(connections)], check=True, timeout=300)
                for hook, p in progs.items():
                    ns, cnt = libbpf.prog_run_stats(p.fd)
                    d_ns, d_cnt = ns - before[hook][0], cnt - before[hook][1]
                    per_run[hook].append(d_ns / d_cnt if d_cnt else 0.0)
                    runs[hook] += d_cnt
    finally:
        for hook in attached:
            libbpf.prog_detach(progs[hook].fd, cg_fd, HOOKS[hook][1])
        os.close(cg_fd)
        cgroup.rmdir()
        bpf.cleanup()
    return [Floor(hook, per_run[hook], runs[hook] / (connections * repeats)) for hook in HOOKS]


def report(floors: list[Floor]) -> str:
    total = sum(f.median * f.runs_per_connection for f in floors)
    return "".join(f.line() + "\n" for f in floors) + (
        f"floor per loopback connection (these hooks, empty programs): {total:.0f} ns\n")
