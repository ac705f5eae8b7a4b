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
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from ..harness.node import Pod

SIZES = (1, 1000, 65536, 1 << 20, 8 << 20)
DATA_PORT = 9090
SLOW_SECONDS = 1.0
#: The self-test's reason goes into logs, Events and metrics: never longer than this.
#: (Unbounded, it reached 39 million characters on 5.10 and 6.1: one entry per failed read.)
MAX_REASON_CHARS = 300

SERVER = textwrap.dedent(r"""
    import socket, sys, threading
    port = int(sys.argv[1])
    chunk = b"x" * 65536
    def serve(c):
        try:
            f = c.makefile("rb")
            size, mode = f.readline().split()
            size = int(size)
            if mode == b"half":
                while c.recv(65536):
                    pass
            left = size
            while left:
                n = c.send(chunk[:min(left, len(chunk))])
                left -= n
        finally:
            c.close()
    def accept_loop(s):
        while True:
            threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
    for fam, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((host, port)); s.listen(1024)
        threading.Thread(target=accept_loop, args=(s,), daemon=True).start()
    print("READY", flush=True)
    threading.Event().wait()
""")

CLIENT = textwrap.dedent(r"""
    import fcntl, json, os, select, socket, sys, termios, time, struct
    from concurrent.futures import ThreadPoolExecutor
    dst, port, sizes, conc = sys.argv[1], int(sys.argv[2]), [int(x) for x in sys.argv[3].split(",")], int(sys.argv[4])
    def fetch(size, mode, reader):
        t = time.monotonic()
        s = socket.create_connection((dst, port), timeout=5)
        s.sendall(f"{size} {mode}\n".encode())
        if mode == "half":
            s.shutdown(socket.SHUT_WR)
        got, problems, fionread_zero = 0, [], 0
        if reader == "splice":
            s.setblocking(True)     # splice(2) on a non-blocking socket answers EAGAIN
            r, w = os.pipe()
            while True:
                n = os.splice(s.fileno(), w, 1 << 20)
                if n == 0:
                    break
                got += n
                while n:
                    n -= len(os.read(r, n))
            os.close(r); os.close(w)
        elif reader == "fionread":
            s.setblocking(False)
            p = select.poll(); p.register(s, select.POLLIN)
            while True:
                if not p.poll(5000):
                    problems.append("poll timeout"); break
                avail = struct.unpack("i", fcntl.ioctl(s, termios.FIONREAD, b"\0\0\0\0"))[0]
                data = s.recv(max(avail, 1))
                if not data:
                    break
                if avail == 0:
                    fionread_zero += 1      # counted, not listed: one entry per read is unbounded
                got += len(data)
            if fionread_zero:
                problems.append(f"FIONREAD 0 with data readable ({fionread_zero} reads)")
        else:
            while True:
                data = s.recv(1 << 20)
                if not data:
                    break
                got += len(data)
        s.close()
        dt = time.monotonic() - t
        if got != size:
            problems.append(f"got {got} of {size} bytes")
        return {"size": size, "mode": mode, "reader": reader, "seconds": round(dt, 4), "problems": problems}
    results = []
    for size in sizes:
        for mode in ("close", "half"):
            for reader in ("recv", "fionread", "splice"):
                results.append(fetch(size, mode, reader))
    with ThreadPoolExecutor(max_workers=50) as ex:
        results += list(ex.map(lambda i: fetch(16384, "close", "recv"), range(conc)))
    print(json.dumps(results))
""")


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


def start_data_server(pod: "Pod", port: int = DATA_PORT):
    from ..harness.apps import wait_ready
    from ..harness.probe import PYTHON

    proc = pod.spawn([PYTHON, "-S", "-c", SERVER, str(port)], uid=1000, gid=1000,
                     stdout=-1, stderr=-1, text=True)
    wait_ready(proc, f"data server in {pod.name}")
    return proc


def run_suite(client: "Pod", server_ip: str, port: int = DATA_PORT, sizes: tuple[int, ...] = SIZES,
              concurrency: int = 200) -> SuiteReport:
    from ..errors import KernelError
    from ..harness.probe import PYTHON

    proc = client.run([PYTHON, "-S", "-c", CLIENT, server_ip, str(port), ",".join(map(str, sizes)),
                       str(concurrency)], uid=1000, gid=1000, timeout=300)
    if proc.returncode != 0:
        raise KernelError(f"sockmap suite client failed: {proc.stderr.strip()[-800:]}")
    return SuiteReport(json.loads(proc.stdout))


def self_test(mode: str, sizes: tuple[int, ...] = (1, 65536, 1 << 20), concurrency: int = 20) -> tuple[bool, str]:
    """Start-up self-test: a private two-pod node, Envoy in TCP mode, acceleration on.

    Returns (ok, reason); the agent turns acceleration off and logs the reason
    when ok is False. Everything it creates is removed before it returns.
    """
    import uuid

    from ..harness.node import Node
    from .loader import Datapath
    from .podconfig import PodConfig, ip_list

    try:
        with Node() as node:
            client, server = node.add_pod("stclient"), node.add_pod("stserver")
            with Datapath(mode=mode, sockmap=True,
                          pin_root=f"/sys/fs/bpf/istio-ebpf-selftest-{uuid.uuid4().hex[:8]}") as dp:
                dp.attach_cgroup(str(node.parent_cgroup))
                srv = start_data_server(server)
                envs = [p.start_envoy(protocol="tcp", access_log=False) for p in (client, server)]
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
