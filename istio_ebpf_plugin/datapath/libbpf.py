"""Thin ctypes bindings to the system libbpf (Debian's libbpf1).

BCC compiles and loads the programs; everything that must also work on
objects adopted from bpffs after a restart (links, pins, map access, queries)
goes through these calls, so fresh and adopted objects share one code path.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from functools import lru_cache

from ..errors import KernelError

# enum bpf_attach_type (include/uapi/linux/bpf.h)
CGROUP_INET_SOCK_CREATE = 2
SOCK_OPS = 3
SK_MSG_VERDICT = 7
CGROUP_INET4_CONNECT = 10
CGROUP_INET6_CONNECT = 11
CGROUP_UDP4_SENDMSG = 14
CGROUP_UDP6_SENDMSG = 15
CGROUP_UDP4_RECVMSG = 19
CGROUP_UDP6_RECVMSG = 20
CGROUP_GETSOCKOPT = 21
CGROUP_INET4_GETPEERNAME = 29
CGROUP_INET6_GETPEERNAME = 30
CGROUP_INET4_GETSOCKNAME = 31
CGROUP_INET6_GETSOCKNAME = 32
CGROUP_INET_SOCK_RELEASE = 34
SK_LOOKUP = 36

# enum bpf_prog_type
PROG_SCHED_CLS = 3
PROG_CGROUP_SOCK = 9
PROG_SOCK_OPS = 13
PROG_SK_MSG = 16
PROG_CGROUP_SOCK_ADDR = 18
PROG_CGROUP_SOCKOPT = 25
PROG_SK_LOOKUP = 30

BPF_ANY = 0
BPF_NOEXIST = 1
#: bpf_link_update: replace only when the link still runs the expected old program.
BPF_F_REPLACE = 1 << 2


class TestRunOpts(ctypes.Structure):
    """struct bpf_test_run_opts up to ``duration`` (libbpf reads ``sz`` and zeroes the rest)."""

    _fields_ = [("sz", ctypes.c_size_t), ("data_in", ctypes.c_void_p), ("data_out", ctypes.c_void_p),
                ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
                ("ctx_in", ctypes.c_void_p), ("ctx_out", ctypes.c_void_p),
                ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
                ("retval", ctypes.c_uint32), ("repeat", ctypes.c_int), ("duration", ctypes.c_uint32)]


class LinkUpdateOpts(ctypes.Structure):
    """struct bpf_link_update_opts up to old_prog_fd (libbpf checks fields past ``sz`` are zero)."""

    _fields_ = [("sz", ctypes.c_size_t), ("flags", ctypes.c_uint32), ("old_prog_fd", ctypes.c_uint32)]


@lru_cache(maxsize=1)
def lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        handle = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise KernelError(f"libbpf not found ({name}): install Debian's libbpf1") from exc
    handle.bpf_link_create.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    handle.bpf_link_detach.argtypes = [ctypes.c_int]
    handle.bpf_link_update.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(LinkUpdateOpts)]
    handle.bpf_prog_get_fd_by_id.argtypes = [ctypes.c_uint32]
    handle.bpf_obj_pin.argtypes = [ctypes.c_int, ctypes.c_char_p]
    handle.bpf_obj_get.argtypes = [ctypes.c_char_p]
    handle.bpf_prog_attach.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_uint]
    handle.bpf_prog_detach2.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    handle.bpf_prog_query.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_uint,
                                      ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint),
                                      ctypes.POINTER(ctypes.c_uint)]
    handle.bpf_obj_get_info_by_fd.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint)]
    for fn in ("bpf_map_update_elem", "bpf_map_lookup_elem"):
        getattr(handle, fn).argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p] + (
            [ctypes.c_ulonglong] if fn == "bpf_map_update_elem" else [])
    handle.bpf_map_delete_elem.argtypes = [ctypes.c_int, ctypes.c_void_p]
    handle.bpf_map_get_next_key.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    handle.bpf_enable_stats.argtypes = [ctypes.c_int]
    handle.bpf_prog_test_run_opts.argtypes = [ctypes.c_int, ctypes.POINTER(TestRunOpts)]
    return handle


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = -ret if ret != -1 else ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    return _check(lib().bpf_link_create(prog_fd, target_fd, attach_type, None), "bpf_link_create")


def link_detach(link_fd: int) -> None:
    _check(lib().bpf_link_detach(link_fd), "bpf_link_detach")


def link_update(link_fd: int, new_prog_fd: int, old_prog_fd: int) -> None:
    """BPF_LINK_UPDATE: the hook runs new_prog from the next event on, atomically, only if it
    ran old_prog (EPERM otherwise). cgroup links since 5.7, netns (sk_lookup) links since 5.9."""
    opts = LinkUpdateOpts(sz=ctypes.sizeof(LinkUpdateOpts), flags=BPF_F_REPLACE, old_prog_fd=old_prog_fd)
    _check(lib().bpf_link_update(link_fd, new_prog_fd, ctypes.byref(opts)), "bpf_link_update")


def link_prog_id(link_fd: int) -> int:
    """The id of the program a link runs (struct bpf_link_info: type, id, prog_id)."""
    buf = (ctypes.c_ubyte * 256)()
    size = ctypes.c_uint(256)
    _check(lib().bpf_obj_get_info_by_fd(link_fd, buf, ctypes.byref(size)), "bpf_obj_get_info_by_fd")
    return int.from_bytes(bytes(buf[8:12]), "little")


def link_netns_ino(link_fd: int) -> int:
    """The inode of the network namespace a netns link (sk_lookup) is attached to; 0 when that
    namespace is gone (struct bpf_link_info: type, id, prog_id, pad, then netns_ino at 16)."""
    buf = (ctypes.c_ubyte * 256)()
    size = ctypes.c_uint(256)
    _check(lib().bpf_obj_get_info_by_fd(link_fd, buf, ctypes.byref(size)), "bpf_obj_get_info_by_fd")
    return int.from_bytes(bytes(buf[16:20]), "little")


def prog_fd_by_id(prog_id: int) -> int:
    return _check(lib().bpf_prog_get_fd_by_id(prog_id), f"bpf_prog_get_fd_by_id {prog_id}")


def obj_pin(fd: int, path: str) -> None:
    _check(lib().bpf_obj_pin(fd, path.encode()), f"bpf_obj_pin {path}")


def obj_get(path: str) -> int:
    return _check(lib().bpf_obj_get(path.encode()), f"bpf_obj_get {path}")


def prog_attach(prog_fd: int, target_fd: int, attach_type: int, flags: int = 0) -> None:
    _check(lib().bpf_prog_attach(prog_fd, target_fd, attach_type, flags), "bpf_prog_attach")


def prog_detach(prog_fd: int, target_fd: int, attach_type: int) -> None:
    _check(lib().bpf_prog_detach2(prog_fd, target_fd, attach_type), "bpf_prog_detach2")


def prog_query(target_fd: int, attach_type: int) -> list[int]:
    """IDs of the programs attached to a cgroup (or netns) for one attach type."""
    ids = (ctypes.c_uint * 64)()
    cnt = ctypes.c_uint(64)
    flags = ctypes.c_uint(0)
    _check(lib().bpf_prog_query(target_fd, attach_type, 0, ctypes.byref(flags), ids, ctypes.byref(cnt)),
           "bpf_prog_query")
    return list(ids[: cnt.value])


def obj_id(fd: int) -> int:
    """Kernel id of a program, map or link (second u32 of every *_info struct)."""
    buf = (ctypes.c_ubyte * 256)()
    size = ctypes.c_uint(256)
    _check(lib().bpf_obj_get_info_by_fd(fd, buf, ctypes.byref(size)), "bpf_obj_get_info_by_fd")
    return int.from_bytes(bytes(buf[4:8]), "little")


def map_value_size(fd: int) -> int:
    """A map's value size (struct bpf_map_info: type, id, key_size, value_size, ...)."""
    buf = (ctypes.c_ubyte * 256)()
    size = ctypes.c_uint(256)
    _check(lib().bpf_obj_get_info_by_fd(fd, buf, ctypes.byref(size)), "bpf_obj_get_info_by_fd")
    return int.from_bytes(bytes(buf[12:16]), "little")


