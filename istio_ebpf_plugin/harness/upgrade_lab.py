"""An upgrade of the datapath under load on lab pods (tests/test_upgrade_lab.py, ``istio-ebpf bench --agent``).

Two pods (client, server) with real Envoy sidecars on a lab node; an app in the client sends HTTP
(IPv4, IPv6) and DNS (connected UDP, both families) through both Envoys (``upgrade_load.py``), its
sockets marked with a TOS Envoy does not copy; a sniffer in the server's netns records every SYN to
the server port (``tos_sniffer.py``). Agents of two build variants (``ISTIO_EBPF_DATAPATH_VARIANT``:
another pod_cfg layout, another datapath version) run one after the other as separate processes
(``lab_agent.py``) against one pin root, as a DaemonSet rollout replaces the agent pod: the running
one is SIGKILLed (its pins stay), then optionally ``agent --prepare`` (the init container) compiles
the next version beside the pins, then the next agent starts; a step with a failpoint kills itself
at that step of its switch.

:meth:`UpgradeLab.run` returns the load's and the sniffer's figures and, per switch, its timing and
what the kernel runs afterwards (``problems``: empty when every hook runs only the new version's
programs, the retired ones are freed, and only the new version's pins exist).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .. import OPT_IN_ANNOTATION, OPT_IN_VALUE
from ..datapath import libbpf
from ..datapath.build import PROGRAMS, VARIANT_ENV
from ..datapath.failpoint import ENV as FAILPOINT_ENV
from ..datapath.podconfig import PROXY_UID
from ..datapath.staging import staged
from ..errors import KernelError
from ..timeouts import scaled
from .apps import APP_GID, APP_UID, start_http_server
from .node import Node
from .probe import PYTHON, wait_ready

HERE = Path(__file__).resolve().parent
NODE = "upgrade-node"
PORT = 8080
APP_TOS = 0x20
DNS_CAPTURE = 'proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: "true"\n'
AGENT_TIMEOUT_S = 240.0


@dataclass(frozen=True)
class Step:
    variant: int                       # build variant of this agent (0: N, 1: N+1)
    failpoint: str | None = None       # the agent kills itself there (datapath/failpoint.py)
    prepare: bool = False              # ``agent --prepare`` first, as the DaemonSet's init container


def sidecar_pod(name: str, node: str, ips: list[str], annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """An opted-in pod as Istio 1.14's injector writes what the agent reads: istio-init with the
    chart's default istio-iptables arguments, the istio-proxy sidecar, the injector's status."""
    proxy = "docker.io/istio/proxyv2:1.14.0"
    status = {"initContainers": ["istio-init"], "containers": ["istio-proxy"], "volumes": [], "imagePullSecrets": None}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "uid": str(uuid.uuid4()),
                         "annotations": {OPT_IN_ANNOTATION: OPT_IN_VALUE, "sidecar.istio.io/status": json.dumps(status),
                                         **(annotations or {})}},
            "spec": {"nodeName": node,
                     "initContainers": [{"name": "istio-init", "image": proxy, "args": [
                         "istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*",
                         "-x", "", "-b", "*", "-d", "15090,15021,15020"]}],
                     "containers": [{"name": "app", "image": "app"},
                                    {"name": "istio-proxy", "image": proxy, "args": ["proxy", "sidecar"]}]},
            "status": {"phase": "Running", "podIP": ips[0], "podIPs": [{"ip": ip} for ip in ips]}}


#: (name, node, ips, annotations) -> pod object; tests pass Istio's own injected fixtures
PodObject = Callable[[str, str, list[str], dict[str, str]], dict[str, Any]]


class LabAgent:
    """One agent process of one build variant (``lab_agent.py``)."""

    def __init__(self, variant: int, args: dict, failpoint: str | None = None, prepare: bool = False) -> None:
        env = {**os.environ, VARIANT_ENV: str(variant)}
        env.pop(FAILPOINT_ENV, None)
        if failpoint:
            env[FAILPOINT_ENV] = failpoint
        self.variant = variant
        self.log = Path(args["log"])
        self.spawned_at = time.monotonic()
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "istio_ebpf_plugin.harness.lab_agent",
                                          json.dumps({**args, "prepare": prepare})],
                                         env=env, stdout=subprocess.PIPE, stderr=log, text=True)
        self.ready: dict = {}

    def wait_line(self, mark: str) -> dict:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + scaled(AGENT_TIMEOUT_S)
        while time.monotonic() < deadline:
            if select.select([self.proc.stdout], [], [], 1)[0]:
                line = self.proc.stdout.readline()
                if line.startswith(mark + " "):
                    return json.loads(line[len(mark) + 1:])
                if not line:
                    break
        raise KernelError(f"agent (variant {self.variant}) printed no {mark}: rc={self.proc.poll()}, "
                          f"log tail: {self.log.read_text()[-1500:]}")

    def wait_ready(self) -> dict:
        self.ready = self.wait_line("READY")
        return self.ready

    def wait_killed(self) -> int:
        """A failpoint kills the process itself: its exit status."""
        return self.proc.wait(timeout=scaled(AGENT_TIMEOUT_S))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


def _prog_exists(prog_id: int) -> bool:
    try:
        fd = libbpf.prog_fd_by_id(prog_id)
    except OSError:
        return False
    os.close(fd)
    return True


class UpgradeLab:
    def __init__(self, mode: str, pin_root: str, log: Path, pod_object: PodObject | None = None) -> None:
        self.mode, self.pin_root, self.log = mode, pin_root, log
        self.pod_object = pod_object or sidecar_pod
        self.node: Node | None = None

    def __enter__(self) -> "UpgradeLab":
        self.node = node = Node().__enter__()
        try:
            self.client, self.server = client, server = node.add_pod("cli"), node.add_pod("srv")
            start_http_server(server, PORT)
            for pod in (client, server):
                pod.start_envoy()
            echo = client.spawn([PYTHON, "-S", staged(HERE / "udp_echo.py"), "15053"], uid=PROXY_UID,
                                gid=PROXY_UID, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            wait_ready(echo, "DNS proxy stand-in")
            annotations = {OPT_IN_ANNOTATION: OPT_IN_VALUE, "proxy.istio.io/config": DNS_CAPTURE}
            self.pods = [self.pod_object(p.name, NODE, list(p.pod_ips), annotations) for p in (client, server)]
            self.cgroups = {pod["metadata"]["uid"]: str(p.cgroup_path)
                            for pod, p in zip(self.pods, (client, server), strict=True)}
        except BaseException:
            node.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.node is not None:
            self.node.close()

    def agent_args(self) -> dict:
        assert self.node is not None
        return {"pods": self.pods, "cgroups": self.cgroups, "log": str(self.log),
                "config": {"node_name": NODE, "mode_override": self.mode, "pin_root": self.pin_root,
                           "cgroup_root": str(self.node.parent_cgroup), "retry_seconds": 0.05, "watch_timeout": 1}}

    # ---- what the kernel runs
    def wrong_hooks(self, programs: dict[str, int]) -> dict[str, list[int]]:
        """What the kernel runs on every hook we use, where it is not exactly ``programs``."""
        assert self.node is not None
        wrong = {}
        fd = os.open(str(self.node.parent_cgroup), os.O_RDONLY)
        try:
            for p in PROGRAMS:
                if p.target == "cgroup":
                    got = libbpf.prog_query(fd, p.attach_type)
                    if got != ([programs[p.func]] if p.func in programs else []):
                        wrong[p.func] = got
        finally:
            os.close(fd)
        for pod in (self.client, self.server):
            fd = os.open(pod.netns_path, os.O_RDONLY)
            try:
                got = libbpf.prog_query(fd, libbpf.SK_LOOKUP)
            finally:
                os.close(fd)
            if got != [programs["ie_inbound"]]:
                wrong[f"ie_inbound@{pod.name}"] = got
        return wrong

    def problems_after(self, agent: LabAgent, retired: list[dict]) -> list[str]:
        """Empty when only ``agent``'s version runs and is pinned, and every retired program is freed."""
        assert self.node is not None
        programs, out = agent.ready["programs"], []
        wrong = self.wrong_hooks(programs)
        if wrong:
            out.append(f"hooks not running only the new version: {wrong}")
        shown = subprocess.run(["bpftool", "-j", "cgroup", "show", str(self.node.parent_cgroup)],
                               capture_output=True, text=True, check=True)
        ids = {int(p["id"]) for p in json.loads(shown.stdout or "[]")}
        want = {programs[p.func] for p in PROGRAMS if p.target == "cgroup" and p.func in programs}
        if ids != want:
            out.append(f"bpftool cgroup show: {sorted(ids)}, expected {sorted(want)}")
        versions = sorted(p.name for p in (Path(self.pin_root) / "versions").iterdir())
        if versions != [agent.ready["version"]]:
            out.append(f"pinned versions {versions}, expected only {agent.ready['version']}")
        states = [p.name for p in Path(self.pin_root).iterdir() if p.name.startswith("state-")]
        if len(states) != 1:
            out.append(f"state directories {states}")
        gone = {i for r in retired for i in r["programs"].values()} - set(programs.values())
        deadline = time.monotonic() + scaled(30)
        while any(_prog_exists(i) for i in gone) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = sorted(i for i in gone if _prog_exists(i))
        if left:
            out.append(f"retired programs still loaded: {left}")
        return out

    # ---- the run
    def run(self, steps: list[Step], settle: float = 2.0, progress: Callable[[str], None] = lambda _: None) -> dict:
        """Start agents in order under load. Returns {"load", "syns", "failed", "uncaptured", "pod_counters"
        (per agent that got ready: pod handle -> its counters then), "switches": [{"variant", "switch",
        "compiled", "process_to_retired_s", "prepare", "prepare_to_retired_s", "problems"}]}."""
        assert self.node is not None
        args = self.agent_args()
        first = LabAgent(steps[0].variant, args)
        try:
            first.wait_ready()
        except BaseException:
            first.kill()
            raise
        sniffer = self.server.spawn([PYTHON, "-S", staged(HERE / "tos_sniffer.py"), str(PORT)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_ready(sniffer, "SYN sniffer")
        targets = [f"{self.server.ipv4},{PORT}", f"{self.server.ipv6},{PORT}", f"dns:{self.server.ipv4}",
                   f"dns:{self.server.ipv6}"]
        load = self.client.spawn([PYTHON, "-S", staged(HERE / "upgrade_load.py"), str(APP_TOS), *targets],
                                 uid=APP_UID, gid=APP_GID, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        wait_ready(load, "load")
        agents, switches, current = [first], [], first
        try:
            time.sleep(settle)     # steady load through the first version
            for step in steps[1:]:
                current.kill()     # the rollout deletes the old pod (pins stay)
                prepared, prep = None, None
                if step.prepare:
                    prep = LabAgent(step.variant, args, prepare=True)
                    agents.append(prep)
                    prepared = prep.wait_line("PREPARED")
                    prep.proc.wait(timeout=scaled(30))
                    still = self.wrong_hooks(current.ready["programs"])
                    if still:
                        raise KernelError(f"agent --prepare changed what the hooks run: {still}")
                agent = LabAgent(step.variant, args, step.failpoint)
                agents.append(agent)
                if step.failpoint:
                    rc = agent.wait_killed()
                    if rc != -signal.SIGKILL:
                        raise KernelError(f"failpoint {step.failpoint} not reached (exit {rc})")
                    progress(f"upgrade lab: variant {step.variant} killed at {step.failpoint}")
                    time.sleep(1)   # hooks as the crash left them, under load
                    continue
                agent.wait_ready()
                r = agent.ready
                switch = {"variant": step.variant, "switch": r["switch"], "compiled": r["compiled"],
                          "process_to_retired_s": round(r["retired_at"] - agent.spawned_at, 3)
                          if r.get("retired_at") is not None else None, "prepare": prepared,
                          # as from the pod's start: the init container's process start -> retired
                          "prepare_to_retired_s": round(r["retired_at"] - prep.spawned_at, 3)
                          if prep is not None and r.get("retired_at") is not None else None,
                          "problems": self.problems_after(agent, [a.ready for a in agents[:-1] if a.ready])}
                switches.append(switch)
                progress(f"upgrade lab: variant {step.variant} took over: {json.dumps(switch)}")
                current = agent
                time.sleep(settle)
        finally:
            outputs = {}
            for name, proc in (("load", load), ("sniffer", sniffer)):
                try:
                    out, _ = proc.communicate("stop\n", timeout=scaled(60))
                    outputs[name] = json.loads(out.strip().splitlines()[-1])
                except Exception as exc:   # noqa: BLE001 - reported in the result
                    proc.kill()
                    outputs[name] = {"error": repr(exc)}
            for a in agents:
                a.kill()
        res, syns = outputs["load"], outputs["sniffer"]
        failed = len(res.get("failed", [])) + len(res.get("dns_failed", [])) if "error" not in res else None
        uncaptured = sum(1 for s in syns if s[2] == APP_TOS) if isinstance(syns, list) else None
        return {"load": res, "syns": syns, "failed": failed, "uncaptured": uncaptured, "switches": switches,
                "pod_counters": [a.ready["pod_counters"] for a in agents if a.ready]}
