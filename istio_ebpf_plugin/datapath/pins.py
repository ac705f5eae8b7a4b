"""The pin root's layout, and the two operations an upgrade does on it: retarget a link, retire a version.

::

    <pin_root>/links/cg-<cgroup inode>-<program>   one link per cgroup hook, whatever the version
    <pin_root>/links/netns-<pod key>               one sk_lookup link per pod (a mode change re-pins
                                                   it under the new mode's key: the same link)
    <pin_root>/state-s<N>-<mode>-c<conns>-p<pods>/ connection-STATE maps (build.state_dir_name),
                                                   shared by every version with that state layout
    <pin_root>/versions/<version>/progs/, maps/    one version's programs and CONFIGURATION maps
    <pin_root>/probes_<key>/                       the probe cache (probe_cache.py)
    <pin_root>/v1-*/                               a layout-v1 agent's version (links inside it)

Links never move when the version changes: a new version retargets them with ``BPF_LINK_UPDATE``
(atomic per hook), so a hook is never without a program and never runs two of ours.
"""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from . import libbpf
from .host import remove_version, unpin_link

LINKS = "links"
VERSIONS = "versions"
STATE_PREFIX = "state-"
PROBES_PREFIX = "probes_"


@dataclass(frozen=True)
class PinLayout:
    root: Path

    @property
    def links(self) -> Path:
        return self.root / LINKS

    @property
    def versions(self) -> Path:
        return self.root / VERSIONS

    def version(self, name: str) -> Path:
        return self.versions / name

    def state(self, name: str) -> Path:
        return self.root / name

    def version_dirs(self) -> list[Path]:
        return sorted(p for p in self.versions.iterdir() if p.is_dir()) if self.versions.is_dir() else []

    def state_dirs(self) -> list[Path]:
        return self._top(lambda n: n.startswith(STATE_PREFIX))

    def legacy_dirs(self) -> list[Path]:
        """Versions pinned by a layout-v1 agent (``<root>/v1-<mode>-<hash>/``, links inside)."""
        return self._top(lambda n: n not in (LINKS, VERSIONS) and not n.startswith((STATE_PREFIX, PROBES_PREFIX)))

    def _top(self, keep) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and keep(p.name))

    def link_paths(self, prefix: str = "") -> list[Path]:
        return sorted(self.links.glob(f"{prefix}*")) if self.links.is_dir() else []


def link_target(path: Path) -> int | None:
    """The id of the program a pinned link runs; None when the pin is gone."""
    try:
        fd = libbpf.obj_get(str(path))
    except OSError:
        return None
    try:
        return libbpf.link_prog_id(fd)
    finally:
        os.close(fd)


def link_netns(path: Path) -> int:
    """The inode of the netns a pinned sk_lookup link is attached to; 0 when the pin or the netns is gone."""
    try:
        fd = libbpf.obj_get(str(path))
    except OSError:
        return 0
    try:
        return libbpf.link_netns_ino(fd)
    finally:
        os.close(fd)


def rename_link(old: Path, new: Path) -> None:
    """Pin the link at ``old`` at ``new`` too, then drop ``old``: the same link, never detached."""
    fd = libbpf.obj_get(str(old))
    try:
        libbpf.obj_pin(fd, str(new))
    finally:
        os.close(fd)
    old.unlink()


def retarget(path: Path, prog_fd: int, prog_id: int) -> str:
    """Make the pinned link at ``path`` run ``prog_fd``: "kept" (it does already), "updated", or
    "gone" (its cgroup or netns no longer exists: the pin is removed)."""
    fd = libbpf.obj_get(str(path))
    try:
        current = libbpf.link_prog_id(fd)
        if current == prog_id:
            return "kept"
        try:
            old = libbpf.prog_fd_by_id(current)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
            old = -1
        try:
            if old < 0:
                raise OSError(errno.ENOLINK, "the link's program is gone")
            libbpf.link_update(fd, prog_fd, old)
        except OSError as exc:
            # A link whose cgroup or netns was destroyed is defunct: the kernel refuses updates
            # (ENOLINK). Nothing runs there any more; drop the pin.
            if exc.errno in (errno.ENOLINK, errno.ENOENT):
                unpin_link(path)
                return "gone"
            raise
        finally:
            if old >= 0:
                os.close(old)
        return "updated"
    finally:
        os.close(fd)


def remove_tree(directory: Path, step=None) -> list[str]:
    """Unpin a version or state directory file by file (``step`` after each: failpoints), links first."""
    removed = []
    if (directory / LINKS).is_dir():
        removed += remove_version(directory)
        return removed
    for path in sorted(directory.rglob("*"), reverse=True):
        if path.is_dir():
            path.rmdir()
        else:
            path.unlink(missing_ok=True)
            removed.append(str(path))
            if step is not None:
                step()
    shutil.rmtree(directory, ignore_errors=True)
    removed.append(str(directory))
    return removed
