"""``explain`` in the lab: the kernel's answer for a case of the differential table, before it runs.

For a :class:`~.capture_cases.Case` this asks the datapath (``Datapath.explain``: ``bpf/explain.c``
through ``BPF_PROG_TEST_RUN``) the questions a connection meets on its way: the source pod's outbound
rule (when the source is captured), then, when the connection leaves that pod uncaptured towards
another captured pod, that pod's inbound rule. The result is a :class:`Prediction` (listener, pod,
original destination, the rules that decided) to compare with what the connection then did, and the
counter deltas it implies (:func:`expected_counters`).

In the lab a pod's IDs are given as seen inside it (a pod in its own user namespace maps them);
:func:`ask` turns them into the host IDs the programs compare, as the agent does.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from ..datapath import userns
from ..datapath.explain import Answer, Question
from ..datapath.podconfig import DNS_PROXY_PORT, INBOUND_PORT, OUTBOUND_PORT
from .conntrack import plain

if TYPE_CHECKING:  # pragma: no cover
    from ..datapath.loader import Datapath
    from .capture_cases import Case, CaptureLab
    from .node import Pod

_KIND = {OUTBOUND_PORT: "outbound", INBOUND_PORT: "inbound", DNS_PROXY_PORT: "dns"}


def ask(dp: "Datapath", pod: "Pod", handle: int, question: Question) -> Answer:
    """``dp.explain`` for a lab pod, the question's uid/gid taken as the pod sees them."""
    uid, gid = userns.host_ids(question.uid, question.gid, pod.netns_path, pod.pids())
    host = Question(question.direction, question.peer, question.port, uid, gid, question.tcp, question.bound)
    return dp.explain(handle, host)


@dataclass(frozen=True)
class Prediction:
    listener: str                        # "outbound" | "inbound" | "dns" | "direct"
    pod: str | None                      # whose listener (or whose target, "direct")
    orig: tuple[str, int] | None         # SO_ORIGINAL_DST of a captured TCP connection (plain address)
    rules: tuple[str, ...]               # the rules that decided, in order (as Case.rules)
    answers: tuple[Answer, ...]

    def as_json(self) -> dict[str, Any]:
        return {"listener": self.listener, "pod": self.pod, "orig": list(self.orig) if self.orig else None,
                "rules": list(self.rules), "answers": [a.as_json() for a in self.answers]}


def _pod_of(symbol: str) -> str | None:
    """The pod an address symbol names (``b4``, ``u6``, ``c4m``), None for lo/pt/any."""
    base = symbol[:-1] if symbol.endswith("m") else symbol
    return base[0] if len(base) == 2 and base[0] in "abcu" and base[1] in "46" else None


def predict(lab: "CaptureLab", dp: "Datapath", case: "Case", handles: Mapping[str, Any]) -> Prediction:
    """What the kernel says ``case`` does, with the case's configuration installed (``handles``:
    captured pod name -> its datapath handle)."""
    tcp = case.proto == "tcp"
    peer = ipaddress.ip_address(lab.address(case.dst))
    answers: list[Answer] = []
    if case.src in handles:
        bound = ipaddress.ip_address(lab.address(case.bind)) if case.bind else None
        out = ask(dp, lab.pod(case.src), handles[case.src],
                  Question("outbound", peer, case.port, case.uid, case.gid, tcp, bound))
        answers.append(out)
        if out.captured:
            orig = (plain(out.original_destination[0]), out.original_destination[1]) \
                if tcp and out.original_destination else None
            return Prediction(_KIND[out.listener or 0], case.src, orig, _rules(answers), tuple(answers))
    target = _pod_of(case.dst)
    if target is None:          # loopback, 127.0.0.6, ::6: the source pod itself
        return Prediction("direct", case.src, None, _rules(answers), tuple(answers))
    if tcp and target in handles and target != case.src:
        family = "6" if case.dst.endswith("6") else "4"
        client = ipaddress.ip_address(lab.address(case.src + family))
        into = ask(dp, lab.pod(target), handles[target], Question("inbound", client, case.port))
        answers.append(into)
        if into.captured and into.original_destination:
            orig = (plain(into.original_destination[0]), into.original_destination[1])
            return Prediction("inbound", target, orig, _rules(answers), tuple(answers))
    return Prediction("direct", target, None, _rules(answers), tuple(answers))


