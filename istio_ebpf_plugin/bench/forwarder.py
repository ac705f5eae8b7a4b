"""The capture-only sidecar: ``tools/capture_forwarder.c``, built by ``make forwarder`` into a cache.

It listens on 15001/15006 like Envoy, asks ``SO_ORIGINAL_DST`` like Envoy, and copies bytes:
with it the capture (NAT + conntrack, or the eBPF programs) is a large share of the path.
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .. import PROJECT_ROOT
from ..datapath.podconfig import PROXY_GID, PROXY_UID
from ..errors import KernelError

if TYPE_CHECKING:  # pragma: no cover
    from ..harness.node import Pod

BUILD_SCRIPT = PROJECT_ROOT / "scripts" / "build-forwarder.sh"


def binary() -> str:
    """Path of the built forwarder (builds it on first use; seconds with gcc)."""
    proc = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise KernelError(f"building the capture forwarder failed: {proc.stderr.strip()[-300:]}")
    return proc.stdout.strip().splitlines()[-1]


class Forwarder:
    """A running forwarder in a pod (UID 1337, so its own connections are not captured)."""

    def __init__(self, pod: "Pod", *, capture: bool = True, static: tuple[tuple[int, str, int], ...] = (),
                 name: str = "forwarder") -> None:
        workdir = pod.workdir / name
        workdir.mkdir(mode=0o755, exist_ok=True)
        self.log_path = workdir / "forwarder.log"
        argv = [binary()]
        if not capture:
            argv.append("-n")
        for lport, ip, port in static:
            argv += ["-s", f"{lport}:{ip}:{port}"]
        self._log = open(self.log_path, "w")
        self.pod = pod
        self.proc = pod.spawn(argv, uid=PROXY_UID, gid=PROXY_GID, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise KernelError(f"capture forwarder in pod {self.pod.name} exited ({self.proc.returncode}): "
                                  f"{self.log_tail()}")
            if "ready" in self.log_tail():
                return
            time.sleep(0.02)
        raise KernelError(f"capture forwarder in pod {self.pod.name} not ready after {timeout}s")

    def log_tail(self) -> str:
        try:
            return Path(self.log_path).read_text()[-500:]
        except OSError:
            return ""

    def stop(self) -> int:
        """Stop it; returns the connections it accepted (its exit line), 0 if unknown."""
        for sig in (signal.SIGTERM, signal.SIGKILL):    # SIGTERM makes it print its counters
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=5)
        if not self._log.closed:
            self._log.close()
        m = re.search(r"accepted (\d+) failed (\d+)", self.log_tail())
        return int(m.group(1)) if m else 0
