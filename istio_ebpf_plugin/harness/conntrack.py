"""What conntrack made of one connection, read from a pod's table with conntrack-tools.

Under Istio's iptables, REDIRECT maps many original destinations onto one listener, so two
connections from the same source address and port share one reply tuple (``127.0.0.1:15001 ->
pod:port``) even though their original tuples differ. A client closes its socket at once, but
conntrack keeps the flow in TIME_WAIT for two minutes; when the kernel hands the same source
port to a new connection that REDIRECT sends to the same listener, NAT resolves the clash by
giving the source another port (the mechanism behind istio#38982). Envoy, and the lab's probe
listener, then see that port instead of the application's. :func:`translated_source` finds it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Iterable

from ..datapath.selftest.topology import Pod
from ..errors import KernelError

Addr = tuple[str, int]


@dataclass(frozen=True)
class Entry:
    """One conntrack flow: the original tuple (as the client sent it) and the reply tuple
    (as the answering socket sees it, reversed), with the TCP state if any."""

    orig_src: Addr
    orig_dst: Addr
    reply_src: Addr
    reply_dst: Addr
    state: str = ""


def plain(ip: str) -> str:
    """An address as conntrack shows it: IPv4-mapped IPv6 is IPv4 (iptables, not ip6tables)."""
    a = ipaddress.ip_address(ip)
    return str(a.ipv4_mapped) if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped else str(a)


def parse(line: str) -> Entry | None:
    """One line of ``conntrack -L`` (``tcp 6 119 TIME_WAIT src=.. dst=.. sport=.. dport=.. src=..``)."""
    words = line.split()
    state = words[3] if len(words) > 3 and "=" not in words[3] else ""
    tuples: list[dict[str, str]] = []
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or key not in ("src", "dst", "sport", "dport"):
            continue
        if key == "src":
            tuples.append({})
        if tuples:
            tuples[-1][key] = value
    if len(tuples) < 2 or any(len(t) != 4 for t in tuples[:2]):
        return None
    o, r = tuples[0], tuples[1]
    return Entry(orig_src=(plain(o["src"]), int(o["sport"])), orig_dst=(plain(o["dst"]), int(o["dport"])),
                 reply_src=(plain(r["src"]), int(r["sport"])), reply_dst=(plain(r["dst"]), int(r["dport"])),
                 state=state)


def lookup(pod: Pod, src: Addr, dst: Addr, proto: str = "tcp") -> Entry | None:
    """The flow in ``pod``'s netns whose original tuple is ``src -> dst``, or None."""
    sip, dip = plain(src[0]), plain(dst[0])
    family = "ipv6" if ":" in sip else "ipv4"
    proc = pod.ns_exec(["conntrack", "-L", "-f", family, "-p", proto, "--orig-src", sip, "--orig-dst", dip,
                        "--sport", str(src[1]), "--dport", str(dst[1])], check=False)
    if proc.returncode != 0:
        raise KernelError(f"conntrack -L in pod {pod.name} failed ({proc.returncode}): {proc.stderr.strip()[-300:]}"
                          " (conntrack-tools: scripts/setup.sh apt)")
    for line in proc.stdout.splitlines():
        entry = parse(line)
        if entry and entry.orig_src == (sip, src[1]) and entry.orig_dst == (dip, dst[1]):
            return entry
    return None


def translated_source(pods: Iterable[Pod], src: Addr, dst: Addr, proto: str = "tcp") -> Addr | None:
    """Where NAT moved the source of the connection ``src -> dst`` (the application's own
    getsockname/getpeername), searched in ``pods``; None if no pod's conntrack changed it."""
    for pod in pods:
        entry = lookup(pod, src, dst, proto)
        if entry and entry.reply_dst != entry.orig_src:
            return entry.reply_dst
    return None