def _rules(answers: list[Answer]) -> tuple[str, ...]:
    return tuple(a.rule for a in answers if a.rule)


def agrees(prediction: Prediction, listener: str, pod: str | None, orig: Any) -> bool:
    """The prediction is what the connection did: the same listener (nothing captured: it went to
    its destination, or was refused there because nothing listens), the same pod, the same
    original destination."""
    if prediction.listener == "direct":
        return listener in ("direct", "refused") and (listener == "refused" or pod == prediction.pod)
    got = (plain(orig[0]), int(orig[1])) if isinstance(orig, (tuple, list)) and len(orig) == 2 else orig
    return (listener, pod) == (prediction.listener, prediction.pod) and \
        (prediction.orig is None or got == prediction.orig)


def expected_counters(case: "Case", mode: str) -> dict[str, dict[str, int]]:
    """Per captured pod, how its counters must move for ``case``: each rule of ``case.rules`` once
    at the pod it decides for, SO_ORIGINAL_DST answered once by the Envoy-side listener of a
    captured TCP connection, and in pod-IP mode a socket bound beforehand refused."""
    out: dict[str, dict[str, int]] = {}

    def add(pod: str | None, name: str) -> None:
        if pod is not None:
            out.setdefault(pod, {})[name] = out.get(pod, {}).get(name, 0) + 1

    for rule in case.rules:
        add(case.src if rule.startswith("out_") else _pod_of(case.dst), rule)
    if mode == "podip" and case.bind and case.expect == "outbound":
        add(case.src, "podip_bind_fail")
        return out
    if case.proto == "tcp" and case.expect in ("outbound", "inbound", "dns"):
        add(case.expect_pod, "origdst_hit")
    return out


def counter_deltas(before: Mapping[int, Mapping[str, int]], after: Mapping[int, Mapping[str, int]],
                   handles: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    """Per pod name, the per-pod counters that moved between two ``Datapath.pod_counters()`` reads."""
    out: dict[str, dict[str, int]] = {}
    for name, handle in handles.items():
        old, new = before.get(handle, {}), after.get(handle, {})
        moved = {k: v - old.get(k, 0) for k, v in new.items() if v != old.get(k, 0)}
        if moved:
            out[name] = moved
    return out


def check_case(lab: "CaptureLab", case: "Case", prediction: Prediction, before: Mapping[int, Mapping[str, int]],
               after: Mapping[int, Mapping[str, int]], handles: Mapping[str, Any], mode: str,
               outcome: Any) -> list[str]:
    """What differs, for one case run after ``prediction``: the rules explain named against the
    case's, the prediction against what the connection did (``outcome``), and the pods' counter
    deltas (``before`` the question, ``after`` the connection) against the case's rules. A socket
    bound to a port before connect() is refused in pod-IP mode (KNOWN_DIFFERENCES): not predicted."""
    wrong = []
    if prediction.rules != case.rules:
        wrong.append(f"{case.id}: explain names {prediction.rules}, the case {case.rules}")
    got = lab.outcome_key(case, outcome)
    if not (mode == "podip" and case.bind) and not agrees(prediction, got.listener, got.pod, got.orig):
        wrong.append(f"{case.id}: explain predicts {prediction.as_json()}, got {got}")
    moved, want = counter_deltas(before, after, handles), expected_counters(case, mode)
    if moved != want:
        wrong.append(f"{case.id}: counters moved {moved}, the case predicts {want}")
    return wrong
