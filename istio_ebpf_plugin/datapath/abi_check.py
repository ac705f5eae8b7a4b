"""The Python side of ``bpf/abi.h``, checked by the C compiler in every build.

``bpf/abi.h`` holds what the programs and userspace share; :mod:`.maps` (structs, flags, kinds,
counters and per-pod counters, map sizes) and :mod:`.podconfig` (ports, the passthrough source) mirror it under the
same names. :func:`static_asserts` turns the mirrors into C: one ``_Static_assert`` per struct
size, per field offset and size (by field NAME), per constant and per counter index (node and per-pod). The build
(:func:`.build.compile_bpf`) appends it to the sources, so a mirror out of step fails the node's
own compile with a message that names the field or constant ("ABI: ..."), not only CI.

The other direction (a C field or constant without a mirror) is
``tests/test_maps_layout.py``'s: it compares BCC's own description of every map type with the
mirrors by name, and every ``#define`` and struct of the header with the lists below.
"""

from __future__ import annotations

import ctypes
import ipaddress
import sys
from types import ModuleType

from . import maps, podconfig

#: Prefix of every generated message (the build quotes those lines in its error).
MARK = "ABI: "

#: Integer constants mirrored by name: (module, names). The value is read when the check is built.
CONSTANTS: tuple[tuple[ModuleType, tuple[str, ...]], ...] = (
    (podconfig, ("OUTBOUND_PORT", "INBOUND_PORT", "DNS_PROXY_PORT", "HBONE_PORT", "DNS_PORT")),
    (maps, ("SO_ORIGINAL_DST",
            "POD_INBOUND_ALL", "POD_DNS_CAPTURE", "POD_OUT_PORT_INCL", "POD_INIT_BYPASS",
            "PORT_IN_INCLUDE", "PORT_IN_EXCLUDE", "PORT_OUT_INCLUDE", "PORT_OUT_EXCLUDE",
            "CIDR_EXCLUDE", "CIDR_INCLUDE",
            "CONN_REDIRECTED", "CONN_INBOUND", "STATE_LAYOUT_VERSION",
            "EXPLAIN_REQ_OFFSET", "EXPLAIN_OUTBOUND", "EXPLAIN_INBOUND",
            "EXPLAIN_DECIDED", "EXPLAIN_NO_POD", "EXPLAIN_NO_POD_IP", "EXPLAIN_OWN_POD", "EXPLAIN_UDP_IGNORED")),
)

#: IPv4 addresses mirrored by name: C holds them as the u32 a program reads (network order in memory).
ADDRESSES: tuple[tuple[ModuleType, tuple[str, ...]], ...] = (
    (podconfig, ("INBOUND_PASSTHROUGH_SRC",)),
)

#: C name of a default map size: DEFAULT_<name> (maps.DEFAULT_MAP_SIZES is keyed by the build flag's name).
MAP_SIZE_PREFIX = "DEFAULT_"


def counter_enum(name: str) -> str:
    """The C enumerator of a counter name (maps.COUNTERS): ``out_redirect`` -> ``C_OUT_REDIRECT``."""
    return "C_" + name.upper()


def pod_counter_enum(name: str) -> str:
    """The C enumerator of a per-pod counter (maps.POD_COUNTERS): ``origdst_hit`` -> ``PC_ORIGDST_HIT``."""
    return "PC_" + name.upper()


def structs() -> dict[str, type]:
    """C struct name -> its ctypes mirror (every Structure in :mod:`.maps` with a ``c_name``)."""
    found: dict[str, type] = {}
    for value in vars(maps).values():
        name = getattr(value, "c_name", None)
        if isinstance(value, type) and issubclass(value, ctypes.Structure) and isinstance(name, str):
            found[name] = value
    return found


