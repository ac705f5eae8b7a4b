"""``explain``: would this connection of this pod be captured, to which listener, with which original
destination, and which rule decided? Asked of the kernel, not of a Python copy of the rules.

``bpf/explain.c`` (program ``ie_explain``, loaded and pinned with the datapath, never attached) calls
the hooks' own decision functions over the version's own maps: ``outbound_rule`` and
``rule_verdict``/``target_port`` (``bpf/outbound_policy.h``, what connect4/6 and sendmsg4/6 run) and
``inbound_decision`` (``bpf/pod_lookup.h``, what sk_lookup runs). :func:`ask` runs it once with
``BPF_PROG_TEST_RUN``: the question goes in the test packet, the answer comes back in it, so
questions asked at the same time never share anything.

A kernel that cannot run it (the program refused, the test run refused, or the probe
``explain_test_run`` forced to fail) gets :class:`ExplainUnavailable`: one line, and the command
exits 2.
"""

from __future__ import annotations

import ctypes
import ipaddress
from dataclasses import dataclass, field
from typing import Any

from ..errors import IstioEbpfError
from . import libbpf, maps, probe
from .podconfig import DNS_PROXY_PORT, INBOUND_PORT, OUTBOUND_PORT, IPAddress

#: The probe (datapath/probe.py) that says whether this kernel runs it; ISTIO_EBPF_PROBE_FAIL forces it off.
PROBE = "explain_test_run"
PROGRAM = "ie_explain"

_STATUS = {maps.EXPLAIN_DECIDED: "decided", maps.EXPLAIN_NO_POD: "no_pod", maps.EXPLAIN_NO_POD_IP: "no_pod_ip",
           maps.EXPLAIN_OWN_POD: "own_pod", maps.EXPLAIN_UDP_IGNORED: "udp_ignored"}

#: Why a connection is decided as it is, per rule (the per-pod counter of the same name counts it):
#: the rule of istio-iptables' chains, with the pod's proxy IDs filled in.
RULES: dict[str, str] = {
    "out_pass_excluded_port": "ISTIO_OUTPUT -p tcp --dport {port} -j RETURN (excluded outbound port, -o or the "
                              "status port)",
    "out_pass_passthrough_src": "ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN (Envoy's inbound passthrough source)",
    "out_captured_proxy_uid_local": "ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner "
                                    "--uid-owner {uid} -j ISTIO_IN_REDIRECT (the proxy to its own pod)",
    "out_pass_local_uid": "ISTIO_OUTPUT -o lo -m owner ! --uid-owner {uid} -j RETURN (the app over loopback or to "
                          "its own pod)",
    "out_pass_proxy_uid": "ISTIO_OUTPUT -m owner --uid-owner {uid} -j RETURN (the proxy's own traffic)",
    "out_captured_proxy_gid_local": "ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner "
                                    "--gid-owner {gid} -j ISTIO_IN_REDIRECT (the proxy group to its own pod)",
    "out_pass_local_gid": "ISTIO_OUTPUT -o lo -m owner ! --gid-owner {gid} -j RETURN",
    "out_pass_proxy_gid": "ISTIO_OUTPUT -m owner --gid-owner {gid} -j RETURN (the proxy group's own traffic)",
    "out_dns": "ISTIO_OUTPUT --dport 53 -j REDIRECT --to-ports 15053 (DNS capture)",
    "out_pass_not_tcp": "ISTIO_REDIRECT matches -p tcp only (UDP other than captured DNS)",
    "out_pass_loopback": "ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN",
    "out_pass_excluded_cidr": "ISTIO_OUTPUT -d <excluded CIDR> -j RETURN (-x)",
    "out_captured_port": "ISTIO_OUTPUT -p tcp --dport {port} -j ISTIO_REDIRECT (-q)",
    "out_captured_cidr": "ISTIO_OUTPUT -d <included CIDR> -j ISTIO_REDIRECT (-i)",
    "out_pass_not_included": "end of ISTIO_OUTPUT: in no included CIDR (-i) and no included port (-q)",
    "in_pass_hbone": "ISTIO_INBOUND -p tcp --dport 15008 -j RETURN",
    "in_pass_excluded_port": "ISTIO_INBOUND -p tcp --dport {port} -j RETURN (excluded inbound port, -d)",
    "in_captured_all_ports": "ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT (-b '*')",
    "in_captured_port": "ISTIO_INBOUND -p tcp --dport {port} -j ISTIO_IN_REDIRECT (-b)",
    "in_pass_not_included": "ISTIO_INBOUND: port {port} is not in the inbound ports (-b)",
}

