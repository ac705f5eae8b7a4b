"""`istio-ebpf probe` and `istio-ebpf demo` as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [str(Path(sys.executable).parent / "istio-ebpf")]


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("release,mode", [
    ("5.15.0-1034-aws", "cookie"), ("5.10.198-187.748.amzn2.x86_64", "podip"),
    ("4.18.0-477.27.1.el8_8.x86_64", "unsupported"), ("6.8.0-1015-gke", "cookie"),
    ("5.15.90.1-microsoft-standard-WSL2", "cookie"), ("5.10.162+", "podip"), ("5.7.0", "unsupported"),
    ("5.9.1", "podip"),
    ("5.6.19", "unsupported"), ("5.14.21-150400.24.46-default", "podip"),
])
def test_probe_version_rule_json(release, mode):
    p = run("probe", "--kernel-release", release, "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["kernel_release"] == release and out["mode"] == mode and out["probed"] is False


@pytest.mark.parametrize("bad", ["garbage", "", "v", "99999.1", "abc-5.15"])
def test_probe_garbage_release_is_one_line_exit_2(bad):
    p = run("probe", "--kernel-release", bad, "--json")
    assert p.returncode == 2 and p.stdout == ""
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


@pytest.mark.kernel
def test_probe_this_machine_and_forced_failures():
    p = run("probe", "--json")
    out = json.loads(p.stdout)
    assert out["probed"] and out["mode"] == "cookie" and all(out["features"].values()), out
    # A kernel missing the cookie helper in sockops falls back to pod-IP mode and says why.
    p = run("probe", "--json", env={"ISTIO_EBPF_PROBE_FAIL": "sockops_netns_cookie"})
    out = json.loads(p.stdout)
    assert out["mode"] == "podip" and "sockops_netns_cookie" in out["reason"]
    # Nothing safe left: the node keeps iptables.
    p = run("probe", "--json", env={"ISTIO_EBPF_PROBE_FAIL": "sockops_netns_cookie,sk_lookup_assign"})
    assert json.loads(p.stdout)["mode"] == "unsupported"
    assert run("probe", "--mode", "bogus").returncode == 2


@pytest.mark.kernel
def test_demo_json_contract():
    p = run("demo", "--json", "--mode", "podip", "--requests", "10")
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout)
    assert out["mode"] == "podip" and out["requests_ok"] == 10 and out["requests_failed"] == 0
    assert out["original_destination_ok"] is True and out["iptables_rules_in_pods"] == 0
    assert out["sockmap_bytes"] == 0
