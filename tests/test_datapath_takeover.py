"""Datapath upgrade on the real kernel, at the loader's level: version N's live connections (IPv4 and
IPv6) keep their SO_ORIGINAL_DST answers, and the app its getpeername answer (the address it
dialled), through the switch to N+1 and back, every hook runs exactly one of
our programs at every moment, and nothing of the retired version stays pinned.

Two versions in one process differ in a CONFIG map's size (MAX_PORTS), which makes another
datapath version with the same connection-state layout. The build that changes a config map's
value LAYOUT (ISTIO_EBPF_DATAPATH_VARIANT) needs its own process: tests/test_upgrade_lab.py.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from istio_ebpf_plugin.datapath import libbpf
from istio_ebpf_plugin.datapath.build import PROGRAMS
from istio_ebpf_plugin.datapath.loader import Datapath, cleanup_pins
from istio_ebpf_plugin.datapath.pins import link_netns, rename_link
from istio_ebpf_plugin.datapath.podconfig import INBOUND_PORT, OUTBOUND_PORT, PROXY_UID, PodConfig, ip_list
from istio_ebpf_plugin.datapath.staging import staged
from istio_ebpf_plugin.harness.probe import PYTHON, wait_ready

from support.datapath_modes import require_mode
from support.polling import wait_for
from test_datapath_conn_state import SCRIPT, Held

pytestmark = pytest.mark.kernel

APP_UID = 1000
#: Version N+1: the same programs with another pod_ports size (a config map): another version
#: directory, the same state directory.
NEXT = {"MAX_PORTS": 262143}


def _cgroup_ids(dp: Datapath, cgroup: str) -> dict[str, list[int]]:
    return dp.attached_program_ids(cgroup)


def _sk_lookup_ids(netns_path: str) -> list[int]:
    fd = os.open(netns_path, os.O_RDONLY)
    try:
        return libbpf.prog_query(fd, libbpf.SK_LOOKUP)
    finally:
        os.close(fd)


def _only(dp: Datapath, cgroup: str, pods) -> None:
    """Every hook runs exactly one program, and it is dp's."""
    ids = dp.program_ids()
    attached = _cgroup_ids(dp, cgroup)
    assert attached and all(v == [ids[name]] for name, v in attached.items()), (attached, ids)
    for pod in pods:
        assert _sk_lookup_ids(pod.netns_path) == [ids["ie_inbound"]], pod.name


