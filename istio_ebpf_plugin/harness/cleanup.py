"""Find and remove harness leftovers: only objects carrying our prefixes.

* network namespaces ``ie-*`` (and every process still inside them),
* cgroups ``istio-ebpf-test-*`` under the cgroup v2 root (processes killed first),
* bpffs pins ``/sys/fs/bpf/istio-ebpf-test*``,
* work directories ``/tmp/istio-ebpf-test-*``.

A running Node writes its owner pid to ``/tmp/istio-ebpf-test-<token>/owner.pid``; objects of
a Node whose owner is still alive are left alone (another session is using them), and pins
are only removed when no live owner exists at all, unless ``force``.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from . import names
from ..datapath.selftest.topology import delete_netns, kill_netns_processes, remove_cgroup


@dataclass
class Leftovers:
    netns: list[str] = field(default_factory=list)
    cgroups: list[Path] = field(default_factory=list)
    pins: list[Path] = field(default_factory=list)
    tmpdirs: list[Path] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.netns or self.cgroups or self.pins or self.tmpdirs)

    def describe(self) -> str:
        parts = [f"netns {', '.join(self.netns)}" if self.netns else "",
                 f"cgroups {', '.join(map(str, self.cgroups))}" if self.cgroups else "",
                 f"pins {', '.join(map(str, self.pins))}" if self.pins else "",
                 f"dirs {', '.join(map(str, self.tmpdirs))}" if self.tmpdirs else ""]
        return "; ".join(p for p in parts if p) or "none"

    def only(self, tokens: set[str]) -> "Leftovers":
        """The subset whose names contain one of ``tokens``."""
        def hit(name: str) -> bool:
            return any(t in name for t in tokens)
        return Leftovers([n for n in self.netns if hit(n)], [c for c in self.cgroups if hit(c.name)],
                         [p for p in self.pins if hit(p.name)], [d for d in self.tmpdirs if hit(d.name)])

    def minus(self, other: "Leftovers") -> "Leftovers":
        return Leftovers([n for n in self.netns if n not in other.netns],
                         [c for c in self.cgroups if c not in other.cgroups],
                         [p for p in self.pins if p not in other.pins],
                         [d for d in self.tmpdirs if d not in other.tmpdirs])


OWNER_FILE = "owner.pid"


def live_tokens() -> set[str]:
    """Tokens of Nodes whose owning process is still running."""
    tokens = set()
    for d in names.TMP_ROOT.glob(f"{names.TMP_PREFIX}*"):
        try:
            pid = int((d / OWNER_FILE).read_text().split()[0])
            os.kill(pid, 0)
        except (OSError, ValueError, IndexError):
            continue
        tokens.add(_token_of(d.name))   # /tmp/istio-ebpf-test-<token>[-<what>...]
    return tokens


def _token_of(name: str) -> str:
    for prefix in (names.NETNS_PREFIX, names.CGROUP_PREFIX, names.TMP_PREFIX):
        if name.startswith(prefix):
            return name[len(prefix):].split("-")[0]
    return ""


def find(force: bool = False) -> Leftovers:
    """Leftovers to remove; without ``force`` objects of live Nodes (and then all pins) are skipped."""
    found = _find_all()
    if force:
        return found
    live = live_tokens()
    if not live:
        return found
    return Leftovers([n for n in found.netns if _token_of(n) not in live],
                     [c for c in found.cgroups if _token_of(c.name) not in live], [],
                     [d for d in found.tmpdirs if _token_of(d.name) not in live])


def _find_all() -> Leftovers:
    found = Leftovers()
    if names.NETNS_DIR.is_dir():
        found.netns = sorted(n for n in os.listdir(names.NETNS_DIR) if n.startswith(names.NETNS_PREFIX))
    try:
        root = names.cgroup_v2_root()
        found.cgroups = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(names.CGROUP_PREFIX))
    except FileNotFoundError:
        pass
    if names.BPFFS_ROOT.is_dir():
        found.pins = sorted(p for p in names.BPFFS_ROOT.iterdir() if p.name.startswith(names.BPF_PIN_PREFIX))
    found.tmpdirs = sorted(p for p in names.TMP_ROOT.iterdir()
                           if p.is_dir() and p.name.startswith(names.TMP_PREFIX))
    return found


def remove(found: Leftovers) -> list[str]:
    """Remove ``found``; returns error texts (empty if everything went)."""
    errors: list[str] = []
    for ns in found.netns:
        kill_netns_processes(str(names.NETNS_DIR / ns))
    for cg in found.cgroups:
        err = remove_cgroup(cg)
        if err:
            errors.append(err)
    for ns in found.netns:
        err = delete_netns(ns)
        if err:
            errors.append(err)
    for pin in found.pins:
        try:
            if pin.is_dir() and not pin.is_symlink():
                shutil.rmtree(pin)
            else:
                pin.unlink()
        except FileNotFoundError:
            pass  # went away meanwhile
        except OSError as exc:
            errors.append(f"cannot remove {pin}: {exc}")
    for d in found.tmpdirs:
        kill_processes_naming(d)   # e.g. a crashed test's etcd/kube-apiserver (control_plane.py)
        shutil.rmtree(d, ignore_errors=True)
    return errors


def kill_processes_naming(directory: Path) -> list[int]:
    """SIGKILL every process whose command line names ``directory`` (its state lives there)."""
    needle = str(directory).encode()
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "cmdline").read_bytes():
                os.kill(int(entry.name), 9)
                killed.append(int(entry.name))
        except (OSError, ValueError):
            continue   # gone meanwhile, or not ours to read
    return killed


def cleanup(force: bool = False) -> tuple[Leftovers, list[str]]:
    found = find(force)
    return found, remove(found)
