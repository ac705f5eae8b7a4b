"""C and Python in step, by name and by value: bpf/abi.h against datapath/maps.py and podconfig.py.

Two directions:

* Python -> C, in every build (also on a node): :mod:`istio_ebpf_plugin.datapath.abi_check`
  appends a ``_Static_assert`` per struct size, field offset and size (by field name), constant
  and counter index, so a mirror out of step fails the compile with a message naming it. The
  tests below break one mirror at a time and read that message.
* C -> Python, here: BCC describes every map's key and value type (``bpf_table_key_desc``/
  ``leaf_desc``, decoded into ctypes classes with the C field names by BCC itself); each must
  equal its mirror field by field BY NAME (a swap of two same-sized fields is caught), and every
  ``#define``, struct and counter enumerator of abi.h must have a mirror.
"""

from __future__ import annotations

import ctypes
import json
import re

import pytest

from istio_ebpf_plugin.datapath import abi_check, build, maps, podconfig
from istio_ebpf_plugin.errors import KernelError
from istio_ebpf_plugin.resources import bpf_dir

pytestmark = pytest.mark.kernel

#: abi.h's #defines that are build switches (set by build_flags), not values userspace mirrors.
BUILD_SWITCHES = {"ISTIO_EBPF_ABI_H", "ISTIO_EBPF_COOKIE", "ISTIO_EBPF_SOCKMAP", "ISTIO_EBPF_VARIANT",
                  *build.DEFAULT_MAP_SIZES}


def by_name(t: type) -> object:
    """{field name: (offset, size, nested)} of a ctypes struct; (size,) of anything else
    (u8[16] and u32[4] are the same bytes)."""
    if isinstance(t, type) and issubclass(t, ctypes.Structure):
        return {name: (getattr(t, name).offset, getattr(t, name).size, by_name(ftype))
                for name, ftype, *_ in t._fields_}
    return (ctypes.sizeof(t),)


def differences(py: type, c: type) -> list[str]:
    """What differs between a mirror and BCC's type, field by field by name (empty: in step)."""
    if getattr(py, "c_name", c.__name__) != c.__name__:
        return [f"{py.__name__} mirrors struct {py.c_name}, the map holds struct {c.__name__}"]  # type: ignore[attr-defined]
    want, got = by_name(c), by_name(py)
    if not isinstance(want, dict) or not isinstance(got, dict):
        return [] if want == got and ctypes.sizeof(py) == ctypes.sizeof(c) else [f"{py.__name__}: size"]
    out = [f"{py.__name__}.{f}: {got.get(f)} != C {want.get(f)}" for f in sorted(set(want) | set(got))
           if want.get(f) != got.get(f)]
    if ctypes.sizeof(py) != ctypes.sizeof(c):
        out.append(f"{py.__name__}: {ctypes.sizeof(py)} bytes != C {ctypes.sizeof(c)}")
    return out


def swapped(cls: type, a: str, b: str) -> type:
    """cls with fields a and b exchanged (same names, same C struct, other offsets)."""
    fields = list(cls._fields_)   # type: ignore[attr-defined]
    i, j = (next(k for k, f in enumerate(fields) if f[0] == n) for n in (a, b))
    fields[i], fields[j] = fields[j], fields[i]
    return type(cls.__name__, (ctypes.Structure,), {"c_name": cls.c_name, "_fields_": fields})  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def compiled():
    from bcc import BPF
    from bcc.libbcc import lib

    bpf = build.compile_bpf(BPF, build.PROGRAMS, "cookie", True)   # the build with every map

    def describe(name: str) -> tuple[type, type, int]:
        raw = name.encode()
        key = bpf._decode_table_type(json.loads(lib.bpf_table_key_desc(bpf.module, raw).decode()))
        leaf = bpf._decode_table_type(json.loads(lib.bpf_table_leaf_desc(bpf.module, raw).decode()))
        max_entries = lib.bpf_table_max_entries_id(bpf.module, lib.bpf_table_id(bpf.module, raw))
        return key, leaf, max_entries

    yield describe
    bpf.cleanup()


