"""Original-destination probe server (stdlib only; run by path inside a pod).

Listens like Istio's ``istio-validation`` does on the sidecar ports -- TCP 15001
("outbound"), 15006 ("inbound") on 0.0.0.0 and [::] (v6only), 15053 TCP and UDP ("dns")
on 127.0.0.1 and ::1 like the Istio agent -- and, as plain "direct" targets, on every
port given with ``--targets``/``--udp-targets`` (wildcard addresses, both families).

For every accepted TCP connection it asks ``getsockopt(SOL_IP, SO_ORIGINAL_DST)`` (or
``SOL_IPV6, IP6T_SO_ORIGINAL_DST``), then writes one JSON line back to the client and
closes (the server closes first, so TIME_WAIT stays on the server side and a client may
reuse a bound source port). The JSON holds: listener, pod, port (listening port), local,
peer, orig_dst (``[ip, port]`` or null) and orig_dst_errno. UDP datagrams get the same
JSON as a reply datagram (orig_dst is null: REDIRECT gives UDP no SO_ORIGINAL_DST).
With ``--log FILE`` every record is also appended to FILE. Prints ``READY`` once bound.

    python3 -S probe_server.py --pod a --targets 8080,15008 --udp-targets 53
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import selectors
import socket
import struct
import sys

SO_ORIGINAL_DST = 80          # SOL_IP; linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80     # SOL_IPV6; linux/netfilter_ipv6/ip6_tables.h
SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)
SIDECAR_PORTS = {15001: "outbound", 15006: "inbound", 15053: "dns"}
DNS_LOCAL_PORTS = {15053}


def original_dst(conn: socket.socket) -> tuple[list | None, int]:
    try:
        if conn.family == socket.AF_INET:
            raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port = struct.unpack("!H", raw[2:4])[0]
            return [socket.inet_ntop(socket.AF_INET, raw[4:8]), port], 0
        raw = conn.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28)
        port = struct.unpack("!H", raw[2:4])[0]
        return [socket.inet_ntop(socket.AF_INET6, raw[8:24]), port], 0
    except OSError as exc:
        return None, exc.errno or -1


def addr(sockaddr: tuple) -> list:
    return [sockaddr[0], sockaddr[1]]


def bind(family: int, kind: int, port: int) -> socket.socket:
    s = socket.socket(family, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Istio's agent serves DNS on localhost only; everything else listens on the wildcard.
    local = port in DNS_LOCAL_PORTS
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind(("::1" if local else "::", port))
    else:
        s.bind(("127.0.0.1" if local else "0.0.0.0", port))
    if kind == socket.SOCK_STREAM:
        s.listen(1024)
    s.setblocking(False)
    return s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pod", required=True)
    ap.add_argument("--targets", default="", help="comma list of TCP ports answered as 'direct'")
    ap.add_argument("--udp-targets", default="", help="comma list of UDP ports answered as 'direct'")
    ap.add_argument("--no-sidecar-ports", action="store_true", help="do not listen on 15001/15006/15053")
    ap.add_argument("--log", default="")
    args = ap.parse_args(argv)

    tcp: dict[int, str] = {} if args.no_sidecar_ports else dict(SIDECAR_PORTS)
    udp: dict[int, str] = {} if args.no_sidecar_ports else {15053: "dns"}
    for p in filter(None, args.targets.split(",")):
        tcp.setdefault(int(p), "direct")
    for p in filter(None, args.udp_targets.split(",")):
        udp.setdefault(int(p), "direct")

    sel = selectors.DefaultSelector()
    for family in (socket.AF_INET, socket.AF_INET6):
        for port, label in tcp.items():
            sel.register(bind(family, socket.SOCK_STREAM, port), selectors.EVENT_READ, ("tcp", port, label))
        for port, label in udp.items():
            sel.register(bind(family, socket.SOCK_DGRAM, port), selectors.EVENT_READ, ("udp", port, label))
    log = open(args.log, "a", buffering=1) if args.log else None
    print("READY", flush=True)

    while True:
        for key, _ in sel.select():
            kind, port, label = key.data
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            try:
                if kind == "tcp":
                    conn, peer = sock.accept()
                    orig, err = original_dst(conn)
                    rec = {"listener": label, "pod": args.pod, "port": port, "proto": "tcp",
                           "local": addr(conn.getsockname()), "peer": addr(peer),
                           "orig_dst": orig, "orig_dst_errno": err}
                    conn.setblocking(True)
                    conn.settimeout(1.0)
                    try:
                        conn.sendall((json.dumps(rec) + "\n").encode())
                    finally:
                        conn.close()
                else:
                    data, peer = sock.recvfrom(2048)
                    rec = {"listener": label, "pod": args.pod, "port": port, "proto": "udp",
                           "local": addr(sock.getsockname()), "peer": addr(peer),
                           "orig_dst": None, "orig_dst_errno": errno.ENOPROTOOPT}
                    sock.sendto(json.dumps(rec).encode(), peer)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:  # a reset client must not stop the probe
                rec = {"listener": label, "pod": args.pod, "port": port, "error": str(exc)}
            if log:
                log.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        os._exit(0)
