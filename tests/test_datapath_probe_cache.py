"""Probe verdicts cached in the pin root (bpffs), keyed by kernel and probe sources."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from istio_ebpf_plugin.datapath import probe, probe_cache
from istio_ebpf_plugin.datapath.loader import Datapath, cleanup_pins

pytestmark = pytest.mark.kernel


def test_real_probes_run_once_then_come_from_the_cache(pin_root) -> None:
    first, cached = probe_cache.probe_features(pin_root)
    assert not cached and first["bcc_compile"] and first["sk_lookup_assign"]
    calls = []
    second, cached = probe_cache.probe_features(pin_root, run_probes=lambda: calls.append(1) or {})
    assert cached and calls == [] and second == first
    # One directory per verdict on bpffs (no regular files there), under this kernel's key.
    entries = {p.name for p in Path(pin_root, f"{probe_cache.PREFIX}{probe_cache.cache_key()}").iterdir()}
    assert "bcc_compile=1" in entries and "sk_lookup_assign=1" in entries


def test_key_follows_kernel_stale_entries_go(pin_root) -> None:
    verdicts = {"bcc_compile": True, "sk_lookup_assign": True, "sockops_sockhash": False}
    assert probe_cache.write(pin_root, verdicts, key="aaaa")
    assert probe_cache.read(pin_root, key="aaaa") == verdicts
    assert probe_cache.read(pin_root, key="bbbb") is None
    assert probe_cache.cache_key("6.1.0-1-amd64", "#1 SMP") != probe_cache.cache_key("6.1.0-2-amd64", "#1 SMP")
    assert probe_cache.cache_key("6.1.0", "#1") == probe_cache.cache_key("6.1.0", "#1")
    assert probe_cache.write(pin_root, verdicts, key="bbbb")          # another kernel: the old key goes
    assert probe_cache.read(pin_root, key="aaaa") is None
    assert sorted(p.name for p in Path(pin_root).iterdir()) == [f"{probe_cache.PREFIX}bbbb"]


def test_probe_source_change_changes_the_key(monkeypatch) -> None:
    before = probe_cache.cache_key("6.1.0", "#1")
    monkeypatch.setattr(probe, "_SOURCE", probe._SOURCE + "\n/* changed */\n")
    assert probe_cache.cache_key("6.1.0", "#1") != before


def test_failed_compile_is_not_cached_and_forced_failures_still_apply(pin_root, monkeypatch) -> None:
    broken = {"bcc_compile": False, "sk_lookup_assign": False}
    features, cached = probe_cache.probe_features(pin_root, run_probes=lambda: dict(broken))
    assert not cached and not features["bcc_compile"] and probe_cache.read(pin_root) is None
    good = {"bcc_compile": True, "sk_lookup_assign": True}
    probe_cache.probe_features(pin_root, run_probes=lambda: dict(good))
    monkeypatch.setenv(probe.FORCE_FAIL_ENV, "sk_lookup_assign")
    features, cached = probe_cache.probe_features(pin_root, run_probes=lambda: pytest.fail("must be cached"))
    assert cached and features["bcc_compile"] and not features["sk_lookup_assign"]
    assert {"cgroup_v2", "bpffs", "so_netns_cookie"} <= set(features)   # cheap checks always fresh


def test_datapath_upgrade_keeps_the_cache_and_cleanup_removes_it(pin_root) -> None:
    assert probe_cache.write(pin_root, {"bcc_compile": True}, key=probe_cache.cache_key())
    old = Path(pin_root, "v0-cookie-000000000000", "links")
    old.mkdir(parents=True)
    dp = Datapath(mode="cookie", pin_root=pin_root)
    try:
        dp.load()
        assert [p.name for p in dp.other_versions()] == ["v0-cookie-000000000000"]
        assert dp.retire_other_versions() == ["v0-cookie-000000000000"]
        assert probe_cache.read(pin_root) == {"bcc_compile": True}    # not mistaken for a version
    finally:
        dp.close(cleanup=True)
    assert probe_cache.read(pin_root) is not None
    cleanup_pins(pin_root)
    assert not os.path.exists(pin_root)


def test_unwritable_root_is_a_warning_not_a_failure(tmp_path) -> None:
    blocker = tmp_path / "file"          # root ignores mode bits; nobody can mkdir under a file
    blocker.write_text("x")
    assert probe_cache.write(blocker, {"bcc_compile": True}, key="k") is False
    assert probe_cache.read(blocker, key="k") is None


def test_discard_leaves_no_pin_root(pin_root) -> None:
    assert probe_cache.write(pin_root, {"bcc_compile": True}, key="k")
    probe_cache.discard(pin_root)
    assert not os.path.exists(pin_root)
