"""Facts about the host the datapath needs, found one way each.

* the cgroup v2 mount (pure v2 at ``/sys/fs/cgroup`` or the hybrid ``/sys/fs/cgroup/unified``),
* whether a path is on bpffs (statfs magic, no ``stat`` subprocess),
* the pin root and the one loop that removes a pinned datapath version.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
from pathlib import Path

from ..errors import KernelError
from . import libbpf

BPFFS_ROOT = Path("/sys/fs/bpf")
#: Pins of the node agent: one subdirectory per datapath version below it.
DEFAULT_PIN_ROOT = str(BPFFS_ROOT / "istio-ebpf")

# statfs(2) f_type values (linux/magic.h).
BPF_FS_MAGIC = 0xCAFE4A11
CGROUP2_SUPER_MAGIC = 0x63677270
CGROUP2_CANDIDATES = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.statfs.argtypes = (ctypes.c_char_p, ctypes.c_void_p)


def fs_magic(path: str | Path) -> int:
    """statfs(2) f_type of the file system holding ``path`` (raises OSError)."""
    # struct statfs is 120 bytes on 64-bit Linux, f_type (a long) first on every architecture.
    buf = ctypes.create_string_buffer(256)
    if _libc.statfs(os.fsencode(str(path)), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"statfs {path}: {os.strerror(err)}")
    return ctypes.c_ulong.from_buffer(buf).value & 0xFFFFFFFF


def is_bpffs(path: str | Path) -> bool:
    try:
        return fs_magic(path) == BPF_FS_MAGIC
    except OSError:
        return False


def ensure_bpffs(path: str | Path) -> None:
    """Raise one clear error unless ``path`` (or its nearest existing parent) is on bpffs."""
    root = Path(path)
    while not root.exists():
        root = root.parent
    if not is_bpffs(root):
        raise KernelError(f"{root} is not on a bpffs mount: mount it with 'mount -t bpf bpf /sys/fs/bpf'")


def cgroup_v2_root(candidates: tuple[str, ...] = CGROUP2_CANDIDATES) -> Path | None:
    """The cgroup v2 mount among ``candidates`` (by statfs magic), ``None`` without one."""
    for candidate in candidates:
        try:
            if fs_magic(candidate) == CGROUP2_SUPER_MAGIC:
                return Path(candidate)
        except OSError:
            continue
    return None


def require_cgroup_v2_root() -> Path:
    root = cgroup_v2_root()
    if root is None:
        raise KernelError(f"no cgroup v2 hierarchy mounted at {' or '.join(CGROUP2_CANDIDATES)}")
    return root


def cgroup_pids(cgroup_path: str) -> list[int]:
    """The processes of a cgroup and of every cgroup below it (a pod's: its containers').

    Plain scandir and open: a resync reads this for every pod, and os.walk with pathlib cost
    ~2 ms a pod under load."""
    pids: list[int] = []
    dirs = [cgroup_path]
    while dirs:
        d = dirs.pop()
        try:
            with os.scandir(d) as entries:
                dirs += [e.path for e in entries if e.is_dir(follow_symlinks=False)]
            with open(os.path.join(d, "cgroup.procs")) as f:
                pids += [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            continue      # the container went away meanwhile
    return pids


def unpin_link(path: Path) -> None:
    """Detach a pinned link now, then remove its pin.

    Dropping the last reference by unlinking the pin also detaches, but the
    kernel releases a link freed from bpffs in a workqueue, i.e. a moment
    later; an explicit detach makes clean-up synchronous.
    """
    try:
        fd = libbpf.obj_get(str(path))
    except OSError:
        fd = -1
    if fd >= 0:
        try:
            libbpf.link_detach(fd)
        except OSError:
            pass            # already detached (its cgroup or netns is gone)
        finally:
            os.close(fd)
    path.unlink(missing_ok=True)


def remove_version(version_dir: Path) -> list[str]:
    """Detach and unpin one pinned datapath version (its links first); the paths removed.

    Unpinning a link is what detaches it; sk_msg attachments die with the map.
    """
    removed = []
    for link in sorted((version_dir / "links").glob("*")):
        unpin_link(link)
        removed.append(str(link))
    shutil.rmtree(version_dir, ignore_errors=True)
    removed.append(str(version_dir))
    return removed
