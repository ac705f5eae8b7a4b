"""The connection-state layout is a promise between datapath versions (docs/architecture.md, "Upgrades").

Every build with the same STATE_LAYOUT_VERSION, mode and map sizes opens the SAME pinned state
maps, so version N+1 reads entries version N wrote. This records layout 1 (each state map's key
and value struct, field by field) and fails when a struct or a state map changes while
STATE_LAYOUT_VERSION stays: change the layout -> bump the version in bpf/abi.h and maps.py (the
ABI check ties the two), and record the new layout here. tests/test_maps_layout.py ties the
mirrors to what BCC compiles; tests/test_datapath_takeover.py shows two versions sharing them.
"""

from __future__ import annotations

import ctypes

from istio_ebpf_plugin.datapath import build, maps


def layout(t: type) -> object:
    if isinstance(t, type) and issubclass(t, ctypes.Structure):
        return [(name, getattr(t, name).offset, getattr(t, name).size, layout(ftype))
                for name, ftype, *_ in t._fields_]     # type: ignore[attr-defined]
    return ctypes.sizeof(t)


_IP = [("family", 0, 4, 4), ("a", 4, 16, 16)]
_ORIGIN = [("ip", 0, 20, _IP), ("port", 20, 2, 2), ("listener", 22, 2, 2)]
#: STATE_LAYOUT_VERSION -> {state map: (key layout, value layout)}; userspace-unread values: None.
RECORDED = {
    1: {
        "origin_by_cookie": (8, _ORIGIN),
        "origin_by_tuple": ([("netns", 0, 8, 8), ("ip", 8, 20, _IP), ("port", 28, 2, 2), ("kind", 30, 1, 1),
                             ("pad", 31, 1, 1)], _ORIGIN),
        "dns_origin": (8, _ORIGIN),
        "app_view": (8, [("peer", 0, 24, _ORIGIN), ("local", 24, 20, _IP)]),
        "inbound_listeners": (_IP, None),
        "accel_socks": ([("netns", 0, 8, 8), ("local", 8, 20, _IP), ("remote", 28, 20, _IP),
                         ("local_port", 48, 4, 4), ("remote_port", 52, 4, 4)], None),
    },
}


def test_state_maps_are_the_recorded_layout_of_their_version():
    want = RECORDED.get(maps.STATE_LAYOUT_VERSION)
    assert want is not None, f"record STATE_LAYOUT_VERSION {maps.STATE_LAYOUT_VERSION}'s layout here"
    have = {name: (layout(key), None if leaf is None else layout(leaf))
            for name, (key, leaf) in maps.MAP_TYPES.items() if name in build.STATE_MAPS}
    assert have == want, "a connection-state layout changed: bump STATE_LAYOUT_VERSION (bpf/abi.h, maps.py)"


def test_state_directory_names_what_versions_must_share():
    base = build.state_dir_name("cookie")
    assert base == f"state-s{maps.STATE_LAYOUT_VERSION}-cookie-c{maps.DEFAULT_MAP_SIZES['MAX_CONNS']}" \
                   f"-p{maps.DEFAULT_MAP_SIZES['MAX_PODS']}"
    # config-map sizes and the sockmap switch do not change it; mode and state-map sizes do
    assert build.state_dir_name("cookie", {"MAX_PORTS": 1000, "MAX_CIDRS": 1000}) == base
    assert build.state_dir_name("podip") != base
    assert build.state_dir_name("cookie", {"MAX_CONNS": 1024}) != base
    assert build.datapath_version("cookie", False, {"MAX_PORTS": 1000}) != build.datapath_version("cookie", False)
