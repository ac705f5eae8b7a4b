"""datapath/loader.py on the real kernel: adoption of a previous loader's pins, and a clean-up that
leaves no attachment of any type behind (the pods' map entries: test_datapath_pod_entries.py;
the compile worker: test_datapath_compile_worker.py; capture itself: test_datapath_capture.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from istio_ebpf_plugin.datapath import libbpf
from istio_ebpf_plugin.datapath.loader import PROGRAMS, Datapath
from istio_ebpf_plugin.datapath.podconfig import PodConfig, ip_list
from istio_ebpf_plugin.harness.probe import start_probe_server
from support.datapath_modes import host_mode, unique_pin_root

pytestmark = pytest.mark.kernel


def test_restart_adopts_pins_without_duplicates(node, datapath_factory):
    """A second loader (a restarted agent) adopts pinned programs and maps; attaching
    again adds nothing; the pod keeps being captured while no loader process holds it."""
    root = unique_pin_root()
    first = datapath_factory(host_mode(), pin_root=root)
    first.attach_cgroup(str(node.parent_cgroup))
    a, c = node.add_pod("a"), node.add_pod("c")
    server = start_probe_server(a)
    handle = first.add_pod(a.netns_path, PodConfig(pod_ips=ip_list(a.pod_ips)), str(a.cgroup_path))
    ids = first.program_ids()
    # Drop every descriptor of the first loader: only the pins keep things alive.
    first.close(cleanup=False)
    out = node.probe_connect(a, 1000, 1000, c.ipv4, 8080)
    assert out.listener == "outbound" and out.orig_dst == (c.ipv4, 8080)

    second = datapath_factory(host_mode(), pin_root=root)
    assert second.adopted and second.program_ids() == ids
    assert second.attach_cgroup(str(node.parent_cgroup)) == []
    attached = second.attached_program_ids(str(node.parent_cgroup))
    assert all(len(v) == 1 and v[0] == ids[name] for name, v in attached.items()), attached
    assert handle in second.pods()
    server.stop()


def _attached(fd: int, attach_type: int) -> list[int]:
    return libbpf.prog_query(fd, attach_type)


def test_cleanup_detaches_everything(node):
    """Every attach type the loader uses (each cgroup hook, sk_lookup in the pod netns) has our
    program while the datapath runs, and none of them has anything after clean-up."""
    dp = Datapath(mode=host_mode(), pin_root=unique_pin_root()).load()
    cgroup_types = {p.attach_type for p in dp.loaded_programs if p.target == "cgroup"}
    assert len(cgroup_types) == len([p for p in dp.loaded_programs if p.target == "cgroup"]) >= 14
    try:
        dp.attach_cgroup(str(node.parent_cgroup))
        a = node.add_pod("a")
        dp.add_pod(a.netns_path, PodConfig(pod_ips=ip_list(a.pod_ips)), str(a.cgroup_path))
        ids = dp.program_ids()
        fd = os.open(str(node.parent_cgroup), os.O_RDONLY)
        try:
            for p in dp.loaded_programs:
                if p.target == "cgroup":
                    assert _attached(fd, p.attach_type) == [ids[p.func]], p.func
        finally:
            os.close(fd)
        fd = os.open(a.netns_path, os.O_RDONLY)
        try:
            assert _attached(fd, libbpf.SK_LOOKUP) == [ids["ie_inbound"]]
        finally:
            os.close(fd)
    finally:
        dp.close(cleanup=True)
    # Every type the loader knows, not only those this kernel accepted.
    every_cgroup_type = {p.attach_type for p in PROGRAMS if p.target == "cgroup"}
    fd = os.open(str(node.parent_cgroup), os.O_RDONLY)
    try:
        left = {t: _attached(fd, t) for t in every_cgroup_type}
        assert not any(left.values()), left
    finally:
        os.close(fd)
    fd = os.open(a.netns_path, os.O_RDONLY)
    try:
        assert _attached(fd, libbpf.SK_LOOKUP) == []
    finally:
        os.close(fd)
    assert not Path(dp.pin_root).exists()
