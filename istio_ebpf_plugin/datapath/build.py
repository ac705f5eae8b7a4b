"""What the datapath is built from: programs, maps, sources, build flags, version, compile.

Nothing here touches the kernel except :func:`compile_bpf` (BCC creates the maps while
compiling); loading, pinning and attaching are :mod:`.loader`'s job.

``datapath_version`` hashes the sources and the build flags: it names the version's pin
directory (its programs and CONFIGURATION maps), so an agent built differently never adopts
another build's programs. ``state_dir_name`` names the connection-STATE maps' directory, shared
by every build with the same state layout, mode and map sizes (docs/architecture.md, "Upgrades").

Every compile also checks the Python mirrors of ``bpf/abi.h`` (:mod:`.abi_check`): a mirror out of
step fails it, and the error names what differs.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Iterable

from ..errors import KernelError, UsageError
from ..resources import bpf_dir
from . import abi_check, libbpf, maps

#: Bumped when the pin root's layout (links/, versions/<version>/, state-*/) changes.
#: v1 (one directory per version holding its links too) is retired by a v2 agent.
LAYOUT_VERSION = "v2"
#: bpf/abi.h STATE_LAYOUT_VERSION: the connection-state maps' layout (tests/test_state_layout.py).
STATE_LAYOUT_VERSION = maps.STATE_LAYOUT_VERSION
#: ISTIO_EBPF_DATAPATH_VARIANT (image build argument DATAPATH_VARIANT): words appended to pod_cfg,
#: i.e. another CONFIG map layout and another datapath version (maps.VARIANT reads it too).
VARIANT_ENV = maps.VARIANT_ENV


@dataclass(frozen=True)
class Program:
    func: str
    source: str
    prog_type: int
    attach_type: int
    #: "cgroup" | "netns" | "sockhash" | "pod-cgroup" | "pod-netns" (deny_pod) | "test-run" (never
    #: attached: run by userspace with BPF_PROG_TEST_RUN, explain.py)
    target: str
    needs_sockmap: bool = False
    #: Hardening extras: used where the kernel accepts them, skipped (and logged) where not.
    optional: bool = False


PROGRAMS: tuple[Program, ...] = (
    Program("ie_connect4", "connect.c", libbpf.PROG_CGROUP_SOCK_ADDR, libbpf.CGROUP_INET4_CONNECT, "cgroup"),
    Program("ie_connect6", "connect.c", libbpf.PROG_CGROUP_SOCK_ADDR, libbpf.CGROUP_INET6_CONNECT, "cgroup"),
    Program("ie_sockops", "sockops.c", libbpf.PROG_SOCK_OPS, libbpf.SOCK_OPS, "cgroup"),
    Program("ie_getsockopt", "getsockopt.c", libbpf.PROG_CGROUP_SOCKOPT, libbpf.CGROUP_GETSOCKOPT, "cgroup"),
    Program("ie_sendmsg4", "dns.c", libbpf.PROG_CGROUP_SOCK_ADDR, libbpf.CGROUP_UDP4_SENDMSG, "cgroup"),
    Program("ie_sendmsg6", "dns.c", libbpf.PROG_CGROUP_SOCK_ADDR, libbpf.CGROUP_UDP6_SENDMSG, "cgroup"),
    Program("ie_recvmsg4", "dns.c", libbpf.PROG_CGROUP_SOCK_ADDR, libbpf.CGROUP_UDP4_RECVMSG, "cgroup"),
    Program("ie_recvmsg6", "dns.c", libbpf.PROG_CGROUP_SOCK_ADDR, libbpf.CGROUP_UDP6_RECVMSG, "cgroup"),
    Program("ie_getpeername4", "sockname.c", libbpf.PROG_CGROUP_SOCK_ADDR, libbpf.CGROUP_INET4_GETPEERNAME,
            "cgroup"),
    Program("ie_getpeername6", "sockname.c", libbpf.PROG_CGROUP_SOCK_ADDR, libbpf.CGROUP_INET6_GETPEERNAME,
            "cgroup"),
    Program("ie_getsockname4", "sockname.c", libbpf.PROG_CGROUP_SOCK_ADDR, libbpf.CGROUP_INET4_GETSOCKNAME,
            "cgroup"),
    Program("ie_getsockname6", "sockname.c", libbpf.PROG_CGROUP_SOCK_ADDR, libbpf.CGROUP_INET6_GETSOCKNAME,
            "cgroup"),
    Program("ie_sock_create", "sock.c", libbpf.PROG_CGROUP_SOCK, libbpf.CGROUP_INET_SOCK_CREATE, "cgroup",
            optional=True),
    Program("ie_sock_release", "sock.c", libbpf.PROG_CGROUP_SOCK, libbpf.CGROUP_INET_SOCK_RELEASE, "cgroup",
            optional=True),
    Program("ie_inbound", "sk_lookup.c", libbpf.PROG_SK_LOOKUP, libbpf.SK_LOOKUP, "netns"),
    Program("ie_accel", "sk_msg.c", libbpf.PROG_SK_MSG, libbpf.SK_MSG_VERDICT, "sockhash", needs_sockmap=True),
    # Fail closed for one pod that cannot be programmed (Datapath.deny_pod): linked into that
    # pod's own cgroup and netns, never into the parent; no map.
    Program("ie_deny_connect4", "deny.c", libbpf.PROG_CGROUP_SOCK_ADDR, libbpf.CGROUP_INET4_CONNECT, "pod-cgroup"),
    Program("ie_deny_connect6", "deny.c", libbpf.PROG_CGROUP_SOCK_ADDR, libbpf.CGROUP_INET6_CONNECT, "pod-cgroup"),
    Program("ie_deny_sendmsg4", "deny.c", libbpf.PROG_CGROUP_SOCK_ADDR, libbpf.CGROUP_UDP4_SENDMSG, "pod-cgroup"),
    Program("ie_deny_sendmsg6", "deny.c", libbpf.PROG_CGROUP_SOCK_ADDR, libbpf.CGROUP_UDP6_SENDMSG, "pod-cgroup"),
    Program("ie_deny_inbound", "deny.c", libbpf.PROG_SK_LOOKUP, libbpf.SK_LOOKUP, "pod-netns"),
    # `istio-ebpf explain`: the hooks' decision functions over the same maps, run on request.
    # Optional: a kernel that refuses it still captures; explain then says it cannot answer.
    Program("ie_explain", "explain.c", libbpf.PROG_SCHED_CLS, -1, "test-run", optional=True),
)

MAPS = ("pod_by_netns", "pod_by_ip", "pod_ports", "pod_cidrs", "init_bypass", "origin_by_cookie",
        "origin_by_tuple", "inbound_listeners", "dns_origin", "app_view", "counters", "pod_counters",
        "pod_counter_base")
SOCKMAP_MAPS = ("accel_socks",)
#: The connection-STATE maps (bpf/maps_conn.h): pinned in the shared state directory; every
#: other map is the version's own (pinned below versions/<version>/maps).
STATE_MAPS = frozenset({"origin_by_cookie", "origin_by_tuple", "inbound_listeners", "dns_origin", "app_view",
                        "accel_socks"})


#: Map sizes (bpf/abi.h defaults, checked by name at every build).
DEFAULT_MAP_SIZES = maps.DEFAULT_MAP_SIZES


def build_flags(mode: str, sockmap: bool, map_sizes: dict[str, int] | None = None,
                pod_counters: bool = True) -> list[str]:
    flags = [f"-DISTIO_EBPF_COOKIE={1 if mode == 'cookie' else 0}",
             f"-DISTIO_EBPF_SOCKMAP={1 if sockmap else 0}",
             # the counters array is sized from the names userspace reads (C asserts they agree)
             f"-DISTIO_EBPF_COUNTERS={len(maps.COUNTERS)}"]
    if not pod_counters:
        # the benchmark's baseline (bench variant ebpf-nocount): pod_count() counts nothing
        flags.append("-DISTIO_EBPF_POD_COUNTERS=0")
    if maps.VARIANT:
        flags.append(f"-DISTIO_EBPF_VARIANT={maps.VARIANT}")
    for name, value in sorted((map_sizes or {}).items()):
        if name not in DEFAULT_MAP_SIZES or not 1 <= int(value) <= 1 << 24:
            raise UsageError(f"bad map size {name}={value}")
        flags.append(f"-D{name}={int(value)}")
    return flags


def compile_bpf(bpf_class: Any, programs: Iterable[Program], mode: str, sockmap: bool,
                map_sizes: dict[str, int] | None = None, state_dir: str | None = None,
                pod_counters: bool = True) -> Any:
    """The BCC module of ``programs`` built for mode/sockmap (maps created, programs not loaded yet).

    The sources carry :func:`.abi_check.static_asserts` at their end: the build fails when the
    Python mirrors and bpf/abi.h differ, and the error names each difference.

    With ``state_dir`` the connection-state maps are BCC pinned tables there: opened when
    pinned already (another version's), created and pinned otherwise. It is not part of the
    version hash: the same build under another pin root is the same version.
    """
    if state_dir is not None and ('"' in state_dir or "\\" in state_dir):
        raise UsageError(f"state directory {state_dir!r} cannot be a C string")
    pinned = [f'-DIE_STATE_DIR="{state_dir}"'] if state_dir else []
    # A call to a function no included header declares is an error, not a program the
    # verifier refuses later (a file must include what it uses).
    cflags = [f"-I{bpf_dir()}", *build_flags(mode, sockmap, map_sizes, pod_counters), *pinned,
              "-Wno-unused-function",
              "-Werror=implicit-function-declaration"]
    text, headers = _source_and_headers(programs)
    if "abi.h" in headers:   # deny.c alone uses no shared layout: nothing to check against
        text += "\n" + abi_check.static_asserts()
    with tempfile.TemporaryFile() as diagnostics:
        try:
            with _stderr_to(diagnostics):
                return bpf_class(text=text, cflags=cflags)
        except Exception as exc:
            diagnostics.seek(0)
            differ = abi_check.diagnostics(diagnostics.read().decode(errors="replace"))
            if differ:
                raise KernelError("compiling the datapath failed: bpf/abi.h and its Python mirrors differ: "
                                  + "; ".join(differ)) from exc
            raise KernelError(f"compiling the datapath failed: {exc}") from exc


class _stderr_to:
    """Send file descriptor 2 to ``file`` for a while, then copy what came back to the real fd 2.

    clang's diagnostics are the only place a failed BCC compile says why, and BCC prints them
    to fd 2 rather than returning them: this keeps them visible and readable.
    """

    def __init__(self, file: Any) -> None:
        self.file = file
        self.saved = -1

    def __enter__(self) -> None:
        sys.stderr.flush()
        self.saved = os.dup(2)
        os.dup2(self.file.fileno(), 2)

    def __exit__(self, *exc: object) -> None:
        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.file.flush()
        self.file.seek(0)
        copied = memoryview(self.file.read())
        while copied:
            copied = copied[os.write(2, copied):]


def _inline_local_includes(text: str, seen: set[str]) -> str:
    """Expand ``#include "x.h"`` from bpf/ in place, once each.

    BCC rewrites map method calls (``map.lookup()``) only in the main source,
    not in included files, so the shared headers must become part of it.
    """
    out = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith('#include "') and stripped.endswith('"'):
            name = stripped[len('#include "'):-1]
            if name not in seen:
                seen.add(name)
                out.append(_inline_local_includes((bpf_dir() / name).read_text(), seen))
            continue
        out.append(line)
    return "\n".join(out)


def source_text(programs: Iterable[Program]) -> str:
    return _source_and_headers(programs)[0]


def _source_and_headers(programs: Iterable[Program]) -> tuple[str, set[str]]:
    """The program files as one text (headers inlined once) and the headers it inlined."""
    files: list[str] = []
    for p in programs:
        if p.source not in files:
            files.append(p.source)
    seen: set[str] = set()
    directory = bpf_dir()
    return "\n".join(_inline_local_includes((directory / f).read_text(), seen) for f in files), seen


def datapath_version(mode: str, sockmap: bool, map_sizes: dict[str, int] | None = None,
                     pod_counters: bool = True) -> str:
    h = hashlib.sha256()
    for f in sorted(bpf_dir().glob("*.[ch]")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    h.update(" ".join(build_flags(mode, sockmap, map_sizes, pod_counters)).encode())
    return f"{LAYOUT_VERSION}-{mode}{'-sockmap' if sockmap else ''}-{h.hexdigest()[:12]}"


def state_dir_name(mode: str, map_sizes: dict[str, int] | None = None) -> str:
    """The shared state directory's name: what two builds must agree on to share live connections.

    The state layout version (the structs), the mode (cookie mode keys state by netns cookie,
    pod-IP mode by address alone) and the sizes of the state maps (a pinned map keeps its
    max_entries). Not the programs, not the config maps' layout, not the sockmap switch.
    """
    sizes = {**DEFAULT_MAP_SIZES, **{k: int(v) for k, v in (map_sizes or {}).items()}}
    return f"state-s{STATE_LAYOUT_VERSION}-{mode}-c{sizes['MAX_CONNS']}-p{sizes['MAX_PODS']}"