def constants() -> dict[str, int]:
    """C name -> the value Python uses, for every mirrored constant, address and default map size."""
    out: dict[str, int] = {}
    for module, names in CONSTANTS:
        for name in names:
            out[name] = int(getattr(module, name))
    for module, names in ADDRESSES:
        for name in names:
            packed = ipaddress.IPv4Address(getattr(module, name)).packed
            out[name] = int.from_bytes(packed, sys.byteorder)
    for name, value in maps.DEFAULT_MAP_SIZES.items():
        out[MAP_SIZE_PREFIX + name] = int(value)
    return out


def _where(name: str) -> str:
    for module, names in CONSTANTS + ADDRESSES:
        if name in names:
            return f"{module.__name__.rsplit('.', 1)[-1]}.{name}"
    return f"maps.DEFAULT_MAP_SIZES[{name[len(MAP_SIZE_PREFIX):]!r}]"


def _assert(cond: str, message: str) -> str:
    return f'_Static_assert({cond}, "{MARK}{message}");'


def _struct_asserts(c_name: str, cls: type) -> list[str]:
    py = f"maps.{cls.__name__}"
    member = f"((struct {c_name} *)0)"
    out = [_assert(f"sizeof(struct {c_name}) == {ctypes.sizeof(cls)}",
                   f"{py} is {ctypes.sizeof(cls)} bytes, struct {c_name} is not")]
    for field_name, ftype, *_ in cls._fields_:   # type: ignore[attr-defined]
        desc = getattr(cls, field_name)
        out.append(_assert(f"__builtin_offsetof(struct {c_name}, {field_name}) == {desc.offset}",
                           f"{py}.{field_name} is at offset {desc.offset}, {c_name}.{field_name} is not"))
        out.append(_assert(f"sizeof({member}->{field_name}) == {desc.size}",
                           f"{py}.{field_name} is {desc.size} bytes, {c_name}.{field_name} is not"))
        nested = getattr(ftype, "c_name", None)
        if nested:
            out.append(_assert(f"__builtin_types_compatible_p(__typeof__({member}->{field_name}), struct {nested})",
                               f"{py}.{field_name} is a {ftype.__name__} (struct {nested}), "
                               f"{c_name}.{field_name} is not"))
    return out


def static_asserts() -> str:
    """C source: every mirror of :mod:`.maps` and :mod:`.podconfig` asserted against bpf/abi.h by name."""
    lines = ["/* generated by istio_ebpf_plugin/datapath/abi_check.py: the Python mirrors of abi.h */"]
    for c_name, cls in structs().items():
        lines += _struct_asserts(c_name, cls)
    for name, value in constants().items():
        lines.append(_assert(f"{name} == {value}", f"{_where(name)} is {value}, {name} in bpf/abi.h is not"))
    for index, name in enumerate(maps.COUNTERS):
        lines.append(_assert(f"{counter_enum(name)} == {index}",
                             f"maps.COUNTERS[{index}] is {name!r}, {counter_enum(name)} is not {index}"))
    lines.append(_assert(f"C_MAX == {len(maps.COUNTERS)}",
                         f"maps.COUNTERS names {len(maps.COUNTERS)} counters, enum counter has another number"))
    for index, name in enumerate(maps.POD_COUNTERS):
        lines.append(_assert(f"{pod_counter_enum(name)} == {index}",
                             f"maps.POD_COUNTERS[{index}] is {name!r}, {pod_counter_enum(name)} is not {index}"))
    lines.append(_assert(f"PC_MAX == {len(maps.POD_COUNTERS)}", f"maps.POD_COUNTERS names {len(maps.POD_COUNTERS)} "
                         "counters, enum pod_counter has another number"))
    return "\n".join(lines) + "\n"


def diagnostics(stderr: str) -> list[str]:
    """The ABI messages among a failed compile's diagnostics (clang's error lines), each once, in order."""
    found: list[str] = []
    for line in stderr.splitlines():
        at = line.find(MARK)
        if at < 0 or "error" not in line[:at]:
            continue            # clang also quotes the source line: only its error line counts
        message = line[at + len(MARK):].rstrip().rstrip('"')
        if message not in found:
            found.append(message)
    return found
