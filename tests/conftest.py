"""Shared fixtures. Others may append fixtures below (minimal str_replace edits)."""

from __future__ import annotations

import os
from typing import Callable, Iterator

import pytest
from hypothesis import settings

from istio_ebpf_plugin.datapath.loader import Datapath
from istio_ebpf_plugin.harness import Node, cleanup, names

# CI runs the property tests on a fixed set of examples (no flaky new finds on a submission,
# no deadline failures on a busy 2-core machine); local runs explore fresh examples.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces, cgroups and BPF are created for real")


@pytest.fixture
def pin_root() -> Iterator[str]:
    """A unique bpffs pin root; everything pinned below it (probe cache too) is removed afterwards."""
    import uuid

    from istio_ebpf_plugin.datapath.loader import cleanup_pins

    root = f"/sys/fs/bpf/{names.BPF_PIN_PREFIX}-{uuid.uuid4().hex[:8]}"
    yield root
    cleanup_pins(root)
    assert not os.path.exists(root)


@pytest.fixture
def datapath_factory() -> Iterator[Callable[..., Datapath]]:
    """``make(mode, sockmap=False, pin_root=None)``: a loaded Datapath (a mode or sockmap this kernel
    cannot run is skipped with the probes' reason); each is closed with clean-up afterwards."""
    from istio_ebpf_plugin.datapath.probe import sockmap_supported
    from support.datapath_modes import features, require_mode, unique_pin_root

    made: list[Datapath] = []

    def make(mode: str, sockmap: bool = False, pin_root: str | None = None) -> Datapath:
        require_mode(mode)
        if sockmap and not sockmap_supported(mode, features()):
            pytest.skip(f"this kernel cannot accelerate {mode} mode with sockmap")
        dp = Datapath(mode=mode, sockmap=sockmap, pin_root=pin_root or unique_pin_root()).load()
        made.append(dp)
        return dp

    yield make
    for dp in made:
        dp.close(cleanup=True)
        assert not dp.pin_dir.exists()


@pytest.fixture
def node() -> Iterator[Node]:
    """A fresh local node (netns + cgroup pods); everything it made is removed afterwards."""
    _require_root()
    with Node() as n:
        yield n


@pytest.fixture(scope="session", autouse=True)
def _no_harness_leftovers() -> Iterator[None]:
    """At session end, nothing with our prefixes may be left by this session.

    Objects of Nodes created by this process must all be gone. Other new objects
    (pins, foreign netns/cgroups) count too, unless another live harness process
    (a parallel session) may own them.
    """
    before = cleanup.find(force=True) if os.geteuid() == 0 else cleanup.Leftovers()
    yield
    if os.geteuid() != 0:
        return
    after = cleanup.find(force=True)
    ours = after.only(names.created_tokens)
    problems = ours.describe() if ours else ""
    if not cleanup.live_tokens() - names.created_tokens:
        new = after.minus(before).minus(ours)
        if new:
            problems += ("; " if problems else "") + new.describe()
    if problems:
        pytest.fail(f"test session left harness objects behind: {problems} "
                    f"(remove with: .venv/bin/istio-ebpf harness-cleanup)", pytrace=False)


@pytest.fixture(scope="session")
def kube_control_plane():
    """A real Kubernetes 1.20.2 control plane (etcd, apiserver, controller-manager, scheduler) on loopback."""
    from support.kube_cluster import start_control_plane

    yield from start_control_plane()