@pytest.fixture
def lab(node, request):
    """(node, pin root, mode, client pod a, server pod b) with Envoy-like held-connection listeners:
    15001 in a, 15006 in b (uid 1337), IPv4 and IPv6."""
    mode = request.param
    require_mode(mode)
    root = f"/sys/fs/bpf/istio-ebpf-test-{uuid.uuid4().hex[:8]}"
    try:
        a, b = node.add_pod("a"), node.add_pod("b")
        procs = []
        for pod, port in ((a, OUTBOUND_PORT), (b, INBOUND_PORT)):
            proc = pod.spawn([PYTHON, "-S", staged(SCRIPT), "server", str(port), "ipv6"], uid=PROXY_UID, gid=PROXY_UID,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            wait_ready(proc, f"held-connection server in pod {pod.name}")
            procs.append(proc)
        yield node, root, mode, a, b
    finally:
        cleanup_pins(root)


def _load(root: str, mode: str, node, pods, sizes=None) -> Datapath:
    """Load a version and fill its config maps with every pod (links untouched: take_over's job)."""
    dp = Datapath(mode=mode, pin_root=root, map_sizes=sizes).load()
    for pod in pods:
        dp.add_pod(pod.netns_path, PodConfig(pod_ips=ip_list(pod.pod_ips)), str(pod.cgroup_path))
    return dp


def _held(a, b) -> dict[str, tuple[Held, tuple[str, int]]]:
    """App connections of a (IPv4, IPv6) captured to a's 15001, and a proxy connection to b captured
    inbound. Answers checked: Envoy's SO_ORIGINAL_DST, and the app's getpeername (the address it dialled)."""
    out = {"app": (Held(a, APP_UID, b.ipv4, 9090), (b.ipv4, 9090)),
           "app6": (Held(a, APP_UID, b.ipv6, 9090), (b.ipv6, 9090)),
           "inbound": (Held(a, PROXY_UID, b.ipv4, 8080), (b.ipv4, 8080))}
    _check_answers(out)
    return out


def _check_answers(held: dict[str, tuple[Held, tuple[str, int]]]) -> None:
    for kind, (conn, want) in held.items():
        assert conn.original_dst() == (want, 0), kind
        assert conn.peer() == want, kind


@pytest.mark.parametrize("lab", ["cookie", "podip"], indirect=True)
def test_new_version_attached_keeps_old_connections_answers(lab):
    """The window the issue names: version N+1's programs are attached (its getsockopt runs for
    every socket) while connections N captured are still waiting for Envoy's SO_ORIGINAL_DST.
    Before this design the new getsockopt had an empty map and answered EPERM on 15001/15006:
    Envoy closed those connections. Now the state maps are shared: the answer stands."""
    node, root, mode, a, b = lab
    cgroup = str(node.parent_cgroup)
    old = _load(root, mode, node, (a, b))
    old.attach_cgroup(cgroup)
    held = _held(a, b)
    new = _load(root, mode, node, (a, b), NEXT)
    assert new.version != old.version
    new.attach_cgroup(cgroup)      # the moment the old agent code attached beside the old version
    _check_answers(held)
    for conn, _ in held.values():
        conn.close()
    old.close()
    new.close()


@pytest.mark.parametrize("lab", ["cookie", "podip"], indirect=True)
def test_switch_n_to_n1_and_back_keeps_connections_and_hooks(lab):
    """N -> N+1 -> N with connections held across both switches: every hook runs one program
    (the active version's) after each switch, the held connections keep their answers, new
    connections are captured, and the retired version's pins are gone. Each pod's counters go
    on from where the retired version left them (carried), never back to 0."""
    node, root, mode, a, b = lab
    cgroup = str(node.parent_cgroup)
    n = _load(root, mode, node, (a, b))
    n.attach_cgroup(cgroup)
    version_n, ids_n = n.version, n.program_ids()
    held = _held(a, b)
    counts = n.pod_counters()
    assert counts[n.pod_key(a.netns_path, str(a.cgroup_path))]["out_captured_cidr"] == 2     # app, app6
    n.close()      # the old agent is gone; its pins keep capturing
    for sizes in (NEXT, None):
        dp = _load(root, mode, node, (a, b), sizes)
        out = dp.take_over(cgroup)
        assert out["cgroup_created"] == 0, "a version change never creates a second attachment"
        assert out["netns_updated"] == 2
        _only(dp, cgroup, (a, b))
        retired = dp.retire_other_versions()
        assert len(retired) == 1 and retired[0] != dp.version
        assert dp.pod_counters() == counts and any(any(c.values()) for c in counts.values())
        assert sorted(p.name for p in (Path(root) / "versions").iterdir()) == [dp.version]
        assert [p.name for p in Path(root).iterdir() if p.name.startswith("state-")] == [dp.state_dir.name]
        _check_answers(held)      # Envoy's SO_ORIGINAL_DST and the app's getpeername, IPv4 and IPv6
        fresh = _held(a, b)      # new connections: captured by the new version
        for conn, _ in fresh.values():
            conn.close()
        assert dp.counters()["origdst_miss"] == 0
        key_a = dp.pod_key(a.netns_path, str(a.cgroup_path))
        now = dp.pod_counters()
        assert now[key_a]["out_captured_cidr"] == counts[key_a]["out_captured_cidr"] + 2   # the fresh app, app6
        counts = now
        dp.close()
    # Back on N: a rebuilt N is the same version (same hash) but new program ids.
    back = Datapath(mode=mode, pin_root=root).load()
    assert back.version == version_n and back.program_ids() != ids_n
    _only(back, cgroup, (a, b))
    for conn, _ in held.values():
        conn.close()
    back.close(cleanup=True)
    every_type = {p.attach_type for p in PROGRAMS if p.target == "cgroup"}
    fd = os.open(cgroup, os.O_RDONLY)
    try:
        assert not any(libbpf.prog_query(fd, t) for t in every_type)
    finally:
        os.close(fd)
    assert not Path(root).exists()


def _pin_defunct_link(path: Path, prog_id: int) -> None:
    """An sk_lookup link running prog_id pinned at path, whose netns is then deleted."""
    name = f"istio-ebpf-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        prog, ns = libbpf.prog_fd_by_id(prog_id), os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            link = libbpf.link_create(prog, ns, libbpf.SK_LOOKUP)
            libbpf.obj_pin(link, str(path))
            os.close(link)
        finally:
            os.close(prog)
            os.close(ns)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)
    wait_for(lambda: link_netns(path) == 0, what="the deleted netns's link defunct")


