"""``istio-ebpf pods``: the node's opted-in pods, from the local agent's ``/pods``.

It runs where the agent's health port answers: on the node, or inside the agent pod (it is
hostNetwork), which is how to ask it from anywhere::

    kubectl exec -n istio-ebpf-system <agent pod on NODE> -- istio-ebpf pods

Exit status: 0, or 1 when a pod is ``failed`` (its connections are refused) or the agent
cannot be asked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Mapping

from ..errors import IstioEbpfError

DEFAULT_URL = "http://127.0.0.1:15099"
URL_ENV = "ISTIO_EBPF_AGENT_URL"
AGENT_NAMESPACE, AGENT_SELECTOR = "istio-ebpf-system", "app.kubernetes.io/name=istio-ebpf-agent"
#: How to ask a node's agent from outside the node (``status`` prints it).
KUBECTL_COMMAND = (f"kubectl exec -n {AGENT_NAMESPACE} $(kubectl get pod -n {AGENT_NAMESPACE} -l {AGENT_SELECTOR} "
                   "--field-selector spec.nodeName=<NODE> -o name) -- istio-ebpf pods")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("pods", help="the node's opted-in pods: capture state, last error, counters "
                                           "(asks the local agent)")
    p.add_argument("--json", action="store_true", help="print the agent's answer as JSON")
    p.add_argument("--agent", default=os.environ.get(URL_ENV, DEFAULT_URL),
                   help=f"the agent's health endpoint (default ${URL_ENV}, else {DEFAULT_URL})")
    p.add_argument("--timeout", type=float, default=5.0)
    p.set_defaults(func=run)


class AgentAnswered(IstioEbpfError):
    """The agent answered with an error status (``code``); the message is its one line."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def fetch(url: str, timeout: float = 5.0, path: str = "/pods", query: Mapping[str, Any] | None = None,
          command: str = "pods") -> dict[str, Any]:
    """The agent's JSON answer at ``path``; :class:`AgentAnswered` (its status) or
    :class:`IstioEbpfError` with one line when there is none."""
    target = url.rstrip("/") + path + ("?" + urllib.parse.urlencode(query) if query else "")
    try:
        with urllib.request.urlopen(target, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        try:
            why = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            why = exc.reason
        raise AgentAnswered(f"the agent at {url} answered {exc.code}: {why}", exc.code) from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise IstioEbpfError(f"no agent answers at {url} ({reason}); on another node: "
                             f"{KUBECTL_COMMAND.replace('istio-ebpf pods', f'istio-ebpf {command}')}") from None


def _counters(counters: dict[str, int]) -> str:
    shown = [f"{k}={v}" for k, v in counters.items() if v]
    return " ".join(shown) or "-"


def table(answer: dict[str, Any]) -> str:
    pods = answer.get("pods") or []
    head = f"node {answer.get('node')}: mode {answer.get('mode')}" + (", draining" if answer.get("draining") else "")
    rows = [("NAMESPACE", "POD", "MODE", "STATE", "CAPTURED IN", "LAST ERROR", "COUNTERS")]
    for p in pods:
        took = p.get("capture_seconds")
        rows.append((p["namespace"], p["name"], p["mode"], p["state"], "-" if took is None else f"{took:.2f}s",
                     (p.get("error") or "-"), _counters(p.get("counters") or {})))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = [head] + ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1]
                      for r in rows]
    if not pods:
        lines.append("(no opted-in pod on this node)")
    return "\n".join(line.rstrip() for line in lines) + "\n"


def run(args: argparse.Namespace) -> int:
    answer = fetch(args.agent, args.timeout)
    sys.stdout.write(json.dumps(answer, indent=2, sort_keys=True) + "\n" if args.json else table(answer))
    return 1 if any(p.get("state") == "failed" for p in answer.get("pods") or []) else 0