#: struct bpf_prog_info offsets of run_time_ns and run_cnt (uapi, stable since 5.1).
_PROG_INFO_RUN_TIME_NS = 192
_PROG_INFO_RUN_CNT = 200
BPF_STATS_RUN_TIME = 0


def prog_run_stats(prog_fd: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) the kernel accounted to a program while statistics were enabled."""
    buf = (ctypes.c_ubyte * 256)()
    size = ctypes.c_uint(256)
    _check(lib().bpf_obj_get_info_by_fd(prog_fd, buf, ctypes.byref(size)), "bpf_obj_get_info_by_fd")
    if size.value < _PROG_INFO_RUN_CNT + 8:
        raise KernelError("this kernel's bpf_prog_info has no run_time_ns/run_cnt (needs 5.1+)")
    raw = bytes(buf)
    return (int.from_bytes(raw[_PROG_INFO_RUN_TIME_NS:_PROG_INFO_RUN_TIME_NS + 8], "little"),
            int.from_bytes(raw[_PROG_INFO_RUN_CNT:_PROG_INFO_RUN_CNT + 8], "little"))


def enable_stats() -> int:
    """BPF_ENABLE_STATS: run-time statistics on while the returned fd is open (5.8+).

    The same switch as ``kernel.bpf_stats_enabled=1``, but it turns itself off when the fd is
    closed, also if the process dies, so the host's sysctl is never left changed.
    """
    return _check(lib().bpf_enable_stats(BPF_STATS_RUN_TIME), "bpf_enable_stats")


def prog_test_run(prog_fd: int, data: bytes) -> tuple[int, bytes]:
    """BPF_PROG_TEST_RUN once with ``data`` as the packet: (the program's return value, the packet
    as the program left it). Nothing is attached; the program sees its maps as they are."""
    data_in = ctypes.create_string_buffer(data, len(data))
    data_out = ctypes.create_string_buffer(len(data) + 256)
    opts = TestRunOpts(sz=ctypes.sizeof(TestRunOpts), data_in=ctypes.addressof(data_in),
                       data_out=ctypes.addressof(data_out), data_size_in=len(data),
                       data_size_out=len(data_out), repeat=1)
    _check(lib().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)), "bpf_prog_test_run")
    return opts.retval, data_out.raw[:opts.data_size_out]


def map_update(fd: int, key: ctypes.Structure | ctypes._SimpleCData,
               value: ctypes.Structure | ctypes._SimpleCData, flags: int = BPF_ANY) -> None:
    _check(lib().bpf_map_update_elem(fd, ctypes.byref(key), ctypes.byref(value), flags), "map update")


def map_lookup(fd: int, key, value) -> bool:
    ret = lib().bpf_map_lookup_elem(fd, ctypes.byref(key), ctypes.byref(value))
    if ret < 0:
        err = ctypes.get_errno() if ret == -1 else -ret
        if err == errno.ENOENT:
            return False
        raise OSError(err, f"map lookup: {os.strerror(err)}")
    return True


def map_delete(fd: int, key) -> bool:
    ret = lib().bpf_map_delete_elem(fd, ctypes.byref(key))
    if ret < 0:
        err = ctypes.get_errno() if ret == -1 else -ret
        if err == errno.ENOENT:
            return False
        raise OSError(err, f"map delete: {os.strerror(err)}")
    return True


def map_keys(fd: int, key_type) -> list:
    keys = []
    prev = None
    nxt = key_type()
    while True:
        ret = lib().bpf_map_get_next_key(fd, ctypes.byref(prev) if prev is not None else None,
                                         ctypes.byref(nxt))
        if ret < 0:
            break
        keys.append(nxt)
        prev = nxt
        nxt = key_type()
    return keys
