"""Kernel matrix: real Debian kernels booted with virtme-ng run the datapath.

The VM test boots 5.10 (pod-IP mode) and 6.12 (cookie mode, and explain's answer for every case of
the differential table) and runs the CI subset of steps (tests/support/kernel_expectations.py:
CI_MATRIX); `make kernel-matrix` runs every step on 5.10, 6.1, 6.12 and this host. The unit tests
pin the rule and the probes on kernels the registry no longer serves.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from support.kernel_expectations import CI_MATRIX, EXPECTED_MODE, FEATURE_SINCE, SOCKMAP_BROKEN_READERS, features_for

from istio_ebpf_plugin.datapath.probe import select_mode
from istio_ebpf_plugin.errors import UsageError
from istio_ebpf_plugin.harness import kernel_matrix
from istio_ebpf_plugin.harness.capture_cases import CASES
from istio_ebpf_plugin.kernel import mode_for_release


# ---- the rule and the probes where no kernel package exists any more -----------------------
@pytest.mark.parametrize("release,version", [("5.4.0-26-amd64", (5, 4)), ("4.19.0-27-amd64", (4, 19)),
                                             ("5.6.19-300.fc32.x86_64", (5, 6))])
def test_kernels_before_5_7_keep_iptables(release, version):
    # The rule alone decides: no probe result can lift a kernel below 5.7 into a mode.
    assert mode_for_release(release) == "unsupported"
    mode, reason = select_mode(release, features_for(version))
    assert mode == "unsupported" and reason == f"kernel {release} -> unsupported"
    assert select_mode(release, features_for((6, 12)))[0] == "unsupported"


@pytest.mark.parametrize("release,version", [("5.7.0-3-amd64", (5, 7)), ("5.8.0-3-amd64", (5, 8))])
def test_5_7_and_5_8_have_no_sk_lookup_so_they_keep_iptables(release, version):
    # sk_lookup (inbound capture) arrived in 5.9: the rule keeps iptables there, and even an
    # operator forcing pod-IP mode is refused by the probe instead of capturing outbound only.
    assert mode_for_release(release) == "unsupported"
    assert select_mode(release, features_for(version))[0] == "unsupported"
    mode, reason = select_mode(release, features_for(version), override="podip")
    assert mode == "unsupported"
    assert "sk_lookup_assign" in reason and "keeping iptables" in reason


@pytest.mark.parametrize("version,expected", [((5, 9), "podip"), ((5, 10), "podip"), ((5, 14), "podip"),
                                              ((5, 15), "cookie"), ((6, 1), "cookie"), ((6, 12), "cookie")])
def test_rule_and_probes_agree_from_5_9(version, expected):
    release = f"{version[0]}.{version[1]}.0-1-amd64"
    mode, reason = select_mode(release, features_for(version))
    assert mode == expected and "all probes passed" in reason


def test_every_probe_has_its_upstream_release():
    from istio_ebpf_plugin.datapath import probe

    # so_netns_cookie is a getsockopt on a socket, not a program: the one non-BPF probe
    assert set(FEATURE_SINCE) == set(probe._PROBES) | {"so_netns_cookie"}


def test_cookie_kernel_with_a_missing_cookie_helper_falls_back_to_podip():
    features = features_for((5, 15)) | {"sockops_netns_cookie": False}
    assert select_mode("5.15.0-1-amd64", features)[0] == "podip"


# ---- matrix plumbing ------------------------------------------------------------------------
def test_steps_and_kernels_are_parsed_in_documented_order():
    assert kernel_matrix.parse_steps("cleanup,probe,demo") == ["probe", "demo", "cleanup"]
    assert kernel_matrix.parse_kernels("6.12,5.10") == ["6.12", "5.10"]
    for bad in ("", "probe,bogus"):
        with pytest.raises(UsageError):
            kernel_matrix.parse_steps(bad)
    with pytest.raises(UsageError):
        kernel_matrix.parse_kernels("4.19")


def test_command_defaults_are_every_kernel_and_every_step():
    from istio_ebpf_plugin.cli import build_parser

    args = build_parser().parse_args(["kernel-matrix"])
    assert kernel_matrix.parse_kernels(args.kernels) == list(kernel_matrix.KERNELS)
    assert kernel_matrix.parse_steps(args.steps) == list(kernel_matrix.STEPS)


def test_table_marks_failed_steps_and_carries_the_selftest_reason():
    reports = [
        {"kernel": "5.10", "release": "5.10.0-32-amd64", "accel": "tcg", "mode": "podip", "wall_seconds": 300,
         "steps": {"probe": {"ok": True, "mode": "podip"},
                   "demo": {"ok": True, "requests_ok": 50, "requests_failed": 0},
                   "selftest": {"ok": True, "passed": False, "reason": "sockmap self-test failed: x"}}},
        {"kernel": "6.12", "release": "6.12.118+deb13-amd64", "accel": "tcg", "mode": "cookie", "wall_seconds": 9,
         "steps": {"probe": {"ok": True, "mode": "cookie"},
                   "demo": {"ok": False, "requests_ok": 48, "requests_failed": 2},
                   "selftest": {"ok": False, "error": "not run"}}},
    ]
    lines = kernel_matrix.format_table(reports, ["probe", "demo", "selftest"]).splitlines()
    assert lines[0].split() == ["kernel", "release", "accel", "mode", "probe", "demo", "selftest", "seconds"]
    assert lines[2].split() == ["5.10", "5.10.0-32-amd64", "tcg", "podip", "podip", "50/50", "refused", "300"]
    assert lines[3].split() == ["6.12", "6.12.118+deb13-amd64", "tcg", "cookie", "cookie", "48/50", "!", "ERROR",
                                "9"]
    assert lines[4] == "5.10 selftest: sockmap self-test failed: x"


def test_selftest_reasons_name_their_readers():
    # reasons as `make kernel-matrix` reported them on 5.10 and 6.12
    r510 = ("sockmap self-test failed: 12 of 38 transfers failed: fionread: FIONREAD 0 with data readable "
            "(1 reads) (x6); splice: got 0 of 1 bytes (x6); 4 slower than 1 s (max 65.9625 s)")
    r612 = "sockmap self-test failed: 18 of 38 transfers failed: splice: got 0 of 1 bytes (x6); 12 slower than 1 s"
    assert broken_readers(r510) == {"fionread", "splice"}
    assert broken_readers(r612) == {"splice"}


# ---- real kernels in virtme-ng (CI subset) -------------------------------------------------
@pytest.fixture(scope="module")
def matrix_out():
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("the kernel matrix needs root (VMs, BPF in the guest)")
        pytest.skip("needs root")
    out = Path(tempfile.mkdtemp(prefix="istio-ebpf-kmx-"))
    yield out
    shutil.rmtree(out, ignore_errors=True)


@pytest.mark.kernel
@pytest.mark.timeout(2400)   # a TCG guest: 5.10 took 807 s beside another VM (runE); run_kernel's own limit is 1800 s
@pytest.mark.parametrize("name", list(CI_MATRIX))
def test_real_kernel_selects_its_mode_and_captures(matrix_out, name):
    steps = list(CI_MATRIX[name])
    report = kernel_matrix.run_kernel(name, steps, matrix_out, timeout=1800)
    print(json.dumps({k: report.get(k) for k in ("release", "accel", "mode", "wall_seconds", "vm_seconds")}))
    print(kernel_matrix.format_table([report], steps))
    check_report(name, steps, report)


def check_report(name: str, steps: list[str], report: dict) -> None:
    """What a matrix kernel's report must show for the CI steps."""
    version, mode = EXPECTED_MODE[name]
    assert report["accel"] in ("kvm", "tcg") and not report["timed_out"], report
    assert report["release"].startswith(f"{version[0]}.{version[1]}.")
    assert not report["prepare_problems"], report["prepare_problems"]
    probe = report["steps"]["probe"]
    assert probe["ok"] and probe["mode"] == mode == report["mode"], probe
    # each probe gives what the upstream history predicts for this version
    expected_failed = sorted(n for n, since in FEATURE_SINCE.items() if version < since)
    assert probe["failed_probes"] == expected_failed, probe
    if "demo" in steps:
        demo = report["steps"]["demo"]
        assert demo.get("mode") == mode, demo
        assert demo["requests_ok"] == 50 and demo["requests_failed"] == 0, demo
        assert demo["original_destination_ok"] is True and demo["iptables_rules_in_pods"] == 0, demo
    for step in ("explain", "explain-rules"):
        if step in steps:
            ex = report["steps"][step]
            # every case: the rules (and with connections, the listener, pod, original destination
            # and counter deltas) as the case says; a kernel without the test run says so instead
            if version >= FEATURE_SINCE["explain_test_run"]:
                assert ex["ok"] and ex["agree"] == ex["total"] == len(CASES), ex
            else:
                assert not ex["ok"] and ex["unavailable"].startswith("this kernel cannot run explain"), ex
    if "selftest" in steps:
        st = report["steps"]["selftest"]
        # a verdict, short, refusing exactly the readers this kernel breaks: acceleration stays off
        assert st["ok"] and "could not run" not in st["reason"], st
        assert not st["passed"] and len(st["reason"]) <= 300, st
        assert broken_readers(st["reason"]) == SOCKMAP_BROKEN_READERS[name], st["reason"]


def broken_readers(reason: str) -> set[str]:
    """The readers a self-test reason names ("...failed: fionread: ... (x6); splice: ...")."""
    return set(re.findall(r"(?:failed: |; )([a-z_]+): ", reason))
