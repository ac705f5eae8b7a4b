"""``istio-ebpf bench --agent``: the real agent's RSS and its time to capture, fresh and restarted.

The agent (``istio-ebpf agent``) runs as a process of its own, without a Kubernetes API (its
publishing and pod watch retry in the background), attached to an empty test cgroup with a
test pin root. "Capturing" is what its ``/readyz`` reports once the programs are attached
(after that, a pod the watch delivers is captured as soon as its maps are written):

* fresh: no pins, no probe cache: probes and the datapath are compiled (in a worker process);
* restart: the same agent started again over the pins and the probe cache it left: it adopts.

RSS is the agent process's VmRSS once attached (the BCC worker has exited by then).
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from pathlib import Path

from .. import PROJECT_ROOT
from ..datapath.loader import cleanup_pins
from ..errors import KernelError
from ..harness import names
from ..harness.ports import free_port

ATTACHED_TIMEOUT_S = 180.0


def _readyz(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
            return r.read().decode()
    except OSError as exc:          # HTTPError (503 while not ready) carries the body too
        body = getattr(exc, "read", None)
        return body().decode() if body else ""


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _start_once(pin_root: str, cgroup: Path, log_path: Path) -> dict:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    env["KUBECONFIG"] = "/nonexistent"           # no API: publishing and the watch just retry
    argv = [str(PROJECT_ROOT / ".venv" / "bin" / "istio-ebpf"), "agent", "--node-name", "bench-footprint",
            "--pin-root", pin_root, "--cgroup-root", str(cgroup), "--health-host", "127.0.0.1",
            "--health-port", str(port)]
    started = time.monotonic()
    log = open(log_path, "a")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = started + ATTACHED_TIMEOUT_S
        state = ""
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise KernelError(f"agent exited ({proc.returncode}): {log_path.read_text()[-300:]}")
            state = _readyz(port)
            if state and "selecting mode" not in state and "not attached" not in state:
                break
            time.sleep(0.02)
        else:
            raise KernelError(f"agent not attached after {ATTACHED_TIMEOUT_S:.0f}s ({state})")
        to_capture = time.monotonic() - started
        time.sleep(1.0)                              # settle: threads started, worker reaped
        return {"to_capture_s": round(to_capture, 3), "rss_mib": round(_rss_mib(proc.pid), 1), "state": state}
    finally:
        proc.terminate()                             # SIGTERM: the agent leaves its pins in place
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        log.close()


def measure() -> dict:
    """Fresh start, then restart over the pins; everything removed afterwards."""
    token = names.new_token()
    pin_root = str(names.BPFFS_ROOT / f"{names.BPF_PIN_PREFIX}-agent-{token}")
    cgroup = names.cgroup_v2_root() / f"{names.CGROUP_PREFIX}{token}-agent"
    log_path = names.TMP_ROOT / f"{names.TMP_PREFIX}{token}-agent.log"
    cgroup.mkdir()
    try:
        fresh = _start_once(pin_root, cgroup, log_path)
        restart = _start_once(pin_root, cgroup, log_path)
    finally:
        cleanup_pins(pin_root)
        cgroup.rmdir()
        log_path.unlink(missing_ok=True)
    return {"agent_rss_mib": max(fresh["rss_mib"], restart["rss_mib"]),
            "agent_rss_mib_fresh": fresh["rss_mib"], "agent_rss_mib_restart": restart["rss_mib"],
            "agent_start_to_capture_s": fresh["to_capture_s"],
            "agent_restart_to_capture_s": restart["to_capture_s"]}
