"""A datapath that records what the agent asks of it and keeps 'map entries' in a dict.

It implements everything the agent calls (``agent.reconcile.DatapathLike``; mypy checks it
through :func:`recording_factory`'s return type). Handles are ints like the real datapath's:
the netns inode in cookie mode, a number standing for the pod's cgroup id in pod-IP mode (the
CRC-32 of its cgroup path: the fake /proc's cgroups do not exist).

``capacity`` stands for full maps (``add_pod`` beyond it raises the loader's KernelError);
``denies`` holds the pods whose connections are refused (``deny_pod``/``allow_pod``);
``per_pod`` holds the per-pod counters ``pod_counters`` reports; ``explain`` records its questions.
"""

from __future__ import annotations

import os
import zlib
from typing import Callable, Iterable, Sequence

from istio_ebpf_plugin.agent.reconcile import DatapathLike
from istio_ebpf_plugin.datapath.explain import Answer, ExplainUnavailable, Question
from istio_ebpf_plugin.datapath.podconfig import PodConfig
from istio_ebpf_plugin.errors import KernelError


class RecordingDatapath:
    def __init__(self, mode: str, pin_dir: str, sockmap: bool, store: dict[int, PodConfig] | None = None) -> None:
        self.mode = mode
        self.version = f"recording-{mode}"
        self.adopted = False
        self.entries: dict[int, PodConfig] = store if store is not None else {}
        self.calls: list[tuple] = []
        self.attached: list[str] = []
        self.closed: bool | None = None
        self.listener_refreshes: list[dict[int, str]] = []
        self.listeners: dict[int, int] = {}    # handle -> listener entries a refresh reports (tests set it)
        self.capacity: int | None = None
        self.denies: set[int] = set()
        self.per_pod: dict[int, dict[str, int]] = {}
        self.explain_unavailable: ExplainUnavailable | None = None
        self.bypass: dict[int, set[int]] = {}      # handle -> cgroup ids listed (set_init_bypass)

    def load(self) -> RecordingDatapath:
        self.calls.append(("load",))
        return self

    def attach_cgroup(self, cgroup_path: str) -> None:
        self.attached.append(cgroup_path)

    def other_versions(self) -> list:
        return []

    def take_over(self, cgroup_path: str) -> dict[str, int]:
        self.calls.append(("take_over", cgroup_path))
        self.attached.append(cgroup_path)
        return {}

    def retire_other_versions(self) -> list[str]:
        return []

    def pod_key(self, netns_path: str, cgroup_path: str | None = None) -> int:
        return os.stat(netns_path).st_ino if self.mode == "cookie" else zlib.crc32(str(cgroup_path).encode())

    def add_pod(self, netns_path: str, cfg: PodConfig, cgroup_path: str | None = None,
                pids: Sequence[int] = ()) -> int:
        handle = self.pod_key(netns_path, cgroup_path)
        self.calls.append(("add", handle))
        if self.capacity is not None and handle not in self.entries and len(self.entries) >= self.capacity:
            raise KernelError("datapath maps are full (No space left on device): pod not captured; "
                              "raise the map sizes")
        self.entries[handle] = cfg
        return handle

    def update_pod(self, handle: int, cfg: PodConfig) -> None:
        self.calls.append(("update", handle))
        if handle not in self.entries:
            raise KeyError(handle)
        self.entries[handle] = cfg

    def remove_pod(self, handle: int) -> None:
        self.calls.append(("remove", handle))
        del self.entries[handle]
        self.bypass.pop(handle, None)

    def pods(self) -> dict[int, PodConfig]:
        return dict(self.entries)

    def refresh_listeners(self, netns_paths: dict[int, str]) -> dict[int, int]:
        self.listener_refreshes.append(dict(netns_paths))
        return {h: self.listeners.get(h, 0) for h in netns_paths}

    def set_init_bypass(self, handle: int, cgroup_ids: Iterable[int]) -> None:
        if handle not in self.entries:
            raise KeyError(handle)
        self.calls.append(("bypass", handle))
        self.bypass[handle] = set(cgroup_ids)

    def counters(self) -> dict[str, int]:
        return {"out_redirect": 7, "in_redirect_local": 3, "origdst_hit": 7}

    def pod_counters(self) -> dict[int, dict[str, int]]:
        return {h: c for h, c in self.per_pod.items() if h in self.entries}

    def explain(self, handle: int, question: Question) -> Answer:
        """Records the question; answers "not captured" by rule ``out_pass_not_included``, or raises
        ``explain_unavailable`` (an ExplainUnavailable) when set. The kernel's answers are the
        real datapath's (test_datapath_capture.py, test_agent_explain.py)."""
        self.calls.append(("explain", handle, question))
        if self.explain_unavailable is not None:
            raise self.explain_unavailable
        if handle not in self.entries:
            return Answer(question, "no_pod")
        return Answer(question, "decided", "out_pass_not_included")

    def deny_pod(self, netns_path: str, cgroup_path: str) -> int:
        deny = zlib.crc32(cgroup_path.encode())
        self.calls.append(("deny", deny))
        self.denies.add(deny)
        return deny

    def allow_pod(self, deny: int) -> None:
        self.calls.append(("allow", deny))
        self.denies.discard(deny)

    def denied(self) -> set[int]:
        return set(self.denies)

    def occupancy(self) -> dict[str, int]:
        return {"pod_by_netns": len(self.entries)}

    def close(self, cleanup: bool = False) -> None:
        self.closed = cleanup


def recording_factory(made: list[RecordingDatapath],
                      store: dict[int, PodConfig]) -> Callable[[str, str, bool], DatapathLike]:
    """A ``NodeAgent`` datapath factory: each datapath it makes is appended to ``made``."""
    def factory(mode: str, pin_dir: str, sockmap: bool) -> DatapathLike:
        made.append(RecordingDatapath(mode, pin_dir, sockmap, store))
        return made[-1]
    return factory
