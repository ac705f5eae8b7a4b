"""Sockmap (sk_msg) correctness suite and the start-up self-test built on it.

Sockmap acceleration was dropped by Cilium and dae and called unstable by
Calico because kernels broke it: FIONREAD returning 0 with data queued (hangs
nginx and Java), stalls on large responses, splice returning 0. Before
acceleration is switched on, this suite runs real transfers through a real
Envoy with acceleration enabled:

* responses of 1 B to 8 MB, the server closing (EOF) after the body;
* half-close: the client shuts down its write side, the server answers after EOF;
* a client that sizes reads with FIONREAD (as nginx does) and must never see 0
  while data is readable;
* a client that copies with splice(2) into a pipe;
* 200 concurrent connections;
* no response slower than 1 s.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import KernelError
from ...timeouts import scaled
from .envoy import start_envoy
from ..host import BPFFS_ROOT
from ..loader import Datapath
from ..podconfig import PodConfig, ip_list
from ..staging import staged
from .topology import PYTHON, Pod, PodPair, wait_ready

SIZES = (1, 1000, 65536, 1 << 20, 8 << 20)
DATA_PORT = 9090
SLOW_SECONDS = 1.0
#: The self-test's reason goes into logs, Events and metrics: never longer than this.
#: (Unbounded, it reached 39 million characters on 5.10 and 6.1: one entry per failed read.)
MAX_REASON_CHARS = 300

HERE = Path(__file__).resolve().parent
SERVER_SCRIPT = HERE / "sockmap_server.py"
CLIENT_SCRIPT = HERE / "sockmap_client.py"


@dataclass
class SuiteReport:
    results: list[dict] = field(default_factory=list)

    @property
    def failures(self) -> list[dict]:
        return [r for r in self.results if r["problems"]]

    @property
    def slow(self) -> list[dict]:
        return [r for r in self.results if r["seconds"] > SLOW_SECONDS]

    @property
    def ok(self) -> bool:
        return bool(self.results) and not self.failures and not self.slow

    def reason(self) -> str:
        """Distinct failures, counted, at most MAX_REASON_CHARS characters."""
        if not self.results:
            return "no transfer completed"
        if self.ok:
            return "all transfers correct"
        # One entry per (reader, problem shape): "got 0 of 65536 bytes" and "got 0 of 1000 bytes"
        # are the same failure; the first one seen stands for all of them.
        kinds: Counter[tuple[str, str]] = Counter()
        example: dict[tuple[str, str], str] = {}
        for r in self.failures:
            for problem in dict.fromkeys(str(p) for p in r["problems"]):
                key = (str(r["reader"]), re.sub(r"\d+", "N", problem[:120]))
                kinds[key] += 1
                example.setdefault(key, f"{r['reader']}: {problem[:120]}")
        parts = [example[key] + (f" (x{n})" if n > 1 else "") for key, n in kinds.most_common()]
        if self.slow:
            worst = max(r["seconds"] for r in self.slow)
            parts.append(f"{len(self.slow)} slower than {SLOW_SECONDS:g} s (max {worst:g} s)")
        bad = len({id(r) for r in self.failures + self.slow})
        return bound_reason(f"{bad} of {len(self.results)} transfers failed: " + "; ".join(parts))


def bound_reason(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """One line, at most ``limit`` characters (an ellipsis marks a cut)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3].rstrip() + "..."


def start_data_server(pod: Pod, port: int = DATA_PORT):
    proc = pod.spawn([PYTHON, "-S", staged(SERVER_SCRIPT), str(port)], uid=1000, gid=1000,
                     stdout=-1, stderr=-1, text=True)
    wait_ready(proc, f"data server in {pod.name}")
    return proc


def run_suite(client: Pod, server_ip: str, port: int = DATA_PORT, sizes: tuple[int, ...] = SIZES,
              concurrency: int = 200) -> SuiteReport:
    proc = client.run([PYTHON, "-S", staged(CLIENT_SCRIPT), server_ip, str(port), ",".join(map(str, sizes)),
                       str(concurrency)], uid=1000, gid=1000, timeout=scaled(300))   # a deadline, not the measurement
    if proc.returncode != 0:
        raise KernelError(f"sockmap suite client failed: {proc.stderr.strip()[-800:]}")
    return SuiteReport(json.loads(proc.stdout))


def self_test(mode: str, sizes: tuple[int, ...] = (1, 65536, 1 << 20), concurrency: int = 20) -> tuple[bool, str]:
    """Start-up self-test: two private pods (:class:`.topology.PodPair`), Envoy in TCP mode, acceleration on.

    Returns (ok, reason); the agent turns acceleration off and logs the reason
    when ok is False. Everything it creates is removed before it returns.
    """
    try:
        with PodPair() as pair:
            client, server = pair.client, pair.server
            with Datapath(mode=mode, sockmap=True,
                          pin_root=str(BPFFS_ROOT / pair.name)) as dp:
                dp.attach_cgroup(str(pair.parent_cgroup))
                srv = start_data_server(server)
                envs = [start_envoy(p, protocol="tcp", access_log=False) for p in (client, server)]
                for p in (client, server):
                    dp.add_pod(p.netns_path, PodConfig(pod_ips=ip_list(p.pod_ips)), str(p.cgroup_path))
                try:
                    report = run_suite(client, server.ipv4, sizes=sizes, concurrency=concurrency)
                    used = dp.counters()["sockmap_bytes"]
                finally:
                    for e in envs:
                        e.stop()
                    srv.kill()
        if not report.ok:
            return False, bound_reason(f"sockmap self-test failed: {report.reason()}")
        if used == 0:
            return False, "sockmap self-test: no byte went through the sk_msg redirect"
        return True, f"sockmap self-test passed ({len(report.results)} transfers, {used} bytes redirected)"
    except Exception as exc:   # any failure means: do not accelerate
        return False, bound_reason(f"sockmap self-test could not run: {exc}")
