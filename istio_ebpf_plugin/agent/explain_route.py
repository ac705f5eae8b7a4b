"""``GET /explain``: ``istio-ebpf explain`` on a node, answered by the agent's own datapath.

Query: ``pod=NAMESPACE/NAME`` (an opted-in pod of this node), ``dst=IP:PORT`` (outbound; with
``inbound=PORT``: the client's address), ``uid``/``gid`` as seen inside the pod (default 0), ``udp=1``,
``source=IP`` (the socket's bound address). The pod is found in the agent's current view (built by
the agent loop, read here from the HTTP thread); the answer is the kernel's (``Datapath.explain``).

Statuses: 200 an answer; 400 a bad question; 404 no such opted-in pod here; 409 the pod is not
captured (pending, failed, ignored: nothing of ours decides its connections, or the deny refuses
them all); 501 this node cannot explain (its kernel cannot run the program, or it keeps iptables);
503 the agent has not reconciled the pods yet.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any, Callable, Iterable, Mapping

from ..datapath import userns
from ..datapath.explain import ExplainUnavailable, Question, parse_destination, text
from ..errors import IstioEbpfError
from .pod_view import PodTarget, PodView
from .reconcile import CAPTURED, DRAINING, FAILED, DatapathLike

#: what a pod in each state has instead of an answer
_NOT_CAPTURED = {FAILED: "its connections are refused (deny) until it can be programmed",
                 "pending": "it is not captured yet", "ignored": "its opt-in is ignored: never captured"}


def _one(query: Mapping[str, list[str]], name: str, default: str | None = None) -> str | None:
    values = query.get(name)
    return values[-1] if values else default


def _int(query: Mapping[str, list[str]], name: str, default: int | None, top: int) -> int | None:
    raw = _one(query, name)
    if raw is None:
        return default
    if not raw.isdigit() or int(raw) > top:
        raise ValueError(f"{name} must be a number from 0 to {top}, not {raw!r}")
    return int(raw)


def question(query: Mapping[str, list[str]]) -> tuple[str, Question]:
    """(pod "namespace/name", the question as asked: IDs as seen inside the pod). ValueError: bad."""
    pod = _one(query, "pod") or ""
    if pod.count("/") != 1 or not all(pod.split("/")):
        raise ValueError(f"pod must be NAMESPACE/NAME, not {pod!r}")
    inbound = _int(query, "inbound", None, 65535)
    peer, port = parse_destination(_one(query, "dst") or "", inbound is not None)
    source = _one(query, "source")
    bound = ipaddress.ip_address(source) if source else None
    uid, gid = _int(query, "uid", 0, 2**32 - 1), _int(query, "gid", 0, 2**32 - 1)
    udp = (_one(query, "udp") or "0") not in ("0", "", "false")
    if inbound is not None:
        if inbound == 0 or udp:
            raise ValueError("inbound is a TCP port from 1 to 65535")
        return pod, Question("inbound", peer, inbound)
    assert port is not None and uid is not None and gid is not None
    return pod, Question("outbound", peer, port, uid, gid, not udp, bound)


def answer(query: Mapping[str, list[str]], view: PodView | None, datapath: DatapathLike | None,
           unsupported: str | None, pids: Callable[[PodTarget], Iterable[int]],
           proc_root: str = "/proc") -> tuple[int, Any]:
    """The route: (HTTP status, JSON body)."""
    if unsupported is not None:
        return 501, {"error": f"this node keeps iptables ({unsupported}): there is no eBPF decision to explain",
                     "unavailable": True}
    if view is None or datapath is None:
        return 503, {"error": "the agent has not reconciled the node's pods yet"}
    try:
        name, asked = question(query)
    except ValueError as exc:
        return 400, {"error": str(exc)}
    target = view.targets.get(name)
    if target is None:
        return 404, {"error": f"no opted-in pod {name} on node {view.node}"}
    if target.state not in (CAPTURED, DRAINING) or target.handle is None:
        why = _NOT_CAPTURED.get(target.state, "it is not captured")
        return 409, {"error": f"pod {name} is {target.state}" + (f" ({target.error})" if target.error else "")
                     + f": {why}", "state": target.state}
    try:
        uid, gid = userns.host_ids(asked.uid, asked.gid, target.netns_path, pids(target), proc_root)
    except (OSError, IstioEbpfError) as exc:
        return 409, {"error": f"pod {name}: its user namespace cannot map uid/gid {asked.uid}/{asked.gid}: {exc}"}
    host = Question(asked.direction, asked.peer, asked.port, uid, gid, asked.tcp, asked.bound)
    try:
        got = datapath.explain(target.handle, host)
    except ExplainUnavailable as exc:
        return 501, {"error": str(exc), "unavailable": True}
    body = got.as_json()
    # what the user asked, not the host IDs the programs compare (they differ in a user namespace)
    body.update(pod=name, node=view.node, mode=view.mode, uid=asked.uid, gid=asked.gid,
                host_uid=uid, host_gid=gid)
    shown = Question(asked.direction, asked.peer, asked.port, asked.uid, asked.gid, asked.tcp, asked.bound)
    body["text"] = text(dataclasses.replace(got, question=shown), f"pod {name} ({view.mode} mode)")
    return 200, body
