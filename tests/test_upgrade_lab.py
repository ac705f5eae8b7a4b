"""Upgrade and rollback of the datapath under load, through real Envoy sidecars (issue #20).

The lab's upgrade runner (``istio_ebpf_plugin/harness/upgrade_lab.py``): two builds that differ in
a CONFIG map's value layout (``ISTIO_EBPF_DATAPATH_VARIANT``: words appended to pod_cfg) run as
separate agent processes against one pin root, one after the other, as a DaemonSet rollout
replaces the agent pod: N -> N+1 -> N (each preceded by ``agent --prepare``, the init container),
or N -> N+1 killed (SIGKILL) at one step of its switch -> the next start (N+1 again, or N:
rollback). All along an app in the client pod sends HTTP (IPv4, IPv6) and DNS (connected UDP,
both families) through the client's and the server's Envoy, its sockets marked with a TOS Envoy
does not copy, while a sniffer in the server's netns records every SYN to the server port. The
pods are Istio's own injected ``hello`` fixture. Asserted: 0 failed requests or DNS queries; 0
SYNs with the app's TOS at the server (every connection went through the client's Envoy); every
request reached the app from 127.0.0.6/::6 (through the server's Envoy) at the address the app
dialled (the original destination both Envoys were told) and the app saw that address as its
peer; after each switch the kernel runs only the new version's programs on every hook (kernel
query and ``bpftool cgroup show``), the retired ones are freed and only the new version's pins exist.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from istio_ebpf_plugin.harness.upgrade_lab import Step, UpgradeLab
from support.datapath_modes import require_mode
from support.fake_kube import fixture_pod

pytestmark = pytest.mark.kernel


def _istio_pod(name: str, node: str, ips: list[str], annotations: dict[str, str]) -> dict:
    return fixture_pod("master/inject/hello.yaml.injected", name, node, ips, annotations=annotations)


def _run(pin_root: str, mode: str, tmp_path: Path, steps: list[Step]) -> dict:
    require_mode(mode)
    with UpgradeLab(mode, pin_root, tmp_path / "agents.log", _istio_pod) as lab:
        return lab.run(steps, progress=print)


def _assert_clean(result: dict) -> None:
    load, syns = result["load"], result["syns"]
    assert "error" not in load and "error" not in syns, result
    print(f"requests {load['requests']} ok {load['ok']} dns {load['dns']}, SYNs at the server {len(syns)}, "
          f"uncaptured {result['uncaptured']}; switches {json.dumps(result['switches'])}")
    assert load["ok"] > 20 and load["dns"] > 20, load
    assert not load["failed"] and not load["dns_failed"], (load["failed"][:5], load["dns_failed"][:5])
    assert result["failed"] == 0 and result["uncaptured"] == 0, [s for s in syns if s[2] == 0x20][:5]
    for key in ("view_wrong", "server_peer_wrong", "server_local_wrong"):
        assert not load[key], (key, load[key][:5])
    for switch in result["switches"]:
        assert not switch["problems"], switch


@pytest.mark.parametrize("mode", ["cookie", "podip"])
def test_upgrade_and_rollback_under_load(pin_root, tmp_path, mode):
    """N -> N+1 -> N as the DaemonSet rolls (init container ``agent --prepare``, then the agent):
    no failed request, no SYN without Envoy, right original destinations; the agents adopt what
    the prepare step pinned (no compile in their switch) and the prepare step changes no hook.
    Each pod's counters go on from where the retired version left them (its pod_cfg is another size)."""
    result = _run(pin_root, mode, tmp_path, [Step(0), Step(1, prepare=True), Step(0, prepare=True)])
    _assert_clean(result)
    assert len(result["switches"]) == 2
    for switch in result["switches"]:
        assert switch["prepare"]["compiled"] and not switch["compiled"], switch
    # READY comes milliseconds after the takeover: what a new version shows then is what it carried
    # (the load ran for seconds under the version before), and it never goes back.
    seen = result["pod_counters"]
    assert len(seen) == 3
    for before, after in zip(seen[:-1], seen[1:], strict=True):
        assert set(after) == set(before) and max(c["out_captured_cidr"] for c in after.values()) >= 5, after
        for handle, counts in before.items():
            assert all(after[handle][k] >= v for k, v in counts.items()), (handle, counts, after[handle])


