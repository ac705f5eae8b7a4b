"""C and Python in step: every struct of datapath/maps.py against the types BCC generates from bpf/.

BCC compiles the datapath exactly as the loader does and describes each map's key and value
type (``bpf_table_key_desc``/``leaf_desc``, decoded into ctypes by BCC itself). Sizes and
field offsets must match the hand-written mirrors, recursively, and the counters array must
hold exactly ``maps.COUNTERS``.
"""

from __future__ import annotations

import ctypes
import json

import pytest

from istio_ebpf_plugin.datapath import loader, maps

pytestmark = pytest.mark.kernel


def layout(t: type) -> tuple:
    """(size, [(field offset, size, nested layout)]) of a ctypes type; names are the C side's business."""
    if isinstance(t, type) and issubclass(t, ctypes.Structure | ctypes.Union):
        fields = []
        for name, ftype, *_ in t._fields_:
            desc = getattr(t, name)
            fields.append((desc.offset, desc.size, layout(ftype)))
        return (ctypes.sizeof(t), fields)
    if isinstance(t, type) and issubclass(t, ctypes.Array):
        return (ctypes.sizeof(t),)     # u8[16] and u32[4] are the same bytes
    return (ctypes.sizeof(t),)


@pytest.fixture(scope="module")
def compiled():
    from bcc import BPF
    from bcc.libbcc import lib

    bpf = loader.compile_bpf(BPF, loader.PROGRAMS, "cookie", True)   # the build with every map

    def describe(name: str) -> tuple[type, type, int]:
        raw = name.encode()
        key = bpf._decode_table_type(json.loads(lib.bpf_table_key_desc(bpf.module, raw).decode()))
        leaf = bpf._decode_table_type(json.loads(lib.bpf_table_leaf_desc(bpf.module, raw).decode()))
        max_entries = lib.bpf_table_max_entries_id(bpf.module, lib.bpf_table_id(bpf.module, raw))
        return key, leaf, max_entries

    yield describe
    bpf.cleanup()


def test_every_map_has_userspace_types():
    """A map added to the loader without a mirror here fails (the sockmap-only sockhash's
    key is built in BPF only: userspace never reads it)."""
    assert set(loader.MAPS) == set(maps.MAP_TYPES)


@pytest.mark.parametrize("name", sorted(maps.MAP_TYPES))
def test_key_and_value_match_the_c_structs(compiled, name):
    key, leaf, _ = compiled(name)
    py_key, py_leaf = maps.MAP_TYPES[name]
    assert layout(py_key) == layout(key), f"{name} key: maps.py {py_key.__name__} != C {key.__name__}"
    if py_leaf is not None:
        assert layout(py_leaf) == layout(leaf), f"{name} value: maps.py {py_leaf.__name__} != C {leaf.__name__}"


def test_every_struct_in_maps_py_is_checked():
    structs = {v for v in vars(maps).values() if isinstance(v, type) and issubclass(v, ctypes.Structure)
               and v.__module__ == maps.__name__}
    used = {t for pair in maps.MAP_TYPES.values() for t in pair if t is not None}

    def nested(t: type) -> set[type]:
        out = {t}
        for _, ftype, *_ in getattr(t, "_fields_", ()):
            out |= nested(ftype)
        return out

    reachable = set().union(*(nested(t) for t in used))
    assert structs <= reachable, f"not compared with C: {sorted(s.__name__ for s in structs - reachable)}"


def test_counter_array_holds_exactly_the_counter_names(compiled):
    _, leaf, max_entries = compiled("counters")
    assert max_entries == len(maps.COUNTERS) and ctypes.sizeof(leaf) == 8
    assert len(set(maps.COUNTERS)) == len(maps.COUNTERS)


def test_a_counter_list_out_of_step_with_c_does_not_compile(monkeypatch, capfd):
    """The loader passes len(COUNTERS); the header asserts it equals its enum's C_MAX."""
    from bcc import BPF

    from istio_ebpf_plugin.errors import KernelError

    monkeypatch.setattr(maps, "COUNTERS", maps.COUNTERS + ("not_in_c",))
    with pytest.raises(KernelError, match="compiling the datapath failed"):
        loader.compile_bpf(BPF, loader.PROGRAMS, "cookie", False)
    assert "maps.COUNTERS and enum counter differ" in capfd.readouterr().err   # clang's own message
