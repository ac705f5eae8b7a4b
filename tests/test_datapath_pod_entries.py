"""datapath/pod_entries.py without root: the per-pod index, write with rollback, delete and the
rebuild from the maps, against the dict-backed map layer of tests/support/fake_maps.py."""

from __future__ import annotations

import ctypes
import errno
import ipaddress

import pytest
from support.fake_maps import FakeMaps, pod_table

from istio_ebpf_plugin.datapath import maps
from istio_ebpf_plugin.datapath.podconfig import PodConfig, ip_list
from istio_ebpf_plugin.errors import KernelError

A, B = 0xA1, 0xB2      # two pods' handles (netns cookies)


def cfg(*ips: str, **kw) -> PodConfig:
    defaults = dict(exclude_outbound_cidrs=(ipaddress.ip_network("10.96.0.0/12"),),
                    include_outbound_ports=(8443,), exclude_outbound_ports=(9000,))
    return PodConfig(pod_ips=ip_list(ips), **{**defaults, **kw})


def ip_owner(fake: FakeMaps, ip: str) -> maps.PodIpVal | None:
    val = maps.PodIpVal()
    return val if fake.lookup("pod_by_ip", maps.IpAddr.of(ipaddress.ip_address(ip)), val) else None


def pod_ids_in(fake: FakeMaps, name: str, key_type: type) -> set[int]:
    return {k.pod_id for k in fake.keys(name, key_type)}


def updates_of_one_write(config: PodConfig) -> int:
    fake = FakeMaps()
    pod_table(fake).add(A, config)
    return fake.updates


def test_a_new_pod_gets_every_entry_and_the_first_free_pod_id():
    fake = FakeMaps()
    pods = pod_table(fake)
    pods.add(A, cfg("10.1.0.5", "fd00::5"))
    pods.add(B, cfg("10.1.0.6"))
    cfgs = pods.configs()
    assert {h: c.pod_id for h, c in cfgs.items()} == {A: 1, B: 2}
    assert ip_owner(fake, "10.1.0.5").netns_cookie == A and ip_owner(fake, "fd00::5").pod_id == 1
    assert ip_owner(fake, "10.1.0.6").pod_id == 2
    ports = {(k.pod_id, k.kind, k.port) for k in fake.keys("pod_ports", maps.PortKey)}
    assert (1, maps.PORT_OUT_INCLUDE, 8443) in ports and (1, maps.PORT_OUT_EXCLUDE, 9000) in ports
    assert (1, maps.PORT_OUT_EXCLUDE, 15020) in ports      # the status port, never captured outbound
    assert pod_ids_in(fake, "pod_cidrs", maps.CidrKey) == {1, 2}
    pods.remove(A)
    pods.add(A, cfg("10.1.0.7"))
    assert pods.configs()[A].pod_id == 1                    # freed id reused


def test_rewrite_drops_what_is_gone_and_keeps_the_pod_id():
    fake = FakeMaps()
    pods = pod_table(fake)
    pods.add(A, cfg("10.1.0.5", "fd00::5"))
    pods.write(A, cfg("10.1.0.9", include_outbound_ports=(), exclude_outbound_cidrs=()))
    assert ip_owner(fake, "10.1.0.5") is None and ip_owner(fake, "fd00::5") is None
    assert ip_owner(fake, "10.1.0.9").pod_id == 1
    kinds = {k.kind for k in fake.keys("pod_ports", maps.PortKey)}
    assert maps.PORT_OUT_INCLUDE not in kinds
    assert {k.kind for k in fake.keys("pod_cidrs", maps.CidrKey)} == {maps.CIDR_INCLUDE}
    assert pods.index()[A].ips == {bytes(maps.IpAddr.of(ipaddress.ip_address("10.1.0.9")))}


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.E2BIG])
def test_a_refused_update_at_any_step_of_a_new_pod_leaves_the_maps_as_before(err):
    config = cfg("10.1.0.5", "fd00::5")
    steps = updates_of_one_write(config)
    assert steps >= 8      # ports, cidrs, two IPs, the config
    for step in range(steps):
        fake = FakeMaps()
        pods = pod_table(fake)
        pods.add(B, cfg("10.1.0.6"))
        before, index_before = fake.snapshot(), set(pods.index())
        fake.fail_update(step, err)
        with pytest.raises(KernelError, match="maps are full"):
            pods.add(A, config)
        assert fake.snapshot() == before, f"step {step} of {steps}"
        assert set(pods.index()) == index_before
        pods.add(A, config)                                 # and the pod can still be added later
        assert pods.configs()[A].pod_id == 2