def compile_error() -> str:
    from bcc import BPF

    with pytest.raises(KernelError, match="compiling the datapath failed") as err:
        build.compile_bpf(BPF, build.PROGRAMS, "cookie", False)
    return str(err.value)


def test_every_map_has_userspace_types():
    assert set(build.MAPS + build.SOCKMAP_MAPS) == set(maps.MAP_TYPES)


@pytest.mark.parametrize("name", sorted(maps.MAP_TYPES))
def test_key_and_value_match_the_c_structs_by_name(compiled, name):
    key, leaf, _ = compiled(name)
    py_key, py_leaf = maps.MAP_TYPES[name]
    assert differences(py_key, key) == [], f"{name} key"
    if py_leaf is not None:
        assert differences(py_leaf, leaf) == [], f"{name} value"


@pytest.mark.parametrize("cls,a,b", [(maps.PortKey, "kind", "port"), (maps.PodCfg, "proxy_uid", "proxy_gid"),
                                     (maps.ConnKey, "kind", "pad")])
def test_two_swapped_fields_of_one_size_are_caught_both_ways(compiled, monkeypatch, cls, a, b):
    """Matching by position passed these (same sizes, same offsets in order); by name they differ,
    here and in the build."""
    name = next(m for m, (k, v) in maps.MAP_TYPES.items() if cls in (k, v))
    key, leaf, _ = compiled(name)
    c_type = key if maps.MAP_TYPES[name][0] is cls else leaf
    assert differences(cls, c_type) == []
    bad = swapped(cls, a, b)
    assert {d.split(":")[0] for d in differences(bad, c_type)} == {f"{cls.__name__}.{a}", f"{cls.__name__}.{b}"}

    monkeypatch.setattr(maps, cls.__name__, bad)
    error = compile_error()
    assert f"maps.{cls.__name__}.{a} is at offset" in error and f"maps.{cls.__name__}.{b} is at offset" in error
    assert error.count("\n") == 0        # one line: what the worker reports and the node logs


@pytest.mark.parametrize("module,name,wrong", [
    (podconfig, "DNS_PROXY_PORT", 15054), (podconfig, "DNS_PORT", 15053), (podconfig, "OUTBOUND_PORT", 15006),
    (podconfig, "INBOUND_PASSTHROUGH_SRC", "127.0.0.7"), (maps, "POD_DNS_CAPTURE", 4),
    (maps, "PORT_OUT_EXCLUDE", 3), (maps, "CIDR_INCLUDE", 1), (maps, "CONN_INBOUND", 1),
    (maps, "SO_ORIGINAL_DST", 81)])
def test_a_wrong_constant_fails_the_build_naming_it(monkeypatch, module, name, wrong):
    monkeypatch.setattr(module, name, wrong)
    error = compile_error()
    assert f"{module.__name__.rsplit('.', 1)[1]}.{name} is " in error and f"{name} in bpf/abi.h is not" in error


def test_a_wrong_default_map_size_fails_the_build_naming_it(monkeypatch):
    monkeypatch.setitem(maps.DEFAULT_MAP_SIZES, "MAX_CONNS", 65536)
    assert "maps.DEFAULT_MAP_SIZES['MAX_CONNS'] is 65536, DEFAULT_MAX_CONNS" in compile_error()


@pytest.mark.parametrize("names,a,b,enum", [("COUNTERS", "origdst_hit", "origdst_miss", abi_check.counter_enum),
                                             ("POD_COUNTERS", "out_captured_port", "out_captured_cidr",
                                              abi_check.pod_counter_enum)])
def test_reordered_counters_fail_the_build_naming_them(monkeypatch, names, a, b, enum):
    """A counter list in another order would mislabel every metric after it: the index of each
    name is asserted, not only the count."""
    order = list(getattr(maps, names))
    i, j = order.index(a), order.index(b)
    order[i], order[j] = order[j], order[i]
    monkeypatch.setattr(maps, names, tuple(order))
    error = compile_error()
    assert f"maps.{names}[{i}] is '{b}', {enum(b)} is not {i}" in error
    assert f"maps.{names}[{j}] is '{a}', {enum(a)} is not {j}" in error


