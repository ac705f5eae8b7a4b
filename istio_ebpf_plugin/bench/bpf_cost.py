"""The datapath's own cost, from the kernel: ``run_time_ns``/``run_cnt`` of each program.

Statistics are switched on with ``BPF_ENABLE_STATS`` (the switch behind
``kernel.bpf_stats_enabled``; it reverts when our fd closes, even if the bench dies) and read
from ``bpf_prog_info`` of the programs the loader attached, by their fds, before and after each
measurement. Per connection: connect + sockops + getsockopt + sk_lookup (the capture itself),
and sock_create/sock_release (hardening) separately; per message: sk_msg.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..datapath import libbpf

#: Programs that run for every captured connection, and the hardening extras.
CAPTURE_PROGRAMS = ("ie_connect4", "ie_connect6", "ie_sockops", "ie_getsockopt", "ie_inbound")
HARDENING_PROGRAMS = ("ie_sock_create", "ie_sock_release")
MESSAGE_PROGRAMS = ("ie_accel",)


class StatsSwitch:
    """``with StatsSwitch():`` BPF run-time statistics on for the block (None-safe if refused)."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self.error: str | None = None

    def __enter__(self) -> "StatsSwitch":
        try:
            self.fd = libbpf.enable_stats()
        except OSError as exc:
            self.error = f"BPF_ENABLE_STATS refused: {exc.strerror}"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def snapshot(datapath: Any) -> dict[str, tuple[int, int]]:
    """{program: (run_time_ns, run_cnt)} for every program of a loaded Datapath."""
    return {name: libbpf.prog_run_stats(fd) for name, fd in datapath.prog_fds.items()}


@dataclass(frozen=True)
class Cost:
    ns: dict[str, int]       # program -> run time spent in the interval
    runs: dict[str, int]     # program -> invocations in the interval

    @classmethod
    def between(cls, before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> "Cost":
        return cls({k: after[k][0] - before[k][0] for k in after if k in before},
                   {k: after[k][1] - before[k][1] for k in after if k in before})

    def plus(self, other: "Cost") -> "Cost":
        keys = set(self.ns) | set(other.ns)
        return Cost({k: self.ns.get(k, 0) + other.ns.get(k, 0) for k in keys},
                    {k: self.runs.get(k, 0) + other.runs.get(k, 0) for k in keys})

    def per_connection(self, connections: int) -> dict | None:
        """ns and runs per connection, by program; ``capture_ns`` and ``hardening_ns`` totals."""
        if connections <= 0 or not self.ns:
            return None
        progs = [p for p in (*CAPTURE_PROGRAMS, *HARDENING_PROGRAMS) if p in self.ns]
        by = {p: {"ns": round(self.ns[p] / connections, 1), "runs": round(self.runs[p] / connections, 2),
                  "ns_per_run": round(self.ns[p] / self.runs[p], 1) if self.runs[p] else None} for p in progs}
        capture = sum(self.ns[p] for p in CAPTURE_PROGRAMS if p in self.ns) / connections
        hardening = sum(self.ns[p] for p in HARDENING_PROGRAMS if p in self.ns) / connections
        return {"capture_ns": round(capture, 1), "hardening_ns": round(hardening, 1),
                "total_ns": round(capture + hardening, 1), "programs": by}

    def per_message(self) -> float | None:
        """sk_msg ns per run (one run per sendmsg on an accelerated socket)."""
        runs = sum(self.runs.get(p, 0) for p in MESSAGE_PROGRAMS)
        return round(sum(self.ns.get(p, 0) for p in MESSAGE_PROGRAMS) / runs, 1) if runs else None
