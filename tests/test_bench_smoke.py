"""`istio-ebpf bench` end to end on a tiny setting: every figure present and sane (no timing thresholds)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from istio_ebpf_plugin.bench import runner, topology

pytestmark = pytest.mark.kernel
ROOT = Path(__file__).resolve().parents[1]
FIGURES = ("rps", "p50_ms", "p99_ms", "p999_ms", "throughput_mbps", "cpu_s_per_req")


def test_bench_cli_tiny_run(tmp_path: Path) -> None:
    """Every path, one keep-alive and one churn workload, 2 paired rounds of 1 s: the JSON contract holds."""
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    stats_sysctl = Path("/proc/sys/kernel/bpf_stats_enabled")
    stats_before = stats_sysctl.read_text()
    proc = subprocess.run([str(ROOT / ".venv/bin/istio-ebpf"), "bench", "--rounds", "2", "--duration", "1",
                           "--workloads", "ka-1k-c16,conn-1k-c16", "--json", str(out_json), "--plot", str(out_png)],
                          capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert stats_sysctl.read_text() == stats_before          # the statistics switch is given back
    doc = json.loads(out_json.read_text())
    results = doc["results"]
    expected = {(p, v, w) for p in topology.PATHS for v in topology.variants_for(p, topology.VARIANTS)
                for w in ("ka-1k-c16", "conn-1k-c16")}
    assert {(r["path"], r["variant"], r["workload"]) for r in results} == expected
    for r in results:
        assert r.get("error") is None, r
        for key in FIGURES:
            assert isinstance(r[key], (int, float)) and r[key] > 0, (key, r)
        assert r["p50_ms"] <= r["p99_ms"] <= r["p999_ms"], r
        assert r["errors"] == 0, r
        assert r["rounds"] == 2 and r["requests"] > 0
        assert r["rps_min"] <= r["rps"] <= r["rps_max"]
        assert r["churn"] is (r["workload"] == "conn-1k-c16")
        for key in ("rps_vs_iptables_ci", "rps_vs_explicit_ci"):
            lo, hi = r[key]
            assert 0 < lo <= hi, (key, r)
        if r["variant"] in topology.EBPF_VARIANTS and r["churn"]:
            bpf = r["bpf"]
            assert r["bpf_ns_per_connection"] > 0 and bpf["programs"]["ie_connect4"]["runs"] >= 1, r
            assert bpf["programs"]["ie_getsockopt"]["runs"] >= 1 and bpf["programs"]["ie_inbound"]["runs"] >= 1
        elif r["variant"] in topology.EBPF_VARIANTS:
            assert "bpf_ns_per_connection" in r
        if r["variant"] == "ebpf-sockmap":
            assert r["bpf_ns_per_message"] > 0, r
    by = {(r["path"], r["variant"], r["workload"]): r for r in results}
    for p in topology.PATHS:
        for w in ("ka-1k-c16", "conn-1k-c16"):
            assert by[(p, "iptables", w)]["rps_vs_iptables_ci"] == [1.0, 1.0]
            assert by[(p, "explicit", w)]["rps_vs_explicit"] == 1.0
    assert len(doc["rounds"]) == 2 * 2 * len(topology.PATHS)
    for rnd in doc["rounds"]:
        c = rnd["conditions"]
        assert 0 <= c["other_cpu_share"] and 0 <= c["steal_share"] <= 1 and isinstance(c["flagged"], bool)
    variants = doc["meta"]["variants"]
    assert variants["http/direct"]["proxied"] == 0
    for key, info in variants.items():
        if not key.endswith("/direct"):
            assert info["proxied"] > 0, key          # the traffic really crossed the sidecar or forwarder
        if key.endswith("/iptables"):
            assert info["iptables_rules"] > 0
        else:
            assert info["iptables_rules"] == 0, key
    assert variants["http/ebpf"]["datapath_counters"]["out_redirect"] > 0
    assert variants["http/ebpf-sockmap"]["datapath_counters"]["sockmap_bytes"] > 0
    tools = doc["meta"]["tools"]
    assert tools["wrk"] and tools["envoy"][0].isdigit()
    assert doc["meta"]["machine"]["cpus"] >= 1 and doc["meta"]["bpf_stats"] == "BPF_ENABLE_STATS"
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "x iptables [95% CI]" in proc.stdout and "capture-only" in proc.stdout     # the printed table
    assert "ns/conn" in proc.stdout


def test_settings_and_bad_input() -> None:
    quick = runner.settings_for(True)
    assert [w.name for w in quick.workloads] == list(runner.QUICK_WORKLOADS) and quick.rounds >= 5
    assert {w.close_each for w in quick.workloads} == {True, False} and quick.paths == topology.PATHS
    full = runner.settings_for(False)
    assert len(full.workloads) == len(runner.WORKLOADS) and full.rounds >= 10
    assert {w.payload for w in full.workloads} == set(runner.PAYLOADS)
    assert any(w.close_each for w in full.workloads) and {1, 16, 64} <= {w.connections for w in full.workloads}
    for argv in (["bench", "--workloads", "nope"], ["bench", "--variants", "x"], ["bench", "--rounds", "0"],
                 ["bench", "--paths", "udp"],
                 ["bench", "--plot", "a.jpg"]):
        proc = subprocess.run([str(ROOT / ".venv/bin/istio-ebpf"), *argv], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 2 and proc.stderr.startswith("istio-ebpf: error:"), (argv, proc.stderr)


def test_agent_footprint_fresh_and_restarted() -> None:
    """The real agent process: RSS once attached (BCC ran in a worker that exited) and time to capture."""
    from istio_ebpf_plugin.bench import agent_footprint
    from istio_ebpf_plugin.harness import names

    def ours() -> set[str]:       # other tests pin and unpin meanwhile: look at the agent's pin roots only
        return {p.name for p in names.BPFFS_ROOT.glob(f"{names.BPF_PIN_PREFIX}-agent-*")}

    before = ours()
    m = agent_footprint.measure()
    assert 0 < m["agent_rss_mib"] < 120, m                      # the goal; was 215 MiB with LLVM held
    assert 0 < m["agent_restart_to_capture_s"] < m["agent_start_to_capture_s"], m   # adopted, nothing compiled
    assert ours() == before                                     # pins and probe cache removed
