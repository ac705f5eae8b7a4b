"""The pods' entries in the maps: per-pod index, write with rollback, delete, rebuild from the maps.

The maps are the source of truth (they are pinned and outlive the agent); :class:`PodTable`
mirrors them per pod (:class:`PodIndex`) so adding, updating and removing one pod touches
only that pod's entries. The mirror is rebuilt from the maps once, after a load or adoption.

All map access goes through :class:`MapAccess` (names, not descriptors): the datapath passes
:class:`PinnedMaps` (libbpf syscalls on its map fds); the unit tests pass a dict-backed fake
that can refuse an update the way a full kernel map does.
"""

from __future__ import annotations

import ctypes
import errno
import heapq
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

from ..errors import KernelError
from . import libbpf, maps
from .podconfig import PodConfig

#: errnos of a full map (hash: E2BIG, LPM trie: ENOSPC, no memory for a new element: ENOMEM).
FULL_ERRNOS = (errno.E2BIG, errno.ENOSPC, errno.ENOMEM)


class MapAccess(Protocol):
    """Map operations by map name; keys and values are the ctypes mirrors of :mod:`.maps`."""

    def keys(self, name: str, key_type: type) -> list[Any]: ...
    def lookup(self, name: str, key: Any, value: Any) -> bool: ...   # fills value; False: no entry
    def update(self, name: str, key: Any, value: Any) -> None: ...   # OSError when refused
    def delete(self, name: str, key: Any) -> bool: ...               # False: no entry


class PinnedMaps:
    """:class:`MapAccess` over the datapath's open map descriptors (name -> fd, shared, not copied)."""

    def __init__(self, fds: Mapping[str, int]) -> None:
        self.fds = fds

    def keys(self, name: str, key_type: type) -> list[Any]:
        return libbpf.map_keys(self.fds[name], key_type)

    def lookup(self, name: str, key: Any, value: Any) -> bool:
        return libbpf.map_lookup(self.fds[name], key, value)

    def update(self, name: str, key: Any, value: Any) -> None:
        libbpf.map_update(self.fds[name], key, value)

    def delete(self, name: str, key: Any) -> bool:
        return libbpf.map_delete(self.fds[name], key)


CidrTuple = tuple[int, int, int, bytes]    # (kind, family, prefixlen, addr bytes)
#: A pod id's counts: live (counted by the programs) and carried from older versions (userspace).
COUNTER_MAPS = ("pod_counters", "pod_counter_base")


@dataclass
class PodIndex:
    """What one pod has in the maps (mirrors the maps; rebuilt from them after a restart)."""

    pod_id: int
    ports: set[tuple[int, int]] = field(default_factory=set)   # (kind, port)
    cidrs: set[CidrTuple] = field(default_factory=set)
    ips: set[bytes] = field(default_factory=set)               # bytes(IpAddr)
    cfg: bytes = b""                                            # bytes(PodCfg) in pod_by_netns
    bypass: set[int] = field(default_factory=set)              # cgroup ids in init_bypass


def _cidr_tuple(k: maps.CidrKey) -> CidrTuple:
    return (k.kind, k.family, k.prefixlen, bytes(k.addr))


def _cidr_key(pod_id: int, t: CidrTuple) -> maps.CidrKey:
    k = maps.CidrKey(prefixlen=t[2], pod_id=pod_id, kind=t[0], family=t[1])
    ctypes.memmove(k.addr, t[3], 16)
    return k