def test_a_counter_list_out_of_step_with_c_does_not_compile(monkeypatch, capfd):
    """The loader passes len(COUNTERS) (the array's size); the header asserts it equals C_MAX."""
    monkeypatch.setattr(maps, "COUNTERS", maps.COUNTERS + ("not_in_c",))
    compile_error()
    assert "maps.COUNTERS and enum counter differ" in capfd.readouterr().err   # clang's own message


def test_counter_array_holds_exactly_the_counter_names(compiled):
    _, leaf, max_entries = compiled("counters")
    assert max_entries == len(maps.COUNTERS) and ctypes.sizeof(leaf) == 8
    assert len(set(maps.COUNTERS)) == len(maps.COUNTERS)


def test_pod_counters_hold_every_pod_id_and_every_name(compiled):
    """One slot per pod id (1..MAX_PODS, 0 never a pod's), one u64 per name."""
    _, leaf, max_entries = compiled("pod_counters")
    assert max_entries == maps.DEFAULT_MAP_SIZES["MAX_PODS"] + 1
    assert ctypes.sizeof(leaf) == 8 * len(maps.POD_COUNTERS)
    assert len(set(maps.POD_COUNTERS)) == len(maps.POD_COUNTERS)
    assert maps.OUTBOUND_RULES + maps.INBOUND_RULES == maps.POD_COUNTERS[:len(maps.OUTBOUND_RULES + maps.INBOUND_RULES)]



def test_every_define_struct_and_counter_of_abi_h_has_a_mirror():
    header = (bpf_dir() / "abi.h").read_text()
    defines = set(re.findall(r"^#define (\w+)", header, re.M)) - BUILD_SWITCHES
    assert defines == set(abi_check.constants())
    assert set(re.findall(r"^struct (\w+) \{", header, re.M)) == set(abi_check.structs())
    enum = re.search(r"enum counter \{(.*?)\};", header, re.S)
    assert enum is not None
    assert re.findall(r"\b(C_\w+)", enum.group(1)) == [abi_check.counter_enum(n) for n in maps.COUNTERS] + ["C_MAX"]
    pod_enum = re.search(r"enum pod_counter \{(.*?)\};", header, re.S)
    assert pod_enum is not None
    assert re.findall(r"\b(PC_\w+)", pod_enum.group(1)) == \
        [abi_check.pod_counter_enum(n) for n in maps.POD_COUNTERS] + ["PC_MAX"]


@pytest.mark.parametrize("cls", maps.PACKET_TYPES, ids=lambda c: c.c_name)
def test_test_run_packet_structs_name_every_c_field(cls):
    """No map describes these (they travel in a test-run packet): the build asserts each mirror
    field's offset and size by name; here every C field, in order, has its mirror."""
    header = (bpf_dir() / "abi.h").read_text()
    body = re.search(rf"^struct {cls.c_name} \{{(.*?)^\}};", header, re.S | re.M)
    assert body is not None
    c_fields = re.findall(r"^\s+(?:struct \w+|__u\d+)\s+(\w+)", body.group(1), re.M)
    assert c_fields == [f[0] for f in cls._fields_]


def test_every_struct_in_maps_py_is_checked():
    structs = {v for v in vars(maps).values() if isinstance(v, type) and issubclass(v, ctypes.Structure)
               and v.__module__ == maps.__name__}
    assert structs == set(abi_check.structs().values())
    used = {t for pair in maps.MAP_TYPES.values() for t in pair if t is not None}

    def nested(t: type) -> set[type]:
        out = {t}
        for _, ftype, *_ in getattr(t, "_fields_", ()):
            out |= nested(ftype)
        return out

    reachable = set().union(*(nested(t) for t in (*used, *maps.PACKET_TYPES)))
    assert structs <= reachable, f"not compared with C: {sorted(s.__name__ for s in structs - reachable)}"