def test_a_refused_update_at_any_step_of_a_rewrite_leaves_the_maps_as_before():
    old = cfg("10.1.0.5", "fd00::5")
    new = cfg("10.1.0.5", "10.1.0.8", dns_capture=True, include_outbound_ports=(8443, 8444),
              exclude_outbound_cidrs=(ipaddress.ip_network("10.96.0.0/12"), ipaddress.ip_network("fd01::/64")))
    fake = FakeMaps()
    pods = pod_table(fake)
    pods.add(A, old)
    before = fake.snapshot()
    start = fake.updates
    pods.write(A, new)
    steps = fake.updates - start
    pods.write(A, old)
    assert fake.snapshot() == before
    for step in range(steps):
        fake.fail_update(step, errno.E2BIG)
        with pytest.raises(KernelError):
            pods.write(A, new)
        # the pod's own IP too: its PodIpVal (flags) is back to the old one, in step with its config
        assert fake.snapshot() == before, f"step {step} of {steps}"
    pods.write(A, new)
    assert ip_owner(fake, "10.1.0.5").flags & maps.POD_DNS_CAPTURE


def test_a_reused_ip_goes_back_to_its_previous_owner_when_the_new_pod_is_refused():
    fake = FakeMaps()
    pods = pod_table(fake)
    pods.add(A, cfg("10.1.0.5"))
    owner_before = bytes(ip_owner(fake, "10.1.0.5"))
    before = fake.snapshot()
    fake.fail_update(updates_of_one_write(cfg("10.1.0.5")) - 1)     # the config, after the IP moved
    with pytest.raises(KernelError):
        pods.add(B, cfg("10.1.0.5"))
    assert bytes(ip_owner(fake, "10.1.0.5")) == owner_before
    assert fake.snapshot() == before


def test_a_full_map_refuses_the_pod_whole():
    config = cfg("10.1.0.5")
    fake = FakeMaps(capacity={"pod_cidrs": len(maps.encode_pod(1, A, config).cidrs)})
    pods = pod_table(fake)
    pods.add(A, config)
    before = fake.snapshot()
    with pytest.raises(KernelError, match="No space left"):
        pods.add(B, cfg("10.1.0.6"))
    assert fake.snapshot() == before and B not in pods.index()


def test_another_errno_is_rolled_back_and_raised_as_it_is():
    fake = FakeMaps()
    pods = pod_table(fake)
    fake.fail_update(2, errno.EPERM)
    with pytest.raises(PermissionError):
        pods.add(A, cfg("10.1.0.5"))
    assert fake.snapshot() == {} and A not in pods.index()


def test_delete_touches_only_the_pods_own_entries():
    fake = FakeMaps()
    pods = pod_table(fake)
    pods.add(A, cfg("10.1.0.5", "10.1.0.7"))
    pods.add(B, cfg("10.1.0.5", "10.1.0.6"))     # 10.1.0.5 re-used by B before A's DELETED arrived
    for ip in ("10.1.0.5", "10.1.0.6", "10.1.0.7"):
        fake.update("inbound_listeners", maps.IpAddr.of(ipaddress.ip_address(ip)), ctypes.c_uint32(7))
    pods.remove(A)
    assert ip_owner(fake, "10.1.0.5").netns_cookie == B
    assert ip_owner(fake, "10.1.0.7") is None
    listeners = {str(k.address()) for k in fake.keys("inbound_listeners", maps.IpAddr)}
    assert listeners == {"10.1.0.5", "10.1.0.6"}
    assert pod_ids_in(fake, "pod_ports", maps.PortKey) == {2}
    assert pod_ids_in(fake, "pod_cidrs", maps.CidrKey) == {2}
    assert set(pods.configs()) == {B}
    pods.remove(A)        # again: nothing more goes
    assert set(pods.configs()) == {B} and ip_owner(fake, "10.1.0.5").netns_cookie == B


def test_the_index_is_rebuilt_from_the_maps():
    fake = FakeMaps()
    first = pod_table(fake)
    first.add(A, cfg("10.1.0.5", "fd00::5"))
    first.add(B, cfg("10.1.0.5", "10.1.0.6"))      # B owns 10.1.0.5 now
    restarted = pod_table(fake)                          # a new agent over the same (pinned) maps
    assert restarted.index() == first.index() | {A: restarted.index()[A]}
    assert restarted.index()[A].ips == {bytes(maps.IpAddr.of(ipaddress.ip_address("fd00::5")))}
    assert restarted.index()[B] == first.index()[B]
    assert restarted.ips(A) is not None and restarted.ips(0xDEAD) is None
    restarted.remove(A)
    assert pod_ids_in(fake, "pod_ports", maps.PortKey) == {2}
    first.forget()
    assert set(first.index()) == {B}


