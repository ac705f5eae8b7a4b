"""Load, adopt, pin, attach, take over, retire and clean up the istio-ebpf datapath.

Lifecycle::

    with Datapath(mode="cookie", sockmap=False, pin_root=...) as dp:   # load(): compile or adopt pins
        dp.attach_cgroup("/sys/fs/cgroup/unified/kubepods")          # cgroup programs (links, pinned)
        handle = dp.add_pod("/var/run/netns/x", PodConfig(...))      # maps + sk_lookup link in the netns
        dp.update_pod(handle, new_cfg); dp.remove_pod(handle)
    # leaving the block closes file descriptors only: pinned links keep capturing
    dp.close(cleanup=True)   # detach and unpin everything

The pin layout is :mod:`.pins`'. A version's programs and CONFIGURATION maps are pinned under
``<pin_root>/versions/<version>/`` (``version`` hashes the sources and build flags, :mod:`.build`);
the connection-STATE maps in a state directory shared by every version with the same state layout;
the links in ``<pin_root>/links/``, whatever the version. A restarted agent adopts its pins; an
upgraded one loads beside the old version, fills its config maps with every pod, then retargets
each link to its own program (``take_over``: ``BPF_LINK_UPDATE``, atomic per hook) and only then
unpins the old version (``retire_other_versions``). The pods' map entries are
:mod:`.pod_entries`' job.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import logging
import os
import shutil
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import KernelError, UsageError
from . import explain, failpoint, libbpf, maps
from .build import (DEFAULT_MAP_SIZES, LAYOUT_VERSION, MAPS, PROGRAMS, SOCKMAP_MAPS, STATE_MAPS, Program,
                    build_flags, compile_bpf, datapath_version, source_text, state_dir_name)
from .headers import find_kernel_headers
from .host import DEFAULT_PIN_ROOT, ensure_bpffs, unpin_link
from .pins import PinLayout, link_netns, link_target, remove_tree, rename_link, retarget
from .netns import netns_cookie
from .pod_entries import PinnedMaps, PodTable
from .podconfig import INBOUND_PORT, PodConfig

# The build's names stay importable from here (callers predate the split).
__all__ = ["DEFAULT_MAP_SIZES", "LAYOUT_VERSION", "MAPS", "PROGRAMS", "SOCKMAP_MAPS", "Program", "build_flags",
           "compile_bpf", "datapath_version", "source_text", "unpin_link",
           "Datapath", "cleanup_pins", "compile_task"]

log = logging.getLogger(__name__)


class Datapath:
    """The eBPF capture datapath of one node (or of one test)."""

    def __init__(self, mode: str = "cookie", sockmap: bool = False,
                 pin_root: str = DEFAULT_PIN_ROOT, map_sizes: dict[str, int] | None = None,
                 pod_counters: bool = True) -> None:
        if mode not in ("cookie", "podip"):
            raise UsageError(f"datapath mode must be cookie or podip, not {mode!r}")
        self.mode = mode
        self.sockmap = sockmap
        self.pin_root = Path(pin_root)
        self.map_sizes = dict(map_sizes or {})
        #: False only for the benchmark's baseline (bench variant ebpf-nocount): no per-pod counting
        self.counts_pods = pod_counters
        self.version = datapath_version(mode, sockmap, self.map_sizes, pod_counters)
        self.layout = PinLayout(self.pin_root)
        #: this version's programs and config maps
        self.pin_dir = self.layout.version(self.version)
        #: the connection-state maps, shared with every version of the same state layout
        self.state_dir = self.layout.state(state_dir_name(mode, self.map_sizes))
        self.links_dir = self.layout.links
        #: the links run our programs (set by take_over/attach_cgroup): from then on a pod's new
        #: sk_lookup link is retargeted to us too, not only created
        self.active = False
        self._taken = 0
        #: netns inode -> a pinned sk_lookup link named after another key (the other mode's pod key),
        #: read once when a pod's link is missing (_adopt_netns_link); empty after take_over
        self._netns_links: dict[int, Path] | None = None
        self.programs = tuple(p for p in PROGRAMS if sockmap or not p.needs_sockmap)
        self.map_names = MAPS + (SOCKMAP_MAPS if sockmap else ())
        self.prog_fds: dict[str, int] = {}
        self.map_fds: dict[str, int] = {}
        self.adopted = False
        self._bpf = None   # the BCC module when we compiled it ourselves
        self._maps = PinnedMaps(self.map_fds)     # sees map_fds as load/adopt fill it
        self._pods = PodTable(self._maps)

    # ---- load / adopt -------------------------------------------------------------
    def __enter__(self) -> "Datapath":
        self.load()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(cleanup=True)

    def load(self) -> "Datapath":
        ensure_bpffs(self.pin_root)
        if self._complete_pins():
            self._adopt()
            log.info("adopted pinned datapath %s", self.pin_dir)
            return self
        try:
            self._compile_and_pin()
        except BaseException:
            self.close(cleanup=True)   # never leave half a datapath pinned
            raise
        return self

    def _compile_and_pin(self) -> None:
        """Compile and pin in a worker process that exits (LLVM's ~200 MiB go with it), then adopt."""
        from . import compile_worker

        if compile_worker.in_process():
            self.compile_and_pin_here()
            return
        compile_worker.run("datapath", {"mode": self.mode, "sockmap": self.sockmap,
                                        "pin_root": str(self.pin_root), "map_sizes": self.map_sizes,
                                        "pod_counters": self.counts_pods})
        if not self._complete_pins():
            raise KernelError(f"the BCC worker reported success but {self.pin_dir} is incomplete")
        self._adopt()
        self.adopted = False       # compiled now, not inherited from an earlier agent

    @property
    def loaded_programs(self) -> tuple[Program, ...]:
        return tuple(p for p in self.programs if p.func in self.prog_fds)

    def _map_pin(self, name: str) -> Path:
        return self.state_dir / name if name in STATE_MAPS else self.pin_dir / "maps" / name

    def _complete_pins(self) -> bool:
        return all(self._map_pin(m).exists() for m in self.map_names) and \
            all((self.pin_dir / "progs" / p.func).exists() for p in self.programs if not p.optional)

    def _adopt(self) -> None:
        for m in self.map_names:
            self.map_fds[m] = libbpf.obj_get(str(self._map_pin(m)))
        for p in self.programs:
            path = self.pin_dir / "progs" / p.func
            if path.exists() or not p.optional:
                self.prog_fds[p.func] = libbpf.obj_get(str(path))
        self.adopted = True
        log.debug("opened pinned datapath %s", self.pin_dir)

    def compile_and_pin_here(self) -> None:
        """BCC compile, load and pin in this process (the worker's job; holds LLVM's memory)."""
        find_kernel_headers()
        try:
            from bcc import BPF  # Debian python3-bpfcc
            from bcc.libbcc import lib as bcclib
        except ImportError as exc:
            raise KernelError("BCC is not importable: install Debian's python3-bpfcc and use a venv "
                              "with --system-site-packages") from exc
        # A half-written directory from a crash: start it again.
        if self.pin_dir.exists():
            shutil.rmtree(self.pin_dir, ignore_errors=True)
        # BCC opens the state maps pinned there (another version's, live connections in them)
        # or creates and pins them.
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._bpf = bpf = compile_bpf(BPF, self.programs, self.mode, self.sockmap, self.map_sizes,
                                      state_dir=str(self.state_dir), pod_counters=self.counts_pods)
        for sub in ("maps", "progs"):
            (self.pin_dir / sub).mkdir(parents=True, exist_ok=True)
        self.links_dir.mkdir(parents=True, exist_ok=True)
        for p in self.programs:
            attach = p.attach_type if p.target != "sockhash" else -1
            try:
                fn = bpf.load_func(p.func.encode(), p.prog_type, None, attach)
            except Exception as exc:
                if p.optional:
                    log.warning("kernel refused optional program %s (%s): %s", p.func, p.source, exc)
                    continue
                raise KernelError(f"loading {p.func} ({p.source}) failed: {exc}") from exc
            self.prog_fds[p.func] = os.dup(fn.fd)
            libbpf.obj_pin(self.prog_fds[p.func], str(self.pin_dir / "progs" / p.func))
        for m in self.map_names:
            fd = bcclib.bpf_table_fd(bpf.module, m.encode())
            if fd < 0:
                raise KernelError(f"map {m} missing from the compiled datapath")
            self.map_fds[m] = os.dup(fd)
            if m not in STATE_MAPS:       # BCC pinned the state maps itself
                libbpf.obj_pin(self.map_fds[m], str(self._map_pin(m)))
            elif not self._map_pin(m).exists():
                raise KernelError(f"BCC did not pin the state map {m} in {self.state_dir}")
        if self.sockmap:
            # Replaces the verdict program of the shared sockhash for sockets added from now on;
            # sockets already in it keep the program they were added with.
            libbpf.prog_attach(self.prog_fds["ie_accel"], self.map_fds["accel_socks"], libbpf.SK_MSG_VERDICT)
        log.info("compiled and pinned datapath %s", self.pin_dir)

    # ---- attachments and takeover -------------------------------------------------
    def _link_path(self, name: str) -> Path:
        return self.links_dir / name

    def _hook(self, path: Path, prog: str) -> bool:
        """Point the pinned link at ``path`` to our ``prog``; False when it needs creating."""
        if not path.exists():
            return False
        if retarget(path, self.prog_fds[prog], libbpf.obj_id(self.prog_fds[prog])) == "gone":
            return False
        return True

    def attach_cgroup(self, cgroup_path: str) -> list[str]:
        """Every cgroup hook of cgroup_path runs our program: an existing link (ours, or another
        version's) is retargeted atomically, a missing one is created. Returns new link names."""
        path = Path(cgroup_path)
        if not (path / "cgroup.procs").exists():
            raise UsageError(f"{cgroup_path} is not a cgroup v2 directory")
        self.links_dir.mkdir(parents=True, exist_ok=True)
        created = []
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            ino = os.fstat(fd).st_ino
            for p in self.loaded_programs:
                if p.target != "cgroup":
                    continue
                name = f"cg-{ino}-{p.func}"
                if self._hook(self._link_path(name), p.func):
                    self._took_one()
                    continue      # retargeted, or ours already
                link = libbpf.link_create(self.prog_fds[p.func], fd, p.attach_type)
                try:
                    libbpf.obj_pin(link, str(self._link_path(name)))
                finally:
                    os.close(link)
                created.append(name)
                self._took_one()
        finally:
            os.close(fd)
        self.active = True
        return created

    def _took_one(self) -> None:
        self._taken += 1
        failpoint.reached(f"takeover-{self._taken}")

    def take_over(self, cgroup_path: str) -> dict[str, int]:
        """After load and after every pod's config entries are written: make every hook run this
        version. Links of layout v1 move to ``links/``; each cgroup hook and each pod's sk_lookup
        link is retargeted with BPF_LINK_UPDATE (never detached, never doubled); sk_lookup links of
        pods this version does not hold (the pod is gone) are removed. Counts per outcome."""
        self._taken = 0
        self._adopt_legacy_links()
        out = {"cgroup_created": len(self.attach_cgroup(cgroup_path)), "netns_updated": 0, "netns_removed": 0}
        for path in self.layout.link_paths("deny-"):     # deny-<cgroup id>-<program>: a refused pod
            func = path.name.split("-", 2)[2]
            if func in self.prog_fds and retarget(path, self.prog_fds[func],
                                                  libbpf.obj_id(self.prog_fds[func])) == "updated":
                self._took_one()
        ours = set(self._pods.index())
        self._netns_links = {}       # every link left is named after one of ours, or is removed now
        for path in self.layout.link_paths("netns-"):
            key = path.name.split("-", 1)[1]       # netns-aside-<ino>: no pod of ours claimed it
            if not key.isdigit() or int(key) not in ours:
                unpin_link(path)
                out["netns_removed"] += 1
            elif retarget(path, self.prog_fds["ie_inbound"], libbpf.obj_id(self.prog_fds["ie_inbound"])) == "updated":
                out["netns_updated"] += 1
                self._took_one()
        return out

    def _adopt_legacy_links(self) -> None:
        """A layout-v1 version pinned its links inside its own directory: pin each link at its
        layout-v2 path too (same link, no detach), so take_over retargets it like any other."""
        self.links_dir.mkdir(parents=True, exist_ok=True)
        for legacy in self.layout.legacy_dirs():
            for path in sorted((legacy / "links").glob("*")):
                target = self._link_path(path.name)
                if not target.exists():
                    fd = libbpf.obj_get(str(path))
                    try:
                        libbpf.obj_pin(fd, str(target))
                    finally:
                        os.close(fd)
                path.unlink()       # the link lives on through its new pin

    def attached_program_ids(self, cgroup_path: str) -> dict[str, list[int]]:
        """What the kernel reports attached to a cgroup, per program of ours."""
        fd = os.open(cgroup_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return {p.func: libbpf.prog_query(fd, p.attach_type)
                    for p in self.loaded_programs if p.target == "cgroup"}
        finally:
            os.close(fd)

    def program_ids(self) -> dict[str, int]:
        return {name: libbpf.obj_id(fd) for name, fd in self.prog_fds.items()}

    # ---- pods ---------------------------------------------------------------------
    # The entries themselves (index, write with rollback, delete) are pod_entries.PodTable's.
    def pods(self) -> dict[int, maps.PodCfg]:
        """netns cookie (the pod handle) -> its pod_cfg entry, read from the map."""
        return self._pods.configs()

    def pod_key(self, netns_path: str, cgroup_path: str | None = None) -> int:
        """The pod's map key: its netns cookie (cookie mode) or its cgroup id (pod-IP mode)."""
        if self.mode == "cookie":
            return netns_cookie(netns_path)
        if not cgroup_path:
            raise UsageError("pod-IP mode keys pods by their cgroup: pass the pod's cgroup directory")
        return os.stat(cgroup_path).st_ino     # the cgroup id on 64-bit kernels

    def add_pod(self, netns_path: str, cfg: PodConfig, cgroup_path: str | None = None,
                pids: Sequence[int] = ()) -> int:
        """Capture the pod whose network namespace is netns_path (and, in pod-IP mode, whose
        cgroup v2 directory is cgroup_path). Returns its handle (the pod's map key).
        ``pids``: the pod's processes when the caller knows them (else those of cgroup_path)."""
        cookie = self.pod_key(netns_path, cgroup_path)
        self._pods.add(cookie, cfg)
        self._attach_netns(netns_path, cookie)
        # Listeners are looked for among the pod's own processes, not every process of the node.
        self.register_listeners(netns_path, cookie, cfg, cgroup_path=cgroup_path, pids=pids)
        return cookie

    def update_pod(self, handle: int, cfg: PodConfig) -> None:
        if handle not in self._pods.index():
            raise KeyError(f"pod {handle:#x} is not managed")
        self._pods.write(handle, cfg)

    def set_init_bypass(self, handle: int, cgroup_ids: Iterable[int]) -> None:
        """The cgroups of the pod's app init containers whose connections go uncaptured (the pod
        must carry ``init_bypass``); replaces the pod's previous set. Raises KeyError for a pod
        that is not ours, KernelError when the map is full (those containers stay captured)."""
        if handle not in self._pods.index():
            raise KeyError(f"pod {handle:#x} is not managed")
        self._pods.set_bypass(handle, set(cgroup_ids))

    def init_bypass(self, handle: int) -> set[int]:
        """The cgroup ids listed for the pod now (empty for an unknown pod)."""
        entry = self._pods.index().get(handle)
        return set(entry.bypass) if entry is not None else set()

    def remove_pod(self, handle: int) -> None:
        self._pods.remove(handle)
        link = self._link_path(f"netns-{handle}")
        if link.exists():
            unpin_link(link)

    def _attach_netns(self, netns_path: str, cookie: int) -> None:
        path = self._link_path(f"netns-{cookie}")
        fd = os.open(netns_path, os.O_RDONLY)
        try:
            ino = os.fstat(fd).st_ino
            if path.exists():
                held = link_netns(path)
                if held and held != ino:
                    # The other mode's link of ANOTHER pod whose key there equals ours here (netns
                    # cookies and cgroup ids are both small counters): set aside, for that pod's
                    # own add_pod to claim by its netns, or for take_over to remove.
                    aside = self._link_path(f"netns-aside-{held}")
                    rename_link(path, aside)
                    if self._netns_links is not None:
                        self._netns_links[held] = aside
                elif not held:
                    unpin_link(path)     # its netns is gone (a new sandbox, same key): nothing runs there
            if not path.exists():
                self._adopt_netns_link(ino, path)
            if path.exists():
                # Another version's link stays until take_over retargets every hook at once; after
                # that (a re-added pod) it runs ours at once.
                if not self.active or self._hook(path, "ie_inbound"):
                    return
            self.links_dir.mkdir(parents=True, exist_ok=True)
            link = libbpf.link_create(self.prog_fds["ie_inbound"], fd, libbpf.SK_LOOKUP)
            try:
                libbpf.obj_pin(link, str(path))
            finally:
                os.close(link)
        finally:
            os.close(fd)

    def _adopt_netns_link(self, netns_ino: int, path: Path) -> None:
        """The other mode keys pods differently (netns cookie vs cgroup id), so after a mode change
        the pod's sk_lookup link is pinned under another name: pin that same link at ``path`` (never
        a second link in the netns: two of our programs would run there until take_over). The
        links are read once; a link moved here is dropped from the index, a stale entry is checked."""
        if self._netns_links is None:
            self._netns_links = {}
            for pinned in self.layout.link_paths("netns-"):
                ino = link_netns(pinned)
                if ino:
                    self._netns_links[ino] = pinned
        other = self._netns_links.pop(netns_ino, None)
        if other is None or not other.exists() or link_netns(other) != netns_ino:
            return
        key = other.name.split("-", 1)[1]
        if key.isdigit() and int(key) in self._pods.index():
            return         # a pod of ours (the same netns under two keys): not another mode's link
        rename_link(other, path)
        log.info("sk_lookup link %s of another mode is %s now (same link)", other.name, path.name)

    # ---- refusing a pod that cannot be programmed ---------------------------------
    # When a pod's entries cannot be written (full maps, ...), its connections must not go out
    # uncaptured: bpf/deny.c is linked into the pod's own cgroup and netns instead. It takes
    # no map space; the links are pinned beside the others, named after the pod's cgroup id.
    def deny_pod(self, netns_path: str, cgroup_path: str) -> int:
        """Refuse every connection of one pod (idempotent). Returns the deny's handle (the
        pod's cgroup id). Raises OSError when neither its cgroup nor its netns can be opened."""
        cg_fd = os.open(cgroup_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            cgid = os.fstat(cg_fd).st_ino
            self._link_deny(cgid, "pod-cgroup", cg_fd)
        finally:
            os.close(cg_fd)
        try:
            ns_fd = os.open(netns_path, os.O_RDONLY)
        except OSError as exc:
            log.warning("pod netns %s gone: its outbound connections are refused, inbound is not: %s",
                        netns_path, exc)
            return cgid
        try:
            self._link_deny(cgid, "pod-netns", ns_fd)
        finally:
            os.close(ns_fd)
        return cgid

    def _link_deny(self, cgid: int, target: str, target_fd: int) -> None:
        for p in self.loaded_programs:
            if p.target != target:
                continue
            if self._link_path(f"deny-{cgid}-{p.func}").exists():
                if not self.active or self._hook(self._link_path(f"deny-{cgid}-{p.func}"), p.func):
                    continue
            link = libbpf.link_create(self.prog_fds[p.func], target_fd, p.attach_type)
            try:
                libbpf.obj_pin(link, str(self._link_path(f"deny-{cgid}-{p.func}")))
            finally:
                os.close(link)

    def allow_pod(self, deny: int) -> None:
        """Undo :meth:`deny_pod` (idempotent; the pod may be gone)."""
        for link in self.layout.link_paths(f"deny-{deny}-"):
            unpin_link(link)

    def denied(self) -> set[int]:
        """The cgroup ids of every pod refused now (also by a previous agent)."""
        return {int(p.name.split("-")[1]) for p in self.layout.link_paths("deny-")}

    # ---- inbound listener (userspace path) ----------------------------------------
    def register_listeners(self, netns_path: str, cookie: int | None = None,
                           cfg: PodConfig | None = None, proc: str = "/proc",
                           by_netns: dict | None = None, cgroup_path: str | None = None,
                           pids: Sequence[int] = ()) -> int:
        """Find sockets listening on 15006 in the pod and make them the sk_lookup target.

        Cookie mode does this in sockops when Envoy starts listening; this path
        covers a listener that existed before the pod was added, and is the only
        path in pod-IP mode (no netns cookie in sockops before 5.15). Returns the
        number of map entries written.
        """
        from .listeners import find_listeners

        if cookie is None:
            if self.mode != "cookie":
                raise UsageError("register_listeners needs the pod handle in pod-IP mode")
            cookie = netns_cookie(netns_path)
        ips = self._pods.ips(cookie)
        if ips is None:
            return 0
        written = 0
        for family, fd in find_listeners(netns_path, INBOUND_PORT, proc, by_netns, cgroup_path, pids):
            try:
                for ip in ips:
                    if ip.family == family:
                        self._maps.update("inbound_listeners", ip, ctypes.c_uint32(fd))
                        written += 1
            finally:
                os.close(fd)
        return written

    def refresh_listeners(self, netns_paths: dict[int, str]) -> dict[int, int]:
        """Re-register listeners for all given pods (handle -> netns path), e.g. after Envoy restarts.
        Returns the map entries written per handle (0: no 15006 listener in that pod yet)."""
        from .listeners import processes_by_netns

        by_netns = processes_by_netns()     # one /proc pass for every pod
        return {handle: self.register_listeners(path, handle, by_netns=by_netns)
                for handle, path in netns_paths.items()}

    # ---- observation --------------------------------------------------------------
    def pod_counters(self) -> dict[int, dict[str, int]]:
        """Per-pod counters by pod handle (names: maps.POD_COUNTERS; the rules of Istio's chains that
        decided the pod's connections, then events), counted by the programs in ``pod_counters``."""
        return self._pods.counters()

    def explain(self, handle: int, question: "explain.Question") -> "explain.Answer":
        """Ask the kernel (``bpf/explain.c`` over this version's maps) how the pod keyed ``handle`` would
        have ``question`` decided. :class:`.explain.ExplainUnavailable` when this kernel cannot."""
        why = explain.unavailable(self.prog_fds)
        if why:
            raise explain.ExplainUnavailable(f"this kernel cannot run explain: {why}")
        cfg = maps.PodCfg()
        if not self._maps.lookup("pod_by_netns", ctypes.c_uint64(handle), cfg):
            cfg.proxy_uid = cfg.proxy_gid = 0
        return explain.ask(self.prog_fds[explain.PROGRAM], handle, question, cfg.proxy_uid, cfg.proxy_gid)

    def counters(self) -> dict[str, int]:
        out = {}
        for i, name in enumerate(maps.COUNTERS):
            val = ctypes.c_uint64()
            self._maps.lookup("counters", ctypes.c_uint32(i), val)
            out[name] = val.value
        return out

    def occupancy(self) -> dict[str, int]:
        hashes = ("pod_by_netns", "pod_by_ip", "pod_ports", "pod_cidrs", "init_bypass", "origin_by_tuple",
                  "origin_by_cookie", "dns_origin", "app_view")
        return {name: len(self._maps.keys(name, maps.MAP_TYPES[name][0])) for name in hashes}

    # ---- teardown -----------------------------------------------------------------
    def close(self, cleanup: bool = False) -> None:
        """Close our descriptors; with cleanup also detach and unpin everything of this version
        (its links, its programs and config maps; the state maps when no other version is left)."""
        if cleanup and self.pin_dir.exists():
            # Our programs by id: from our descriptors, or from the pins when this object was closed
            # already (an empty set would remove the version but leave its links attached).
            ours = set(self.program_ids().values()) or _pinned_program_ids(self.pin_dir / "progs")
            if self.sockmap and "accel_socks" in self.map_fds and "ie_accel" in self.prog_fds:
                try:
                    libbpf.prog_detach(self.prog_fds["ie_accel"], self.map_fds["accel_socks"],
                                       libbpf.SK_MSG_VERDICT)
                except OSError as exc:
                    if exc.errno != errno.ENOENT:
                        raise
            for link in self.layout.link_paths():
                if link_target(link) in ours:
                    unpin_link(link)
            remove_tree(self.pin_dir)
            _rmdir_quiet(self.layout.links, self.layout.versions)
            if not self.layout.version_dirs() and not self.layout.legacy_dirs():
                for state in self.layout.state_dirs():
                    remove_tree(state)
            _rmdir_quiet(self.pin_root)     # only when nothing else is left
        for fd in list(self.prog_fds.values()) + list(self.map_fds.values()):
            try:
                os.close(fd)
            except OSError:
                pass
        self.prog_fds.clear()
        self.map_fds.clear()
        self._pods.forget()
        self.active = False
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None

    def other_versions(self) -> list[Path]:
        """Pins no hook needs once this version runs every hook: other versions (either layout)
        and state directories of another state layout, mode or size."""
        return [p for p in self.layout.version_dirs() + self.layout.legacy_dirs() if p != self.pin_dir] + \
            [p for p in self.layout.state_dirs() if p != self.state_dir]

    def retire_other_versions(self) -> list[str]:
        """After take_over: unpin what other versions pinned. Their programs and maps die with
        the last reference; a link still running one of their programs (a take_over that did
        not finish) keeps that program alive, so retiring is safe at any point. Names retired."""
        gone = []
        removed = 0

        def step() -> None:
            nonlocal removed
            removed += 1
            failpoint.reached(f"retire-{removed}")

        others = self.other_versions()
        for old in others:
            if old in self.layout.version_dirs():
                self.carry_counters(old)
        for old in others:
            remove_tree(old, step)
            gone.append(old.name)
        return gone

    def carry_counters(self, version_dir: Path) -> int:
        """Before another version is retired: its pods' counts become where ours continue from
        (:meth:`.pod_entries.PodTable.carry`), so a pod's counters never go back at an upgrade.
        Its maps are read by layout, not by our mirrors (its pod_cfg may be longer, its counter
        list shorter: counters are append-only). Returns the pods carried."""
        maps_dir = version_dir / "maps"
        fds: dict[str, int] = {}
        try:
            for name in ("pod_by_netns", "pod_counters", "pod_counter_base"):
                if (maps_dir / name).exists():
                    fds[name] = libbpf.obj_get(str(maps_dir / name))
            if "pod_by_netns" not in fds or "pod_counters" not in fds:
                return 0      # a version from before per-pod counters: nothing to carry
            cfg_size = libbpf.map_value_size(fds["pod_by_netns"])
            older: dict[int, list[int]] = {}
            for key in libbpf.map_keys(fds["pod_by_netns"], ctypes.c_uint64):
                cfg = (ctypes.c_ubyte * cfg_size)()
                if not libbpf.map_lookup(fds["pod_by_netns"], key, cfg):
                    continue
                pod_id = ctypes.c_uint32(int.from_bytes(bytes(cfg[:4]), "little"))   # pod_cfg.pod_id
                total: list[int] = []
                for name in ("pod_counters", "pod_counter_base"):
                    if name in fds:
                        words = libbpf.map_value_size(fds[name]) // 8
                        value = (ctypes.c_uint64 * words)()
                        if libbpf.map_lookup(fds[name], pod_id, value):
                            total = [a + b for a, b in itertools.zip_longest(total, value, fillvalue=0)]
                older[key.value] = total
            return self._pods.carry(older)
        finally:
            for fd in fds.values():
                os.close(fd)


def _rmdir_quiet(*dirs: Path) -> None:
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            pass


def compile_task(args: dict) -> list[str]:
    """The compile worker's "datapath" task: compile, load and pin here, keep the pins, exit."""
    dp = Datapath(mode=args["mode"], sockmap=args["sockmap"], pin_root=args["pin_root"],
                  map_sizes=args.get("map_sizes") or {}, pod_counters=args.get("pod_counters", True))
    try:
        dp.compile_and_pin_here()
    except BaseException:
        dp.close(cleanup=True)     # never leave half a datapath pinned
        raise
    loaded = sorted(dp.prog_fds)
    dp.close(cleanup=False)        # the pins stay; the parent adopts them
    return loaded


def cleanup_pins(pin_root: str = DEFAULT_PIN_ROOT) -> list[str]:
    """Remove every pinned istio-ebpf object below pin_root (agent --cleanup).

    Links first (unpinning a link is what detaches it), then every version, state and probe
    directory; sk_msg attachments die with the map.
    """
    root = Path(pin_root)
    removed: list[str] = []
    if not root.exists():
        return removed
    layout = PinLayout(root)
    for link in layout.link_paths():
        unpin_link(link)
        removed.append(str(link))
    for directory in sorted(root.iterdir()):
        if directory.is_dir() and directory.name == "versions":
            for version in layout.version_dirs():
                removed += remove_tree(version)
        if directory.is_dir():
            removed += remove_tree(directory)
    _rmdir_quiet(root)
    return removed


def _pinned_program_ids(progs: Path) -> set[int]:
    """The ids of the programs pinned in a version's progs/ directory."""
    ids: set[int] = set()
    for pin in progs.iterdir() if progs.is_dir() else []:
        try:
            fd = libbpf.obj_get(str(pin))
        except OSError:
            continue
        try:
            ids.add(libbpf.obj_id(fd))
        finally:
            os.close(fd)
    return ids
