"""datapath/probe.py: a node whose probes could not compile says why, in one line.

The compile failures are real: BCC compiling a probe source with a C error, and a header lookup
that finds no kernel headers. The reason travels from the probe to the node's mode reason (the
annotation the agent publishes) and through the compile worker's JSON."""

from __future__ import annotations

import json
import os

import pytest

from istio_ebpf_plugin.agent.mode import decide
from istio_ebpf_plugin.datapath import headers, probe, probe_cache

RELEASE = os.uname().release


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("BCC compiles against this machine's kernel headers as root")


def test_a_c_error_in_the_probes_is_the_reason(monkeypatch):
    _require_root()
    monkeypatch.setattr(probe, "_SOURCE", probe._SOURCE + "\nint p_broken(void *ctx) { return no_such_symbol; }\n")
    found = probe.probe_programs()
    assert found["bcc_compile"] is False and not any(found[name] for name in probe._PROBES)
    reason = found.reasons["bcc_compile"]
    assert "error:" in reason and "no_such_symbol" in reason, reason
    assert "\n" not in reason and len(reason) <= probe.MAX_REASON_CHARS
    features = probe.with_cheap_checks(found)
    mode, why = probe.select_mode(RELEASE, features)
    assert mode == "unsupported" and reason in why and why.endswith("keeping iptables")
    assert "\n" not in why
    # The agent's decision (published as the node's reason annotation) carries it too.
    decision = decide(release=RELEASE, features=features)
    assert decision.mode == "unsupported" and reason in decision.reason
    assert decision.features["bcc_compile"] is False


def test_missing_kernel_headers_are_the_reason(monkeypatch, tmp_path):
    real = headers.find_kernel_headers
    monkeypatch.setattr(headers, "find_kernel_headers", lambda: real(root=str(tmp_path)))
    monkeypatch.delenv(headers.ENV_OVERRIDE, raising=False)
    found = probe.probe_programs()
    assert found["bcc_compile"] is False
    assert found.reasons["bcc_compile"].startswith(f"no kernel headers for {RELEASE}: looked in {tmp_path}")
    assert len(found.reasons["bcc_compile"]) <= probe.MAX_REASON_CHARS


def test_the_reason_crosses_the_compile_worker_and_the_probe_cache(monkeypatch, tmp_path):
    _require_root()
    reply = json.loads(json.dumps(probe.probe_programs_task({})))     # what the worker prints
    assert set(reply) == {"verdicts", "reasons"}
    broken = probe.Features({**reply["verdicts"], "bcc_compile": False}, {"bcc_compile": "x.c:1:2: error: y"})
    features, cached = probe_cache.probe_features(tmp_path / "pins", run_probes=lambda: broken)
    assert not cached and probe.reasons_of(features) == {"bcc_compile": "x.c:1:2: error: y"}
    assert "cgroup_v2" in features                         # the cheap checks joined, reason kept
    assert not (tmp_path / "pins").exists() or not any((tmp_path / "pins").iterdir())   # not cached
    monkeypatch.setenv(probe.FORCE_FAIL_ENV, "sk_lookup_assign")
    assert probe.reasons_of(probe.apply_forced(features)) == {"bcc_compile": "x.c:1:2: error: y"}


def test_a_failure_without_a_known_cause_lists_the_failed_probes():
    features = {name: True for name in [*probe._PROBES, "cgroup_v2", "bpffs", "so_netns_cookie", "bcc_compile"]}
    features["sk_lookup_assign"] = False
    mode, why = probe.select_mode(RELEASE, features, override="podip")
    assert mode == "unsupported" and "probes failed (sk_lookup_assign)" in why


def test_reasons_are_one_bounded_line():
    assert probe.one_line("\n\n  first  \nsecond") == "first"
    long = probe.one_line("e" * 1000)
    assert len(long) == probe.MAX_REASON_CHARS and long.endswith("...")
    assert probe.compile_failure(RuntimeError("Failed to compile BPF module <text>"),
                                 "In file included from x\n/virtual/main.c:3:5: error: bad\n1 error generated.") \
        == "/virtual/main.c:3:5: error: bad"
    assert probe.compile_failure(RuntimeError("Failed to compile BPF module <text>")) == \
        "Failed to compile BPF module <text>"