def test_a_restarted_agent_writes_nothing_for_a_pod_the_maps_hold_already():
    fake = FakeMaps()
    pod_table(fake).add(A, cfg("10.1.0.5", "fd00::5"))
    restarted = pod_table(fake)                  # a new agent over the same (pinned) maps: its resync
    before, writes = fake.snapshot(), fake.updates
    restarted.add(A, cfg("10.1.0.5", "fd00::5"))
    assert fake.updates == writes and fake.snapshot() == before
    restarted.add(A, cfg("10.1.0.5", "fd00::5", dns_capture=True))      # a change is written
    assert fake.updates > writes and ip_owner(fake, "fd00::5").flags & maps.POD_DNS_CAPTURE


def test_a_write_cut_short_before_the_config_is_rewritten_whole_after_a_restart():
    fake = FakeMaps()
    pod_table(fake).add(A, cfg("10.1.0.5"))
    before = fake.snapshot()
    # The IP already carries the new flags, the config not yet: the agent died between the two.
    fake.update("pod_by_ip", maps.IpAddr.of(ipaddress.ip_address("10.1.0.5")),
                maps.PodIpVal(pod_id=1, flags=maps.POD_DNS_CAPTURE, netns_cookie=A))
    restarted = pod_table(fake)
    restarted.add(A, cfg("10.1.0.5"))
    assert fake.snapshot() == before


def _count(fake: FakeMaps, pod_id: int, **values: int) -> None:
    """What the programs would have counted for a pod id (the live array)."""
    live = maps.PodCounters.of([values.get(n, 0) for n in maps.POD_COUNTERS])
    fake.update("pod_counters", ctypes.c_uint32(pod_id), live)


def test_counters_start_at_zero_for_a_new_pod_id_and_carry_never_goes_back():
    fake = FakeMaps()
    pods = pod_table(fake)
    pods.add(A, cfg("10.1.0.5"))
    assert set(pods.counters()[A].values()) == {0}
    _count(fake, 1, out_captured_cidr=3, origdst_hit=2)
    # an upgrade: the retired version's totals become where this one goes on from
    older = {A: [0] * len(maps.POD_COUNTERS), B: [9] * len(maps.POD_COUNTERS)}   # B: not a pod of ours
    older[A][maps.POD_COUNTERS.index("out_captured_cidr")] = 10
    assert pods.carry(older) == 1
    assert pods.counters()[A]["out_captured_cidr"] == 13 and pods.counters()[A]["origdst_hit"] == 2
    assert pods.carry(older) == 1 and pods.counters()[A]["out_captured_cidr"] == 13     # again: nothing added
    shorter = {A: [4]}      # an older build's list may be shorter (append-only): the rest counts 0
    pods.carry(shorter)
    assert pods.counters()[A]["out_captured_cidr"] == 13 and pods.counters()[A]["out_pass_excluded_port"] == 4
    # the pod goes, its id is reused: nothing of the old pod is counted for the new one
    pods.remove(A)
    pods.add(B, cfg("10.1.0.6"))
    assert pods.configs()[B].pod_id == 1 and set(pods.counters()[B].values()) == {0}


def test_a_refused_new_pod_leaves_the_previous_pods_counts_as_they_were():
    fake = FakeMaps()
    pods = pod_table(fake)
    _count(fake, 1, in_captured_port=5)       # left by a pod removed before (its id is free again)
    before = fake.snapshot()
    fake.fail_update(0)                        # the zeroing itself is refused
    with pytest.raises(KernelError, match="maps are full"):
        pods.add(A, cfg("10.1.0.5"))
    assert fake.snapshot() == before


def test_freed_pod_ids_are_reused_lowest_first():
    fake = FakeMaps()
    pods = pod_table(fake)
    handles = [0x100 + i for i in range(4)]
    for h in handles[:3]:
        pods.add(h, cfg("10.1.0.5"))
    pods.remove(handles[1])
    pods.add(handles[3], cfg("10.1.0.6"))
    assert pods.index()[handles[3]].pod_id == 2
    pods.remove(handles[0])
    pods.remove(handles[2])
    restarted = pod_table(fake)         # the ids in use come back from the maps: 2
    for h, want in ((0x200, 1), (0x201, 3), (0x202, 4)):
        restarted.add(h, cfg("10.1.0.7"))
        assert restarted.index()[h].pod_id == want
