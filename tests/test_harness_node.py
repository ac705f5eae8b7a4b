"""The pod harness itself: namespaces, cgroups, credentials, addressing, teardown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from istio_ebpf_plugin.harness import Node, cleanup, names
from istio_ebpf_plugin.harness.probe import start_probe_server

from support.polling import wait_for

pytestmark = pytest.mark.kernel
ROOT = Path(__file__).resolve().parents[1]


def test_pod_has_netns_cgroup_addresses_and_sysctls(node: Node) -> None:
    a = node.add_pod("a")
    assert Path(a.netns_path).exists() and a.netns.startswith("ie-")
    assert a.cgroup_path.parent == node.parent_cgroup
    assert node.parent_cgroup.name.startswith("istio-ebpf-test-")
    assert (a.cgroup_path / "cgroup.procs").exists()
    addrs = a.ns_exec(["ip", "-o", "addr", "show"]).stdout
    assert f"inet {a.ipv4}/24" in addrs and f"inet6 {a.ipv6}/64" in addrs
    assert "inet6 ::6/128" in addrs and "inet 127.0.0.1/8" in addrs
    sysctl = a.ns_exec(["sysctl", "-n", "net.ipv4.tcp_tw_reuse", "net.ipv4.ip_local_port_range"]).stdout.split()
    assert sysctl == ["1", "20000", "64999"]
    assert a.pod_ips == (a.ipv4, a.ipv6)


def test_spawn_joins_cgroup_before_exec_with_dropped_credentials(node: Node) -> None:
    a = node.add_pod("a")
    r = a.run(["sh", "-c", "cat /proc/self/cgroup; id -u; id -g; id -G; readlink /proc/self/ns/net"],
              uid=1000, gid=1000, check=True)
    lines = r.stdout.split("\n")
    rel = "/" + str(a.cgroup_path.relative_to(names.cgroup_v2_root()))
    assert f"0::{rel}" in lines
    assert lines[-5:-1][0:3] == ["1000", "1000", "1000"]   # uid, gid, no supplementary groups
    assert lines[-2] == "net:[%d]" % os.stat(a.netns_path).st_ino
    p = a.spawn(["sleep", "30"], uid=1337, gid=1337)
    # The event: sleep itself runs (sh joined the cgroup, nsenter dropped the credentials, exec'd).
    wait_for(lambda: Path(f"/proc/{p.pid}/comm").read_text().strip() == "sleep", what="sleep to be exec'd")
    assert p.pid in a.pids()   # the exec'd command keeps the pid that joined the cgroup
    status = Path(f"/proc/{p.pid}/status").read_text()
    assert "Uid:\t1337\t1337\t1337\t1337" in status and "Gid:\t1337\t1337\t1337\t1337" in status


def test_pods_reach_each_other_over_ipv4_and_ipv6(node: Node) -> None:
    a, b = node.add_pod("a"), node.add_pod("b")
    start_probe_server(b, targets=(8080,), sidecar_ports=False)
    for ip in (b.ipv4, b.ipv6):
        out = node.probe_connect(a, 1000, 1000, ip, 8080)
        assert (out.listener, out.pod, out.local) == ("direct", "b", (ip, 8080))
        assert out.seen_peer[0] in (a.ipv4, a.ipv6)


def test_cpu_accounting_counts_pod_processes(node: Node) -> None:
    a = node.add_pod("a")
    before = a.cpu_usage_usec()
    a.run(["python3", "-c", "sum(i*i for i in range(3_000_000))"], uid=1000, check=True)
    assert a.cpu_usage_usec() > before


def test_bad_pod_names_are_usage_errors(node: Node) -> None:
    from istio_ebpf_plugin.errors import UsageError
    for bad in ("", "x" * 9, "a b", "node"):
        with pytest.raises(UsageError):
            node.add_pod(bad)
    node.add_pod("a")
    with pytest.raises(UsageError):
        node.add_pod("a")


def _objects(token: str) -> list[str]:
    found = cleanup.find(force=True).only({token})
    return found.netns + [str(c) for c in found.cgroups] + [str(d) for d in found.tmpdirs]


def test_teardown_on_exception_removes_everything() -> None:
    token = None
    with pytest.raises(RuntimeError):
        with Node() as n:
            token = n.token
            a = n.add_pod("a")
            a.spawn(["sleep", "60"], uid=1000)
            a.spawn(["sh", "-c", "sleep 60 & sleep 60"], uid=1000)   # a grandchild too
            assert len(_objects(token)) >= 3
            raise RuntimeError("boom")
    assert _objects(token) == []


def test_sigterm_tears_down_and_cleanup_cli_removes_a_crashed_run() -> None:
    script = ("import sys, time\nfrom istio_ebpf_plugin.harness import Node\n"
              "n = Node().start(); a = n.add_pod('a'); a.spawn(['sleep', '60'], uid=1000)\n"
              "print(n.token, flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    token = proc.stdout.readline().strip()
    assert _objects(token)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=20)
    assert proc.returncode == -signal.SIGTERM
    assert _objects(token) == []

    # SIGKILL leaves everything behind; harness-cleanup removes it (the owner is dead).
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    token = proc.stdout.readline().strip()
    proc.kill()
    proc.wait(timeout=10)
    left = _objects(token)
    assert len(left) >= 3
    assert token not in cleanup.live_tokens()
    cli = subprocess.run([str(ROOT / ".venv/bin/istio-ebpf"), "harness-cleanup", "--json"],
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    report = json.loads(cli.stdout)
    assert f"ie-{token}-a" in report["netns"]
    assert _objects(token) == []


def test_cleanup_spares_live_runs(node: Node) -> None:
    node.add_pod("a")
    assert node.token in cleanup.live_tokens()
    assert cleanup.find().only({node.token}).netns == []
    assert f"ie-{node.token}-a" in cleanup.find(force=True).netns
