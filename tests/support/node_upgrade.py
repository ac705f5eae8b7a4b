"""The node e2e's agent replacements under load (tests/test_node_e2e.py): load, sniffer, kernel state.

* :class:`Load`: requests host -> client pod (inbound capture) -> its app -> its sidecar (outbound
  capture) -> the plain server pod, in a thread, each checked for the original destination;
* :class:`Sniffer`: every SYN to the server's port in the server pod's netns with its TOS (the
  client app marks its sockets with TOS 0x20, Envoy does not copy it: such a SYN went around Envoy;
  Envoy pools its upstream connections, so captured requests add few SYNs or none, and the server's
  own app fetching itself is the control that a marked SYN is seen);
* :func:`datapath_state`: what the node's kernel runs and what is pinned (bpftool), per version;
* :func:`switch_of`: the agent's own account of its start-up (its log line) and the times around it.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

from istio_ebpf_plugin.datapath.build import PROGRAMS
from istio_ebpf_plugin.datapath.staging import staged
from istio_ebpf_plugin.harness.probe import PYTHON, wait_ready
from istio_ebpf_plugin.harness import upgrade_lab

from .node_scenario import APP_PORT, cgroup_programs, container_log_timed, netns_links, pod_pid, rfc3339, wait

PIN_ROOT = "/sys/fs/bpf/istio-ebpf"
APP_TOS = 0x20     # labimage/main.go AppTOS


class Load:
    """Sequential requests through the client pod until stopped; counts and the failures' texts."""

    def __init__(self, fetch: Callable[[], tuple[int, str]], server_ip: str) -> None:
        self.fetch, self.server_ip = fetch, server_ip
        self.ok = self.failed = self.refused = self.wrong = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = time.monotonic()

    def __enter__(self) -> "Load":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                code, body = self.fetch()
            except OSError as exc:
                code, body = 0, f"{type(exc).__name__}: {exc}"
            if code == 200:
                seen = json.loads(body)
                if seen.get("pod") != "server" or seen.get("local") != f"{self.server_ip}:{APP_PORT}":
                    self.wrong += 1        # reached something else than the original destination
                    self.errors.append(f"t={time.monotonic() - self.t0:.1f}s wrong destination {body[:150]}")
                else:
                    self.ok += 1
            else:
                self.failed += 1
                self.refused += "refused" in body.lower()
                self.errors.append(f"t={time.monotonic() - self.t0:.1f}s {code} {body[:150]}")
            time.sleep(0.02)

    def wait_more(self, n: int, what: str) -> None:
        target = self.ok + n
        wait(lambda: self.ok >= target, 120, f"{n} more requests {what}", interval=0.1)


class Sniffer:
    """``harness/tos_sniffer.py`` as root in the server pod's network namespace."""

    def __init__(self, lab: Any, ns: str) -> None:
        pid = pod_pid(lab, ns, "server", "app")
        self.proc = subprocess.Popen(["nsenter", f"--net=/proc/{pid}/ns/net", PYTHON, "-S",
                                      staged(Path(upgrade_lab.__file__).with_name("tos_sniffer.py")), str(APP_PORT)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.syns: list = []

    def __enter__(self) -> "Sniffer":
        wait_ready(self.proc, "SYN sniffer in the server pod")
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            out, _ = self.proc.communicate("stop\n", timeout=60)
            self.syns = json.loads(out.strip().splitlines()[-1])
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def app_syns(self, source: str) -> list:
        """SYNs from ``source`` marked by an app (not Envoy)."""
        return [s for s in self.syns if s[2] == APP_TOS and s[0] == source]


def _pinned_id(path: Path) -> int:
    out = subprocess.run(["bpftool", "-j", "prog", "show", "pinned", str(path)], capture_output=True, text=True,
                         check=True)
    return int(json.loads(out.stdout)["id"])


def prog_loaded(prog_id: int) -> bool:
    return subprocess.run(["bpftool", "prog", "show", "id", str(prog_id)], capture_output=True).returncode == 0


def datapath_state(lab: Any, kubepods: Path, client_pid: int) -> dict:
    """Pinned versions and state directories; per pinned program of the (single) version its id;
    the ids the kernel runs on kubepods (bpftool cgroup show) and in the client's netns (bpftool link)."""
    root = lab.in_node(PIN_ROOT)
    versions = sorted(p.name for p in (root / "versions").iterdir()) if (root / "versions").is_dir() else []
    pinned = {p.name: _pinned_id(p) for v in versions for p in sorted((root / "versions" / v / "progs").iterdir())}
    return {"versions": versions, "states": sorted(p.name for p in root.iterdir() if p.name.startswith("state-")),
            "pinned": pinned,
            "cgroup": sorted(p["id"] for p in cgroup_programs(kubepods)),
            "netns": sorted(link["prog_id"] for link in netns_links(client_pid))}


def only_version_problems(state: dict, version: str, previous: dict) -> list[str]:
    """Empty when only ``version`` is pinned and runs every hook, and ``previous``'s programs are freed."""
    out = []
    if state["versions"] != [version] or len(state["states"]) != 1:
        out.append(f"pins: versions {state['versions']}, state directories {state['states']}")
    want = sorted(state["pinned"][p.func] for p in PROGRAMS if p.target == "cgroup" and p.func in state["pinned"])
    if state["cgroup"] != want:
        out.append(f"kubepods runs {state['cgroup']}, the version's cgroup programs are {want}")
    inbound = state["pinned"].get("ie_inbound")
    if state["netns"] != [inbound]:
        out.append(f"client netns runs {state['netns']}, the version's ie_inbound is {inbound}")
    gone = set(previous["pinned"].values()) - set(state["pinned"].values())
    left = sorted(i for i in gone if prog_loaded(i))
    if left:
        out.append(f"programs of the previous version still loaded: {left}")
    return out


SWITCH_LINE = re.compile(r"capture runs on this version \((?P<version>[^,]+), .*start-up phases \(s from start\(\), "
                         r"exec: from the process start to start\(\)\): (?P<phases>\{.*\})")
PREPARED_LINE = re.compile(r"datapath (?P<version>\S+) (?P<what>compiled and pinned|already pinned) "
                           r"in (?P<s>[\d.]+) s")


def switch_of(lab: Any, pod: dict) -> dict:
    """The new agent's switch: its version and phases (its log), from its process start (exec + retired)
    and from the pod's start (kubelet's status.startTime, whole seconds, to the log line's time), and
    the prepare-datapath init container's compile."""
    found = wait(lambda: next(((t, m) for t, line in container_log_timed(lab, pod, "agent")
                               if (m := SWITCH_LINE.search(line))), None), 60, "the agent's switch log line")
    logged_at, m = found
    phases = json.loads(m.group("phases"))
    prep = next((p for _, line in container_log_timed(lab, pod, "prepare-datapath")
                 if (p := PREPARED_LINE.search(line))), None)
    started = rfc3339((pod.get("status") or {}).get("startTime") or "")
    return {"version": m.group("version"), "phases": phases,
            "process_to_retired_s": round(phases.get("exec", 0.0) + phases["retired"], 3),
            "pod_start_to_retired_s": round(logged_at - started, 2) if logged_at and started else None,
            "prepare": {"version": prep.group("version"), "compiled": prep.group("what").startswith("compiled"),
                        "seconds": float(prep.group("s"))} if prep else None}
