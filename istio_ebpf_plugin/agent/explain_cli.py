"""``istio-ebpf explain POD DESTINATION``: would this connection of this pod be captured, to which
listener, with which original destination, and which rule decided? Asked of the local agent's
``/explain``, which runs the kernel's own decision functions (``bpf/explain.c``) over the pod's map
entries. Like ``istio-ebpf pods`` it runs where the agent's health port answers: on the node, or
inside the agent pod::

    kubectl exec -n istio-ebpf-system <agent pod on NODE> -- istio-ebpf explain default/client 10.96.0.10:80

Exit status: 0 an answer; 1 the agent cannot answer for that pod (unknown, not captured, no agent);
2 a bad question, or a node that cannot explain (its kernel, or iptables): one line, as always.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import UsageError
from .pods_cli import DEFAULT_URL, URL_ENV, AgentAnswered, fetch


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("explain", help="would a pod's connection be captured, where to, and which rule "
                                              "decided (the kernel's answer, through the local agent)")
    p.add_argument("pod", metavar="POD", help="NAMESPACE/NAME of an opted-in pod of this node")
    p.add_argument("destination", metavar="DESTINATION",
                   help="IP:PORT or [IPv6]:PORT the pod connects to; with --inbound: the client's address")
    p.add_argument("--uid", type=int, default=0, help="the connecting process's UID inside the pod (default 0; "
                                                      "the proxy's, 1337 by default, is decided apart)")
    p.add_argument("--gid", type=int, default=0, help="its GID inside the pod (default 0)")
    p.add_argument("--inbound", type=int, metavar="PORT",
                   help="a TCP connection from DESTINATION to the pod's PORT instead")
    p.add_argument("--udp", action="store_true", help="a UDP datagram (sendto) instead of a TCP connection")
    p.add_argument("--source", metavar="IP", help="the socket's bound address (e.g. 127.0.0.6)")
    p.add_argument("--json", action="store_true", help="print the agent's answer as JSON")
    p.add_argument("--agent", default=os.environ.get(URL_ENV, DEFAULT_URL),
                   help=f"the agent's health endpoint (default ${URL_ENV}, else {DEFAULT_URL})")
    p.add_argument("--timeout", type=float, default=5.0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    query: dict[str, str] = {"pod": args.pod, "dst": args.destination, "uid": str(args.uid), "gid": str(args.gid)}
    if args.inbound is not None:
        query["inbound"] = str(args.inbound)
    if args.udp:
        query["udp"] = "1"
    if args.source:
        query["source"] = args.source
    try:
        answer = fetch(args.agent, args.timeout, "/explain", query, command="explain ...")
    except AgentAnswered as exc:
        if exc.code in (400, 501):      # a bad question, or a node that cannot explain: exit 2
            raise UsageError(str(exc).split(": ", 1)[-1]) from None
        raise
    sys.stdout.write(json.dumps(answer, indent=2, sort_keys=True) + "\n" if args.json else answer["text"])
    return 0
