"""The real agent on lab pods: a NodeAgent (the API is a FakeKube) stepping in a thread."""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

NODE = "lab-node"


@contextlib.contextmanager
def lab_agent(node: Any, pin_root: str, mode: str, cgroups: dict[str, str]) -> Iterator[Any]:
    """An agent for ``node`` (a harness Node) whose pods' cgroups are ``cgroups`` (pod UID ->
    the harness pod's cgroup directory); shut down with clean-up on exit."""
    from istio_ebpf_plugin.agent.node_agent import AgentConfig, NodeAgent

    agent = NodeAgent(AgentConfig(node_name=NODE, mode_override=mode, pin_root=pin_root,
                                  cgroup_root=str(node.parent_cgroup), host="127.0.0.1", port=0,
                                  retry_seconds=0.05, watch_timeout=1, cgroup_for_uid=cgroups.get))
    stop = threading.Event()
    loop = threading.Thread(target=lambda: [agent.step(0.05) for _ in iter(stop.is_set, True)], daemon=True)
    agent.start()
    loop.start()
    try:
        yield agent
    finally:
        stop.set()
        loop.join(5)
        agent.shutdown(cleanup=True)