_UNDECIDED = {
    "no_pod": "the pod has no capture entry in the datapath (not captured)",
    "no_pod_ip": "the pod has no address of that family: nothing to capture",
    "own_pod": "from the pod itself: decided on the way out (ask without --inbound)",
    "udp_ignored": "UDP other than DNS to port 53 of a pod with DNS capture: never redirected",
}
_LISTENERS = {OUTBOUND_PORT: "Envoy's outbound listener", INBOUND_PORT: "Envoy's inbound listener",
              DNS_PROXY_PORT: "the DNS proxy"}


class ExplainUnavailable(IstioEbpfError):
    """This kernel (or this datapath) cannot run the explain program: say so, exit 2."""


@dataclass(frozen=True)
class Question:
    """One connection of a pod: outbound (``peer`` = destination) or inbound (``peer`` = the client,
    ``port`` = the pod's port). ``uid``/``gid`` are as the programs see them: host IDs."""

    direction: str                      # "outbound" | "inbound"
    peer: IPAddress
    port: int
    uid: int = 0
    gid: int = 0
    tcp: bool = True
    bound: IPAddress | None = None      # outbound: the socket's bound address (127.0.0.6: passthrough)

    def encode(self, pod: int) -> maps.ExplainReq:
        req = maps.ExplainReq(pod=pod, uid=self.uid, gid=self.gid, port=self.port, tcp=1 if self.tcp else 0,
                              direction=maps.EXPLAIN_INBOUND if self.direction == "inbound" else maps.EXPLAIN_OUTBOUND)
        req.peer = maps.IpAddr.of(self.peer)
        if self.bound is not None:
            req.bound = maps.IpAddr.of(self.bound)
        return req


@dataclass(frozen=True)
class Answer:
    question: Question
    status: str                         # "decided" | "no_pod" | "no_pod_ip" | "own_pod" | "udp_ignored"
    rule: str | None = None             # a maps.POD_COUNTERS name (status "decided")
    captured: bool = False
    listener: int | None = None         # the port it is sent to (15001, 15006, 15053)
    original_destination: tuple[str, int] | None = None
    listener_ready: bool | None = None  # inbound captured: Envoy's listening socket registered
    why: str = ""                       # the rule in istio-iptables' words
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        q = self.question
        return {"direction": q.direction, "peer": str(q.peer), "port": q.port, "uid": q.uid, "gid": q.gid,
                "protocol": "tcp" if q.tcp else "udp", "status": self.status, "rule": self.rule,
                "captured": self.captured, "listener": self.listener,
                "original_destination": list(self.original_destination) if self.original_destination else None,
                "listener_ready": self.listener_ready, "why": self.why, **self.extra}


def _address(ip: maps.IpAddr) -> str:
    return str(ip.address())


def decode(question: Question, ans: maps.ExplainAns, proxy_uid: int, proxy_gid: int) -> Answer:
    status = _STATUS.get(ans.status)
    if status is None:
        raise IstioEbpfError(f"the explain program answered an unknown status {ans.status}")
    if status != "decided":
        return Answer(question, status, why=_UNDECIDED[status])
    if ans.rule >= len(maps.POD_COUNTERS):
        raise IstioEbpfError(f"the explain program answered an unknown rule {ans.rule}")
    rule = maps.POD_COUNTERS[ans.rule]
    why = RULES[rule].format(uid=proxy_uid, gid=proxy_gid, port=question.port)
    if not ans.captured:
        return Answer(question, status, rule, why=why)
    return Answer(question, status, rule, captured=True, listener=int(ans.orig.listener),
                  original_destination=(_address(ans.orig.ip), int(ans.orig.port)),
                  listener_ready=bool(ans.listener_ready) if question.direction == "inbound" else None, why=why)


def unavailable(prog_fds: dict[str, int]) -> str | None:
    """Why explain cannot run here (None: it can)."""
    if PROBE in probe.forced_failures():
        return f"probe {PROBE} forced to fail ({probe.FORCE_FAIL_ENV})"
    if PROGRAM not in prog_fds:
        return f"the kernel refused the explain program ({PROGRAM}, BPF_PROG_TYPE_SCHED_CLS)"
    return None