@pytest.mark.parametrize("mode", ["cookie", "podip"])
@pytest.mark.parametrize("failpoint,then", [("loaded", 1), ("loaded", 0), ("filled", 0), ("filled", 1),
                                            ("takeover-3", 0), ("takeover-3", 1), ("retire-2", 1), ("retire-2", 0)])
def test_upgrade_killed_at_each_step_then_finished_or_rolled_back(pin_root, tmp_path, mode, failpoint, then):
    """N+1 is SIGKILLed at one step of its switch (hooks may be mixed: both versions' config maps
    hold the pods); the next start, N+1 again or N (rollback), finishes with the same guarantees.
    No prepare step here: the agent compiles itself, so "loaded" is a crash right after the compile."""
    result = _run(pin_root, mode, tmp_path, [Step(0), Step(1, failpoint), Step(then)])
    _assert_clean(result)


def test_upgrade_switch_time_with_100_pods(record_property):
    """100 opted-in pods' entries (real netns, the real loader): first start, restart, upgrade to
    the other build variant, rollback, each upgrade as the DaemonSet runs it: ``agent --prepare``
    (the init container) compiles the new version beside the running one, then the agent process
    adopts it. The agent's phases from its start(): loaded (adopted), filled (100 pods in its config
    maps), took_over (every link retargeted), retired; ``exec``: process start -> start(). The
    figures go into docs/agent.md.

    The issue's goal, at most 2 s from the process's spawn to the old version's retirement, is
    printed and recorded (``spawn_to_retired_seconds``), not asserted: it is 0.4-0.6 s at load 4-7,
    but 1.6-1.8 s with the test held to 0.2 CPU (what a process gets at load 10 on 2 CPUs), too
    close to the goal for a bound that must hold on a loaded CI machine. Asserted instead: no
    compile in the switch and 2 s from start() (the interpreter's start and imports excluded)."""
    from support.agent_scale import measure

    r = measure(100, upgrade=True)
    print(json.dumps({k: r[k] for k in ("upgrade_prepare", "upgrade", "rollback_prepare", "rollback")}, indent=1))
    spawn = {run: r[run]["spawn_to_retired_seconds"] for run in ("upgrade", "rollback")}
    print(f"switch from the agent process's spawn to retirement (goal 2 s): {spawn}, "
          f"load average {os.getloadavg()[0]:.1f}")
    for run, seconds in spawn.items():
        record_property(f"{run}_spawn_to_retired_seconds", seconds)
    assert r["upgrade"]["version"] != r["first_start"]["version"] == r["rollback"]["version"]
    for run in ("upgrade", "rollback"):
        x, prep = r[run], r[f"{run}_prepare"]
        assert prep["compiled"] and prep["version"] == x["version"], prep
        assert x["pods_managed"] == 100 and x["occupancy"] == r["first_start"]["occupancy"]
        assert not x["compiled"], x       # the agent adopted what the prepare step pinned
        phases = x["switch"]
        assert phases["lock"] <= phases["loaded"] <= phases["filled"] <= phases["took_over"] <= phases["retired"]
        # No compile inside the switch: from the agent's start() to the old version's retirement
        # (the goal is 2 s from the process start; the figures are printed above and measured quiet).
        assert phases["retired"] <= 2.0, phases


def test_prepare_command_compiles_once_and_attaches_nothing(pin_root):
    """`istio-ebpf agent --prepare` as the init container runs it: compiles and pins a version and
    links nothing; run again (a same-version restart), it finds the pins complete."""
    import subprocess
    import sys

    from support.datapath_modes import host_mode

    argv = [str(Path(sys.executable).with_name("istio-ebpf")), "agent", "--prepare", "--pin-root", pin_root,
            "--mode", host_mode(), "--node-name", "prepare-test"]
    first = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    again = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    print(first.stdout.strip(), "|", again.stdout.strip())
    assert "compiled and pinned" in first.stdout and "nothing attached" in first.stdout, first.stdout
    assert "already pinned" in again.stdout, again.stdout
    root = Path(pin_root)
    assert len(list((root / "versions").iterdir())) == 1
    assert not list(root.glob("links/*"))      # no link: nothing attached
