"""Kernel release strings -> mode, and the agent's mode decision with probes and overrides."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from istio_ebpf_plugin import kernel
from istio_ebpf_plugin.agent import mode as agent_mode
from istio_ebpf_plugin.datapath import probe
from istio_ebpf_plugin.errors import UsageError

TABLE = [
    ("5.15.0-1034-aws", "cookie"),
    ("5.10.198-187.748.amzn2.x86_64", "podip"),
    ("4.18.0-477.27.1.el8_8.x86_64", "unsupported"),
    ("6.8.0-1015-gke", "cookie"),
    ("5.15.90.1-microsoft-standard-WSL2", "cookie"),
    ("5.10.162+", "podip"),
    ("5.14.0-362.8.1.el9_3.x86_64", "podip"),          # RHEL 9
    ("5.4.0-1103-azure", "unsupported"),
    ("5.7.0", "unsupported"),                           # no sk_lookup, no getpeername/getsockname hooks
    ("5.8.18", "unsupported"),                          # no sk_lookup
    ("5.9.0", "podip"),
    ("5.6.19-300.fc32.x86_64", "unsupported"),
    ("6.1.0-18-amd64", "cookie"),                       # Debian 12
    ("6.18.0", "cookie"),
    ("4.19.112+", "unsupported"),                        # COS 81
    ("5.15.0-1048-gcp", "cookie"),
    ("6.6.12-linuxkit", "cookie"),                       # Docker Desktop
    ("5.10.0-28-cloud-amd64", "podip"),
    ("6.5.0-1014-oem", "cookie"),
    ("3.10.0-1160.el7.x86_64", "unsupported"),           # CentOS 7
    ("5.15.0", "cookie"),
    ("5.14.21-150500.55.39-default", "podip"),           # SLES 15 SP5
    ("6.2.0-rc1", "cookie"),
    ("5.19.0-50-generic", "cookie"),
]


@pytest.mark.parametrize("release,expected", TABLE)
def test_kernel_string_table(release, expected):
    assert kernel.mode_for_release(release) == expected


@pytest.mark.parametrize("garbage", ["", "linux", "v", "5", "5.", ".15.0", "abc.def", "0.1.2", "100.1.0",
                                     "5.15" + "0" * 300, "5.x.0", "-5.15.0"])
def test_kernel_garbage_is_a_usage_error(garbage):
    with pytest.raises(UsageError):
        kernel.parse_release(garbage)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=80))
def test_property_kernel_release_never_crashes(text):
    try:
        mode = kernel.mode_for_release(text)
    except UsageError as exc:
        assert "\n" not in str(exc)
    else:
        assert mode in kernel.MODES


@settings(max_examples=500, deadline=None)
@given(major=st.integers(1, 99), minor=st.integers(0, 999), patch=st.integers(0, 99999),
       suffix=st.sampled_from(["", "+", "-1034-aws", ".el8_8.x86_64", "-microsoft-standard-WSL2", "-rc3",
                               ".1-microsoft-standard-WSL2", "-187.748.amzn2.x86_64", "_custom", "~bpo11"]))
def test_property_kernel_release_rule(major, minor, patch, suffix):
    release = f"{major}.{minor}.{patch}{suffix}"
    v = kernel.parse_release(release)
    assert (v.major, v.minor, v.patch) == (major, minor, patch)
    expected = "cookie" if (major, minor) >= (5, 15) else "podip" if (major, minor) >= (5, 7) else "unsupported"
    assert kernel.mode_for_release(release) == expected


# ------------------------------------------------------------------ the agent's decision
ALL_OK = {name: True for name in list(probe._PROBES) + ["cgroup_v2", "bpffs", "so_netns_cookie", "bcc_compile"]}


def test_decision_follows_version_when_probes_pass():
    for release, expected in TABLE:
        d = agent_mode.decide(release=release, features=dict(ALL_OK))
        assert d.mode == expected, (release, d)
        assert d.version_mode == expected and d.reason and "\n" not in d.reason


def test_override_forces_each_mode_and_unknown_override_is_usage_error():
    for forced in ("cookie", "podip", "unsupported"):
        d = agent_mode.decide(release="6.8.0-1015-gke", override=forced, features=dict(ALL_OK))
        assert d.mode == forced
    assert "override" in agent_mode.decide(release="6.8.0", override="podip", features=dict(ALL_OK)).reason
    with pytest.raises(UsageError):
        agent_mode.decide(release="6.8.0", override="iptables", features={})


def test_failed_probe_falls_back_and_says_so():
    d = agent_mode.decide(release="6.8.0-1015-gke", features=dict(ALL_OK, sockops_netns_cookie=False))
    assert d.mode == "podip" and "sockops_netns_cookie" in d.reason and d.version_mode == "cookie"
    d = agent_mode.decide(release="6.8.0", features=dict(ALL_OK, sk_lookup_assign=False))
    assert d.mode == "unsupported" and "sk_lookup_assign" in d.reason


def test_no_cgroup2_is_unsupported():
    d = agent_mode.decide(release="6.8.0", features=dict(ALL_OK, cgroup_v2=False))
    assert d.mode == "unsupported" and "cgroup_v2" in d.reason


def test_unparseable_release_is_unsupported_not_a_crash():
    d = agent_mode.decide(release="garbage", features={})
    assert d.mode == "unsupported" and "unparseable" in d.reason


def test_this_machine_finds_cgroup2():
    # hybrid layout here: v2 at /sys/fs/cgroup/unified
    found = agent_mode.find_cgroup2()
    assert found is not None and os.path.exists(os.path.join(found, "cgroup.procs"))


@pytest.mark.kernel
def test_real_probe_on_this_machine_supports_everything():
    d = agent_mode.decide()
    assert d.features and all(d.features.values()), d.features
    assert d.mode == "cookie" and d.sockmap, d
    for forced in ("cookie", "podip"):
        assert agent_mode.decide(override=forced, features=d.features).mode == forced


@pytest.mark.kernel
def test_forced_probe_failure_on_this_machine(monkeypatch):
    monkeypatch.setenv(probe.FORCE_FAIL_ENV, "sockops_netns_cookie")
    d = agent_mode.decide()
    assert d.mode == "podip" and "sockops_netns_cookie" in d.reason
