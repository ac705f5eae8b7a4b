"""Run ``wrk`` inside a pod and read its figures (a Lua ``done`` hook prints one JSON line)."""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import KernelError

if TYPE_CHECKING:  # pragma: no cover
    from ..harness.node import Pod

MARK = "WRKJSON "
LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"status_errors":%d,"timeouts":%d,"p50_us":%.1f,"p99_us":%.1f,"p999_us":%.1f,' ..
    '"mean_us":%.1f,"max_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.mean, latency.max))
end
"""


@dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_s: float
    bytes: int
    errors: int
    timeouts: int
    p50_ms: float
    p99_ms: float
    p999_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def throughput_mbps(self) -> float:
        """Response bytes per second, in megabits per second."""
        return self.bytes * 8 / self.duration_s / 1e6 if self.duration_s else 0.0


def version() -> str:
    out = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout
    m = re.search(r"wrk\s+(\S+)", out)
    return m.group(1) if m else out.strip()[:60]


def write_script(directory: Path) -> Path:
    path = directory / "wrk-done.lua"
    path.write_text(LUA)
    path.chmod(0o644)
    return path


def run(pod: "Pod", url: str, *, connections: int, duration_s: float, script: Path, threads: int = 1,
        close_each: bool = False, uid: int = 1000, gid: int = 1000) -> WrkResult:
    """``wrk -t threads -c connections -d duration`` from ``pod`` (as the app user)."""
    seconds = max(1, round(duration_s))   # wrk takes whole seconds
    argv = ["wrk", "-t", str(threads), "-c", str(max(connections, threads)), "-d", f"{seconds}s",
            "--timeout", "5s", "-s", str(script)]
    if close_each:
        argv += ["-H", "Connection: close"]
    argv.append(url)
    proc = pod.run(argv, uid=uid, gid=gid, timeout=seconds + 60)
    line = next((ln[len(MARK):] for ln in proc.stdout.splitlines() if ln.startswith(MARK)), None)
    if proc.returncode != 0 or line is None:
        raise KernelError(f"wrk in pod {pod.name} failed ({proc.returncode}): {proc.stderr.strip()[-400:]} "
                          f"{proc.stdout.strip()[-400:]}")
    d = json.loads(line)
    errors = d["connect_errors"] + d["read_errors"] + d["write_errors"] + d["status_errors"] + d["timeouts"]
    return WrkResult(requests=d["requests"], duration_s=d["duration_us"] / 1e6, bytes=d["bytes"], errors=errors,
                     timeouts=d["timeouts"], p50_ms=d["p50_us"] / 1e3, p99_ms=d["p99_us"] / 1e3,
                     p999_ms=d["p999_us"] / 1e3)
