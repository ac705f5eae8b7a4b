"""Upgrade and rollback of the datapath under load, through real Envoy sidecars (issue #20).

Two builds that differ in a CONFIG map's value layout (``ISTIO_EBPF_DATAPATH_VARIANT``: words
appended to pod_cfg) run as separate agent processes (tests/programs/upgrade_agent.py) against one
pin root, one after the other, as a DaemonSet rollout replaces the agent pod: N -> N+1 -> N, or
N -> N+1 killed (SIGKILL) at one step of its switch -> the next start (N+1 again, or N: rollback).
All along an app in the client pod sends HTTP (IPv4, IPv6) and DNS (connected UDP, both families)
through the client's and the server's Envoy, its sockets marked with a TOS Envoy does not copy
(tests/programs/upgrade_load.py), while a sniffer in the server's netns records every SYN to the
server port (tests/programs/tos_sniffer.py). Asserted: 0 failed requests or DNS queries; 0 SYNs
with the app's TOS at the server (every connection went through the client's Envoy); every request
reached the app from 127.0.0.6/::6 (through the server's Envoy) at the address the app dialled
(the original destination both Envoys were told) and the app saw that address as its peer; after
each switch the kernel runs only the new version's programs on every hook and only its pins exist.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from istio_ebpf_plugin.datapath import libbpf
from istio_ebpf_plugin.datapath.build import PROGRAMS, VARIANT_ENV
from istio_ebpf_plugin.datapath.failpoint import ENV as FAILPOINT_ENV
from istio_ebpf_plugin.datapath.podconfig import PROXY_UID
from istio_ebpf_plugin.datapath.staging import staged
from istio_ebpf_plugin.harness.probe import PYTHON, wait_ready
from istio_ebpf_plugin.timeouts import scaled
from support.datapath_modes import require_mode
from support.fake_kube import fixture_pod
from support.polling import wait_for

pytestmark = pytest.mark.kernel

PROGRAMS_DIR = Path(__file__).resolve().parent / "programs"
NODE = "upgrade-node"
PORT = 8080
APP_TOS = 0x20
DNS_CAPTURE = 'proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: "true"\n'


@pytest.fixture
def cluster():
    from istio_ebpf_plugin.harness.apps import start_http_server
    from istio_ebpf_plugin.harness.node import Node

    with Node() as node:
        client, server = node.add_pod("cli"), node.add_pod("srv")
        start_http_server(server, PORT)
        for pod in (client, server):
            pod.start_envoy()
        echo = client.spawn([PYTHON, "-S", staged(PROGRAMS_DIR / "udp_echo.py"), "15053"], uid=PROXY_UID,
                            gid=PROXY_UID, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_ready(echo, "DNS proxy stand-in")
        annotations = {"istio-ebpf.io/redirect": "ebpf", "proxy.istio.io/config": DNS_CAPTURE}
        pods = [fixture_pod("master/inject/hello.yaml.injected", p.name, NODE, list(p.pod_ips),
                            annotations=annotations) for p in (client, server)]
        cgroups = {pod["metadata"]["uid"]: str(p.cgroup_path) for pod, p in zip(pods, (client, server), strict=True)}
        yield node, client, server, pods, cgroups


class Agent:
    """One agent process of one build variant (optionally with a failpoint)."""

    def __init__(self, variant: int, args: dict, failpoint: str | None = None) -> None:
        env = {**os.environ, VARIANT_ENV: str(variant)}
        env.pop(FAILPOINT_ENV, None)
        if failpoint:
            env[FAILPOINT_ENV] = failpoint
        self.variant = variant
        self.log = Path(args["log"])
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, str(PROGRAMS_DIR / "upgrade_agent.py"), json.dumps(args)],
                                         env=env, stdout=subprocess.PIPE, stderr=log, text=True)
        self.ready: dict = {}

    def wait_ready(self) -> dict:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + scaled(240)
        while time.monotonic() < deadline:
            if select.select([self.proc.stdout], [], [], 1)[0]:
                line = self.proc.stdout.readline()
                if line.startswith("READY "):
                    self.ready = json.loads(line[6:])
                    return self.ready
                if not line:
                    break
        raise AssertionError(f"agent (variant {self.variant}) not ready: rc={self.proc.poll()}, "
                             f"log tail: {self.log.read_text()[-1500:]}")

    def wait_killed(self) -> int:
        """A failpoint kills the process itself: its exit status."""
        return self.proc.wait(timeout=scaled(240))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


def _hooks(node, pods, programs: dict[str, int]) -> dict[str, list[int]]:
    """What the kernel runs on every hook we use, minus what it should run (empty: as it should)."""
    wrong = {}
    fd = os.open(str(node.parent_cgroup), os.O_RDONLY)
    try:
        for p in PROGRAMS:
            if p.target == "cgroup":
                got = libbpf.prog_query(fd, p.attach_type)
                want = [programs[p.func]] if p.func in programs else []
                if got != want:
                    wrong[p.func] = got
    finally:
        os.close(fd)
    for pod in pods:
        fd = os.open(pod.netns_path, os.O_RDONLY)
        try:
            got = libbpf.prog_query(fd, libbpf.SK_LOOKUP)
        finally:
            os.close(fd)
        if got != [programs["ie_inbound"]]:
            wrong[f"ie_inbound@{pod.name}"] = got
    return wrong


def _prog_exists(prog_id: int) -> bool:
    try:
        fd = libbpf.prog_fd_by_id(prog_id)
    except OSError:
        return False
    os.close(fd)
    return True


def _bpftool_cgroup_ids(cgroup: str) -> set[int]:
    out = subprocess.run(["bpftool", "-j", "cgroup", "show", cgroup], capture_output=True, text=True, check=True)
    return {int(p["id"]) for p in json.loads(out.stdout or "[]")}


def _check_only(agent: Agent, node, pods, root: str, retired: list[dict]) -> None:
    programs = agent.ready["programs"]
    assert not _hooks(node, pods, programs), _hooks(node, pods, programs)
    assert _bpftool_cgroup_ids(str(node.parent_cgroup)) == {
        programs[p.func] for p in PROGRAMS if p.target == "cgroup" and p.func in programs}
    assert [p.name for p in (Path(root) / "versions").iterdir()] == [agent.ready["version"]]
    assert len([p for p in Path(root).iterdir() if p.name.startswith("state-")]) == 1
    gone = {i for r in retired for i in r["programs"].values()} - set(programs.values())
    wait_for(lambda: not any(_prog_exists(i) for i in gone), scaled(30), "retired programs freed")


def _run(cluster, pin_root: str, mode: str, tmp_path: Path, steps: list[tuple[int, str | None]]) -> dict:
    """Start agents in order (variant, failpoint) under load; returns the load and sniffer results."""
    node, client, server, pods, cgroups = cluster
    require_mode(mode)
    args = {"pods": pods, "cgroups": cgroups, "log": str(tmp_path / "agents.log"),
            "config": {"node_name": NODE, "mode_override": mode, "pin_root": pin_root,
                       "cgroup_root": str(node.parent_cgroup), "retry_seconds": 0.05, "watch_timeout": 1}}
    first = Agent(steps[0][0], args)
    try:
        first.wait_ready()
    except BaseException:
        first.kill()
        raise
    sniffer = server.spawn([PYTHON, "-S", staged(PROGRAMS_DIR / "tos_sniffer.py"), str(PORT)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_ready(sniffer, "SYN sniffer")
    targets = [f"{server.ipv4},{PORT}", f"{server.ipv6},{PORT}", f"dns:{server.ipv4}", f"dns:{server.ipv6}"]
    load = client.spawn([PYTHON, "-S", staged(PROGRAMS_DIR / "upgrade_load.py"), str(APP_TOS), *targets],
                        uid=1000, gid=1000, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True)
    wait_ready(load, "load")
    agents, switches, current = [first], [], first
    try:
        time.sleep(2)
        for variant, failpoint in steps[1:]:
            current.kill()     # the rollout deletes the old pod (pins stay)
            agent = Agent(variant, args, failpoint)
            agents.append(agent)
            if failpoint:
                assert agent.wait_killed() == -signal.SIGKILL, f"failpoint {failpoint} not reached"
                time.sleep(1)   # hooks as the crash left them, under load
                continue
            agent.wait_ready()
            _check_only(agent, node, (client, server), pin_root, [a.ready for a in agents[:-1] if a.ready])
            switches.append(agent.ready["switch"])
            current = agent
            time.sleep(2)
    finally:
        outputs = {}
        for name, proc in (("load", load), ("sniffer", sniffer)):
            try:
                out, err = proc.communicate("stop\n", timeout=scaled(60))
                outputs[name] = json.loads(out.strip().splitlines()[-1])
            except Exception as exc:   # noqa: BLE001 - reported below with the stderr
                proc.kill()
                outputs[name] = {"error": repr(exc)}
        for agent in agents:
            agent.kill()
    return {"load": outputs["load"], "syns": outputs["sniffer"], "switches": switches,
            "pod_counters": [a.ready["pod_counters"] for a in agents if a.ready]}


def _assert_clean(result: dict) -> None:
    load, syns = result["load"], result["syns"]
    assert "error" not in load and "error" not in syns, result
    uncaptured = [s for s in syns if s[2] == APP_TOS]
    print(f"requests {load['requests']} ok {load['ok']} dns {load['dns']}, SYNs at the server {len(syns)}, "
          f"uncaptured {len(uncaptured)}; switch phases {result['switches']}")
    assert load["ok"] > 20 and load["dns"] > 20, load
    assert not load["failed"] and not load["dns_failed"], (load["failed"][:5], load["dns_failed"][:5])
    assert not uncaptured, uncaptured[:5]
    for key in ("view_wrong", "server_peer_wrong", "server_local_wrong"):
        assert not load[key], (key, load[key][:5])


@pytest.mark.parametrize("mode", ["cookie", "podip"])
def test_upgrade_and_rollback_under_load(cluster, pin_root, tmp_path, mode):
    """N -> N+1 -> N: no failed request, no SYN without Envoy, right original destinations. Each
    pod's counters go on from where the retired version left them (its pod_cfg is another size)."""
    result = _run(cluster, pin_root, mode, tmp_path, [(0, None), (1, None), (0, None)])
    _assert_clean(result)
    # READY comes milliseconds after the takeover: what a new version shows then is what it carried
    # (the load ran for seconds under the version before), and it never goes back.
    seen = result["pod_counters"]
    assert len(seen) == 3
    for before, after in zip(seen[:-1], seen[1:], strict=True):
        assert set(after) == set(before) and max(c["out_captured_cidr"] for c in after.values()) >= 5, after
        for handle, counts in before.items():
            assert all(after[handle][k] >= v for k, v in counts.items()), (handle, counts, after[handle])


