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
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    proc = subprocess.run([str(ROOT / ".venv/bin/istio-ebpf"), "bench", "--quick", "--rounds", "1", "--duration", "1",
                           "--workloads", "ka-1k-c16,conn-1k-c16", "--json", str(out_json), "--plot", str(out_png)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out_json.read_text())
    results = doc["results"]
    assert {(r["variant"], r["workload"]) for r in results} == {
        (v, w) for v in topology.VARIANTS for w in ("ka-1k-c16", "conn-1k-c16")}
    for r in results:
        assert r.get("error") is None, r
        for key in FIGURES:
            assert isinstance(r[key], (int, float)) and r[key] > 0, (key, r)
        assert r["p50_ms"] <= r["p99_ms"] <= r["p999_ms"], r
        assert r["errors"] == 0, r
        assert r["rounds"] == 1 and r["requests"] > 0
        assert r["rps_min"] <= r["rps"] <= r["rps_max"]
    by = {(r["variant"], r["workload"]): r for r in results}
    for w in ("ka-1k-c16", "conn-1k-c16"):
        assert by[("iptables", w)]["rps_vs_iptables"] == 1.0 and by[("direct", w)]["rps_vs_direct"] == 1.0
    variants = doc["meta"]["variants"]
    assert variants["direct"]["envoy_requests"] == 0
    for v in ("iptables", "ebpf", "ebpf-sockmap", "explicit"):
        assert variants[v]["envoy_requests"] > 0, v          # the traffic really crossed the sidecar
    assert variants["iptables"]["iptables_rules"] > 0
    for v in ("ebpf", "ebpf-sockmap", "explicit", "direct"):
        assert variants[v]["iptables_rules"] == 0, v
    assert variants["ebpf"]["datapath_counters"]["out_redirect"] > 0
    assert variants["ebpf-sockmap"]["datapath_counters"]["sockmap_bytes"] > 0
    tools = doc["meta"]["tools"]
    assert tools["wrk"] and tools["envoy"][0].isdigit()
    assert doc["meta"]["machine"]["cpus"] >= 1
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "x ipt" in proc.stdout and "ka-1k-c16" in proc.stdout     # the printed table


def test_settings_and_bad_input() -> None:
    quick = runner.settings_for(True)
    assert [w.name for w in quick.workloads] == list(runner.QUICK_WORKLOADS) and quick.rounds == 1
    full = runner.settings_for(False)
    assert len(full.workloads) == len(runner.WORKLOADS) and full.rounds == 3
    assert {w.payload for w in full.workloads} == set(runner.PAYLOADS)
    assert any(w.close_each for w in full.workloads) and {1, 16, 64} <= {w.connections for w in full.workloads}
    for argv in (["bench", "--workloads", "nope"], ["bench", "--variants", "x"], ["bench", "--rounds", "0"],
                 ["bench", "--plot", "a.jpg"]):
        proc = subprocess.run([str(ROOT / ".venv/bin/istio-ebpf"), *argv], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 2 and proc.stderr.startswith("istio-ebpf: error:"), (argv, proc.stderr)
