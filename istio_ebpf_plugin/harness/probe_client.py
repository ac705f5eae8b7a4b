"""Probe client (stdlib only; run by path inside a pod as the uid/gid under test).

Connects (TCP) or sends a datagram (UDP) to ``--dst``/``--port``, optionally from a bound
``--bind IP:PORT``, and prints one JSON line per attempt: the probe server's record plus
``client_local``/``client_peer`` (getsockname/getpeername of our socket, what an application
sees) and ``reply_from`` (UDP: source of the reply), or
``{"listener": "refused" | "timeout" | "unreachable" | "error", "errno": NAME, ...}``.

``--timeout`` bounds the TCP handshake (the kernel's answer: a dropped SYN is "timeout");
``--reply-timeout`` bounds the wait for the listener's reply (TCP once connected, UDP after
sending), which needs the probe server to be scheduled: generous, so load cannot fail a case.

    python3 -S probe_client.py --dst 10.244.0.3 --port 8080 [--bind 10.244.0.2:40000] [--udp] [--count N]
"""

from __future__ import annotations

import argparse
import errno
import json
import socket
import sys


def split_hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def family_of(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def one(args: argparse.Namespace) -> dict:
    fam = family_of(args.dst)
    kind = socket.SOCK_DGRAM if args.udp else socket.SOCK_STREAM
    s = socket.socket(fam, kind)
    s.settimeout(args.timeout)
    try:
        if args.bind:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(split_hostport(args.bind))
        if args.udp:
            s.settimeout(args.reply_timeout)
            s.sendto(b"probe", (args.dst, args.port))
            data, src = s.recvfrom(4096)
            rec = json.loads(data)
            rec["reply_from"] = [src[0], src[1]]
        else:
            s.connect((args.dst, args.port))
            # What the application sees of its own connection (NAT is invisible under iptables).
            rec_local, rec_peer = s.getsockname(), s.getpeername()
            s.settimeout(args.reply_timeout)
            chunks = []
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                chunks.append(chunk)
            text = b"".join(chunks).decode(errors="replace").strip()
            rec = json.loads(text) if text else {"listener": "error", "error": "empty reply (not a probe listener)"}
            rec["client_local"] = [rec_local[0], rec_local[1]]
            rec["client_peer"] = [rec_peer[0], rec_peer[1]]
        return rec
    except ConnectionRefusedError:
        return {"listener": "refused", "errno": "ECONNREFUSED"}
    except socket.timeout:
        return {"listener": "timeout", "errno": "ETIMEDOUT"}
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return {"listener": "unreachable", "errno": name, "error": str(exc)}
        return {"listener": "error", "errno": name, "error": f"{type(exc).__name__}: {exc}"}
    except ValueError as exc:
        return {"listener": "error", "error": f"bad reply: {exc}"}
    finally:
        s.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dst", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--bind", default="")
    ap.add_argument("--udp", action="store_true")
    ap.add_argument("--timeout", type=float, default=3.0)
    ap.add_argument("--reply-timeout", type=float, default=10.0)
    ap.add_argument("--count", type=int, default=1)
    args = ap.parse_args(argv)
    for _ in range(args.count):
        print(json.dumps(one(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