@pytest.mark.parametrize("mode", ["cookie", "podip"])
@pytest.mark.parametrize("failpoint,then", [("loaded", 1), ("filled", 0), ("takeover-3", 0), ("takeover-3", 1),
                                            ("retire-2", 1), ("retire-2", 0)])
def test_upgrade_killed_at_each_step_then_finished_or_rolled_back(cluster, pin_root, tmp_path, mode, failpoint,
                                                                   then):
    """N+1 is SIGKILLed at one step of its switch (hooks may be mixed: both versions' config maps
    hold the pods); the next start, N+1 again or N (rollback), finishes with the same guarantees."""
    result = _run(cluster, pin_root, mode, tmp_path, [(0, None), (1, failpoint), (then, None)])
    _assert_clean(result)


def test_upgrade_switch_time_with_100_pods():
    """100 opted-in pods' entries (real netns, the real loader): first start, restart, upgrade to
    the other build variant, rollback. The upgrade's phases (from the new agent's start): loaded
    (compile beside the running version), filled (100 pods in its config maps), took_over (every
    link retargeted), retired. The figures go into docs/agent.md."""
    from support.agent_scale import measure

    r = measure(100, upgrade=True)
    print(json.dumps({k: r[k] for k in ("upgrade", "rollback")}, indent=1))
    assert r["upgrade"]["version"] != r["first_start"]["version"] == r["rollback"]["version"]
    for run in ("upgrade", "rollback"):
        x = r[run]
        assert x["pods_managed"] == 100 and x["occupancy"] == r["first_start"]["occupancy"]
        phases = x["switch"]
        assert phases["lock"] <= phases["loaded"] <= phases["filled"] <= phases["took_over"] <= phases["retired"]
        # From "every pod is in the new maps" to "the old version is gone": the hooks switch.
        assert phases["retired"] - phases["loaded"] <= 2.0, phases