class PodTable:
    """Every captured pod's map entries, keyed by the pod's handle (its ``pod_by_netns`` key)."""

    def __init__(self, access: MapAccess) -> None:
        self.access = access
        self._index: dict[int, PodIndex] | None = None
        self._free_ids: list[int] = []     # heap of pod ids below _next_id that no pod holds
        self._next_id = 1

    def forget(self) -> None:
        """Drop the mirror (the descriptors are closing); the next use rebuilds it from the maps."""
        self._index = None

    def index(self) -> dict[int, PodIndex]:
        if self._index is None:
            self._index = self._rebuild()
            used = {e.pod_id for e in self._index.values()}
            self._next_id = max(used, default=0) + 1
            self._free_ids = [i for i in range(1, self._next_id) if i not in used]   # sorted: a heap
        return self._index

    def _take_id(self) -> int:
        """The lowest pod id no pod holds (a heap of freed ids: picking one was a pass over all pods)."""
        if self._free_ids:
            return heapq.heappop(self._free_ids)
        self._next_id += 1
        return self._next_id - 1

    def _give_id(self, pod_id: int) -> None:
        heapq.heappush(self._free_ids, pod_id)

    def _rebuild(self) -> dict[int, PodIndex]:
        index: dict[int, PodIndex] = {}
        by_id: dict[int, PodIndex] = {}
        expected: dict[int, tuple[int, int]] = {}     # pod id -> the (flags, handle) its IPs carry
        for key, val in self.configs().items():
            index[key] = by_id[val.pod_id] = PodIndex(val.pod_id, cfg=bytes(val))
            expected[val.pod_id] = (val.flags, key)
        for k in self.access.keys("pod_by_ip", maps.IpAddr):
            owner = maps.PodIpVal()
            if self.access.lookup("pod_by_ip", k, owner) and owner.pod_id in by_id:
                entry = by_id[owner.pod_id]
                entry.ips.add(bytes(k))
                if (owner.flags, owner.netns_cookie) != expected[owner.pod_id]:
                    entry.cfg = b""       # a write cut short: the next one rewrites the pod whole
        for k in self.access.keys("pod_ports", maps.PortKey):
            if k.pod_id in by_id:
                by_id[k.pod_id].ports.add((k.kind, k.port))
        for k in self.access.keys("pod_cidrs", maps.CidrKey):
            if k.pod_id in by_id:
                by_id[k.pod_id].cidrs.add(_cidr_tuple(k))
        for cg in self.access.keys("init_bypass", ctypes.c_uint64):
            pod_id = ctypes.c_uint32()
            if self.access.lookup("init_bypass", cg, pod_id) and pod_id.value in by_id:
                by_id[pod_id.value].bypass.add(cg.value)
        return index

    def configs(self) -> dict[int, maps.PodCfg]:
        """handle -> its pod_cfg entry, read from the map."""
        out = {}
        for key in self.access.keys("pod_by_netns", ctypes.c_uint64):
            val = maps.PodCfg()
            if self.access.lookup("pod_by_netns", key, val):
                out[key.value] = val
        return out

    def counters(self) -> dict[int, dict[str, int]]:
        """handle -> its per-pod counters by name (maps.POD_COUNTERS): what this version counted
        plus what earlier versions had (carried at an upgrade: :meth:`carry`)."""
        out = {}
        for handle, entry in self.index().items():
            total = [0] * len(maps.POD_COUNTERS)
            found = False
            for name in COUNTER_MAPS:
                value = maps.PodCounters()
                if self.access.lookup(name, ctypes.c_uint32(entry.pod_id), value):
                    found = True
                    total = [t + int(v) for t, v in zip(total, value.c, strict=True)]
            if found:
                out[handle] = dict(zip(maps.POD_COUNTERS, total, strict=True))
        return out

    def carry(self, older: Mapping[int, list[int]]) -> int:
        """Keep counting where another version left off: ``older`` is, per handle, that version's
        totals (carried ones included). Each pod's carried counts become at least those, counter by
        counter: counts only grow, so doing it again (a retirement cut short) adds nothing twice.
        Returns the pods carried."""
        carried = 0
        for handle, values in older.items():
            entry = self.index().get(handle)
            if entry is None:
                continue
            slot = ctypes.c_uint32(entry.pod_id)
            base = maps.PodCounters()
            self.access.lookup("pod_counter_base", slot, base)
            want = maps.PodCounters.of(values)
            for i in range(len(maps.POD_COUNTERS)):
                want.c[i] = max(want.c[i], base.c[i])
            self.access.update("pod_counter_base", slot, want)
            carried += 1
        return carried

    def ips(self, handle: int) -> list[maps.IpAddr] | None:
        """The pod's addresses (None: not a pod of ours)."""
        entry = self.index().get(handle)
        if entry is None:
            return None
        return [maps.IpAddr.from_buffer_copy(raw) for raw in entry.ips]

    def add(self, handle: int, cfg: PodConfig) -> None:
        """Write a new pod (a free pod id) or rewrite a known one; refused whole or done whole."""
        index = self.index()
        new = handle not in index
        if new:
            index[handle] = PodIndex(self._take_id())
        saved: list[tuple[str, maps.PodCounters | None]] = []
        try:
            if new:
                # The id's counts start at 0 before any entry names it (an earlier pod's stay behind).
                saved = self._reset_counters(index[handle].pod_id)
            self.write(handle, cfg)
        except Exception:
            if new:
                pod_id = index.pop(handle).pod_id    # refused whole: write() rolled its entries back
                self._give_id(pod_id)
                for name, value in saved:
                    if value is not None:
                        self.access.update(name, ctypes.c_uint32(pod_id), value)
                    else:
                        self.access.delete(name, ctypes.c_uint32(pod_id))
            raise

    def _reset_counters(self, pod_id: int) -> list[tuple[str, maps.PodCounters | None]]:
        """Zero a pod id's counts (live, and carried from an older version); what they held."""
        slot = ctypes.c_uint32(pod_id)
        saved: list[tuple[str, maps.PodCounters | None]] = []
        for name in COUNTER_MAPS:
            value = maps.PodCounters()
            saved.append((name, value if self.access.lookup(name, slot, value) else None))
        self._update("pod_counters", slot, maps.PodCounters())
        if saved[1][1] is not None:
            self.access.delete("pod_counter_base", slot)
        return saved

    def _update(self, name: str, key: Any, value: Any) -> None:
        """An update whose refusal by a full map is the one-line "maps are full" error."""
        try:
            self.access.update(name, key, value)
        except OSError as exc:
            if exc.errno in FULL_ERRNOS:
                raise KernelError(f"datapath maps are full ({exc.strerror}): pod not captured; "
                                  f"raise the map sizes") from exc
            raise

    def write(self, handle: int, cfg: PodConfig) -> None:
        """Make the maps hold exactly ``cfg`` for a known pod.

        New list entries first, then the config, then what is gone is dropped: a connection
        never sees a half-written pod. A refused update (full map) undoes everything this
        call wrote, gives a reused IP back to its previous owner, and raises KernelError.
        """
        entry = self.index()[handle]
        entries = maps.encode_pod(entry.pod_id, handle, cfg)
        one = ctypes.c_uint8(1)
        want_ports = {(k.kind, k.port) for k in entries.ports}
        want_cidrs = {_cidr_tuple(k) for k in entries.cidrs}
        want_ips = {bytes(ip) for ip, _ in entries.ips}
        if (bytes(entries.cfg), want_ports, want_cidrs, want_ips) == (entry.cfg, entry.ports, entry.cidrs, entry.ips):
            return    # the maps hold it already (a restarted agent's resync adopts every pod like this)
        # What this call wrote, for the rollback (pod_by_ip: the value it replaced, or None).
        added_ports: set[tuple[int, int]] = set()
        added_cidrs: set[CidrTuple] = set()
        added_ips: dict[bytes, maps.PodIpVal | None] = {}
        try:
            for pk in entries.ports:
                self.access.update("pod_ports", pk, one)
                added_ports.add((pk.kind, pk.port))
            for ck in entries.cidrs:
                self.access.update("pod_cidrs", ck, one)
                added_cidrs.add(_cidr_tuple(ck))
            for ip, val in entries.ips:
                prev = maps.PodIpVal()
                had = self.access.lookup("pod_by_ip", ip, prev)
                self.access.update("pod_by_ip", ip, val)
                added_ips[bytes(ip)] = prev if had else None
            self.access.update("pod_by_netns", ctypes.c_uint64(handle), entries.cfg)
        except OSError as exc:
            # Refused whole (hardening finding: a full map left half a pod behind).
            # (The config is written last: when it is the refused update, it is unchanged.)
            self._roll_back(entry, added_ports, added_cidrs, added_ips)
            if exc.errno in FULL_ERRNOS:
                raise KernelError(f"datapath maps are full ({exc.strerror}): pod not captured; "
                                  f"raise the map sizes") from exc
            raise
        entry.ports |= want_ports
        entry.cidrs |= want_cidrs
        entry.ips |= want_ips
        entry.cfg = bytes(entries.cfg)
        self.delete_entries(entry, entry.ports - want_ports, entry.cidrs - want_cidrs, entry.ips - want_ips)

    def _roll_back(self, entry: PodIndex, ports: set[tuple[int, int]], cidrs: set[CidrTuple],
                   ips: dict[bytes, maps.PodIpVal | None]) -> None:
        for kind, port in ports - entry.ports:
            self.access.delete("pod_ports", maps.PortKey(pod_id=entry.pod_id, kind=kind, port=port))
        for t in cidrs - entry.cidrs:
            self.access.delete("pod_cidrs", _cidr_key(entry.pod_id, t))
        for raw, old in ips.items():
            addr = maps.IpAddr.from_buffer_copy(raw)
            if old is not None:
                # the previous owner (another pod, or this pod before a flags change) gets it back
                self.access.update("pod_by_ip", addr, old)
            else:
                self.access.delete("pod_by_ip", addr)

    def delete_entries(self, entry: PodIndex, ports: set[tuple[int, int]], cidrs: set[CidrTuple],
                       ips: set[bytes]) -> None:
        for kind, port in ports:
            self.access.delete("pod_ports", maps.PortKey(pod_id=entry.pod_id, kind=kind, port=port))
        for t in cidrs:
            self.access.delete("pod_cidrs", _cidr_key(entry.pod_id, t))
        for raw in ips:
            k = maps.IpAddr.from_buffer_copy(raw)
            val = maps.PodIpVal()
            # Only this pod's entries: a reused IP may already belong to a new pod.
            if self.access.lookup("pod_by_ip", k, val) and val.pod_id == entry.pod_id:
                self.access.delete("pod_by_ip", k)
                self.access.delete("inbound_listeners", k)
        entry.ports -= ports
        entry.cidrs -= cidrs
        entry.ips -= ips

    def set_bypass(self, handle: int, cgroup_ids: set[int]) -> None:
        """List exactly ``cgroup_ids`` as the pod's bypassed app init containers. New entries
        first, stale ones after; a refused update rolls this call's entries back (those
        containers stay captured) and raises KernelError."""
        entry = self.index()[handle]
        added: list[int] = []
        try:
            for cg in sorted(cgroup_ids - entry.bypass):
                self.access.update("init_bypass", ctypes.c_uint64(cg), ctypes.c_uint32(entry.pod_id))
                added.append(cg)
        except OSError as exc:
            for cg in added:
                self.access.delete("init_bypass", ctypes.c_uint64(cg))
            raise KernelError(f"cannot list an init container as bypassed ({exc.strerror}): it stays "
                              "captured") from exc
        entry.bypass |= set(added)
        self._drop_bypass(entry, entry.bypass - cgroup_ids)

    def _drop_bypass(self, entry: PodIndex, cgroup_ids: set[int]) -> None:
        for cg in cgroup_ids:
            owner = ctypes.c_uint32()
            if self.access.lookup("init_bypass", ctypes.c_uint64(cg), owner) and owner.value == entry.pod_id:
                self.access.delete("init_bypass", ctypes.c_uint64(cg))
        entry.bypass -= cgroup_ids

    def remove(self, handle: int) -> None:
        """Delete the pod's config and every entry it owns (unknown handle: only the config key)."""
        entry = self.index().pop(handle, None)
        self.access.delete("pod_by_netns", ctypes.c_uint64(handle))
        if entry is not None:
            self._give_id(entry.pod_id)
            self._drop_bypass(entry, set(entry.bypass))
            self.delete_entries(entry, set(entry.ports), set(entry.cidrs), set(entry.ips))
            self.access.delete("pod_counter_base", ctypes.c_uint32(entry.pod_id))