def _netns_links(root: str) -> set[str]:
    links = Path(root) / "links"
    return {p.name for p in links.glob("netns-*")} if links.is_dir() else set()


@pytest.mark.parametrize("lab", ["cookie", "podip"], indirect=True)
def test_mode_change_keeps_one_sk_lookup_program_per_pod_and_leaves_no_pin_of_the_old_mode(lab):
    """A forced mode change without a reboot: the other mode keys pods differently (netns cookie vs
    cgroup id), so each pod's sk_lookup link is pinned under another name. The new mode's add_pod
    takes that same link over by its name (never a second link in the netns: two of our programs
    would answer there until take_over); take_over retargets it; pods c and d, held by the old mode
    only (gone while no agent ran), lose their links; retiring leaves no version, state directory or
    link of the old mode. c's old key is made to equal a's new key (netns cookies and cgroup ids
    are both small counters: they can collide): a's add_pod sets c's link aside instead of taking it
    for a's. b's new key names a defunct link (its netns is gone): b's add_pod drops it and takes
    b's own. Every pod's netns runs exactly one sk_lookup program at every step."""
    node, root, old_mode, a, b = lab
    new_mode = "podip" if old_mode == "cookie" else "cookie"
    require_mode(new_mode)
    c, d = node.add_pod("c"), node.add_pod("d")
    pods = (a, b, c, d)
    cgroup = str(node.parent_cgroup)
    old = _load(root, old_mode, node, pods)
    old.attach_cgroup(cgroup)
    old_ids = old.program_ids()
    old_keys = {p.name: old.pod_key(p.netns_path, str(p.cgroup_path)) for p in pods}
    for conn, _ in _held(a, b).values():      # captured by the old mode
        conn.close()
    old.close()

    def sk_lookup(pod) -> list[int]:
        return _sk_lookup_ids(pod.netns_path)

    assert all(sk_lookup(p) == [old_ids["ie_inbound"]] for p in pods)
    new = Datapath(mode=new_mode, pin_root=root).load()
    new_keys = {p.name: new.pod_key(p.netns_path, str(p.cgroup_path)) for p in (a, b)}
    assert not set(new_keys.values()) & set(old_keys.values())
    links = Path(root) / "links"
    rename_link(links / f"netns-{old_keys['c']}", links / f"netns-{new_keys['a']}")    # the collision
    _pin_defunct_link(links / f"netns-{new_keys['b']}", old_ids["ie_inbound"])
    for pod in (a, b):
        new.add_pod(pod.netns_path, PodConfig(pod_ips=ip_list(pod.pod_ips)), str(pod.cgroup_path))
        # Renamed, not doubled: the old mode's program still answers until take_over.
        assert all(sk_lookup(p) == [old_ids["ie_inbound"]] for p in pods), pod.name
        assert f"netns-{new_keys[pod.name]}" in _netns_links(root)
        assert f"netns-{old_keys[pod.name]}" not in _netns_links(root)
    assert f"netns-aside-{os.stat(c.netns_path).st_ino}" in _netns_links(root)
    out = new.take_over(cgroup)
    assert out == {"cgroup_created": 0, "netns_updated": 2, "netns_removed": 2}, out
    _only(new, cgroup, (a, b))
    assert sk_lookup(c) == [] and sk_lookup(d) == []
    retired = new.retire_other_versions()
    assert len(retired) == 2 and all(old_mode in name for name in retired), retired     # version + state dir
    assert [p.name for p in (Path(root) / "versions").iterdir()] == [new.version]
    assert [p.name for p in Path(root).iterdir() if p.name.startswith("state-")] == [new.state_dir.name]
    assert not any(old_mode in p.name for p in list(Path(root).iterdir()) + list((Path(root) / "versions").iterdir()))
    assert _netns_links(root) == {f"netns-{k}" for k in new_keys.values()}
    _only(new, cgroup, (a, b))
    for conn, _ in _held(a, b).values():      # captured by the new mode
        conn.close()
    assert new.counters()["origdst_miss"] == 0
    new.close(cleanup=True)
    assert all(sk_lookup(p) == [] for p in pods)
    assert not Path(root).exists()