def ask(prog_fd: int, pod: int, question: Question, proxy_uid: int, proxy_gid: int) -> Answer:
    """Run the explain program once for ``question`` about the pod keyed ``pod``."""
    req = question.encode(pod)
    packet = bytes(maps.EXPLAIN_REQ_OFFSET) + bytes(req) + bytes(ctypes.sizeof(maps.ExplainAns))
    try:
        _, out = libbpf.prog_test_run(prog_fd, packet)
    except OSError as exc:
        raise ExplainUnavailable(f"this kernel cannot run explain: BPF_PROG_TEST_RUN refused ({exc.strerror})") \
            from exc
    at = maps.EXPLAIN_REQ_OFFSET + ctypes.sizeof(maps.ExplainReq)
    raw = out[at:at + ctypes.sizeof(maps.ExplainAns)]
    if len(raw) < ctypes.sizeof(maps.ExplainAns):
        raise ExplainUnavailable("this kernel cannot run explain: the test run returned a short packet")
    ans = maps.ExplainAns.from_buffer_copy(raw)
    if ans.ran != 1:
        raise ExplainUnavailable("this kernel cannot run explain: the program's answer did not come back")
    return decode(question, ans, proxy_uid, proxy_gid)


def parse_destination(text: str, inbound: bool) -> tuple[IPAddress, int | None]:
    """``10.0.0.1:80``, ``[fd00::1]:443``, or a bare address (inbound: the client; outbound needs
    a port). Host names are not resolved: the kernel decides on addresses."""
    host, port = text, None
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
        if rest and port is None:
            raise ValueError(f"bad destination {text!r}")
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        if not p.isdigit():
            raise ValueError(f"bad destination {text!r}")
        port = int(p)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"bad destination {text!r}: an IP address (host names are not resolved)") from None
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"bad port in {text!r}")
    if port is None and not inbound:
        raise ValueError(f"destination {text!r} needs a port (IP:PORT, [IPv6]:PORT)")
    return ip, port


def listener_address(answer: Answer) -> str:
    """Where the connection goes, as an address the app could have dialled (127.0.0.1 / ::1)."""
    if answer.listener is None:
        return "-"
    peer = answer.question.peer
    if answer.question.direction == "inbound":
        host = answer.original_destination[0] if answer.original_destination else str(peer)
    elif peer.version == 6 and getattr(peer, "ipv4_mapped", None) is None:
        host = "::1"
    else:
        host = "127.0.0.1"
    return f"[{host}]:{answer.listener}" if ":" in host else f"{host}:{answer.listener}"


def text(answer: Answer, subject: str) -> str:
    """The answer for a person: a few aligned lines."""
    q = answer.question
    proto = "TCP" if q.tcp else "UDP"
    peer = f"[{q.peer}]" if q.peer.version == 6 else str(q.peer)
    if q.direction == "inbound":
        head = f"{subject}: inbound {proto} from {q.peer} to port {q.port}"
    else:
        head = f"{subject}: outbound {proto} to {peer}:{q.port} as uid {q.uid} gid {q.gid}" + \
            (f", bound to {q.bound}" if q.bound is not None else "")
    lines = [head]
    if answer.status != "decided":
        lines.append(f"  captured      no: {answer.why}")
    elif not answer.captured:
        lines.append("  captured      no: it leaves as it is (" + ("not redirected" if q.direction == "outbound"
                                                                    else "delivered to the port itself") + ")")
    else:
        where = _LISTENERS.get(answer.listener or 0, "")
        lines.append(f"  captured      yes, to {listener_address(answer)} ({where})")
        if answer.original_destination:
            host, port = answer.original_destination
            shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            lines.append(f"  original dst  {shown} (what SO_ORIGINAL_DST answers)")
        if answer.listener_ready is False:
            lines.append("  listener      none registered yet: the SYN is dropped until Envoy listens "
                         "(counter in_no_listener)")
    if answer.rule:
        lines.append(f"  rule          {answer.rule}: {answer.why}")
    lines.append("  decided by    the kernel: bpf/explain.c run with BPF_PROG_TEST_RUN over the pod's map "
                 "entries")
    return "\n".join(lines) + "\n"
