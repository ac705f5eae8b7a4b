"""Held TCP connections whose SO_ORIGINAL_DST can be asked again at any time (stdlib only; run by path).

server: ``held_conn.py server PORT[,PORT...] [ipv6]`` listens on 0.0.0.0 on each port (as Envoy's
15001/15006 would; with ``ipv6`` on :: too, IPv6 only) and keeps every accepted connection open. Each
line ``q`` it receives is answered with one JSON line: the connection's SO_ORIGINAL_DST (or
IP6T_SO_ORIGINAL_DST) asked NOW (``orig_dst`` ``[ip, port]`` or null, ``errno``), its ``local`` and
``peer``. ``c`` (or EOF) closes it, the server first, so the TIME_WAIT stays with the
server and the client's socket goes through CLOSE. Prints ``READY`` once listening.

client: ``held_conn.py client DST PORT`` connects, prints ``{"local": [ip, port]}``, then obeys stdin:
``query`` prints the server's answer, ``peer`` prints ``{"peer": [ip, port]}`` (getpeername asked NOW:
the address the app sees), ``close`` asks the server to close, waits for its FIN, closes and prints
``{"closed": true}``.
"""

from __future__ import annotations

import json
import selectors
import socket
import struct
import sys

SO_ORIGINAL_DST = 80       # SOL_IP; IP6T_SO_ORIGINAL_DST is the same number at SOL_IPV6
SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)


def original_dst(conn: socket.socket) -> tuple[list | None, int]:
    v6 = conn.family == socket.AF_INET6
    try:
        raw = conn.getsockopt(SOL_IPV6 if v6 else socket.SOL_IP, SO_ORIGINAL_DST, 28 if v6 else 16)
    except OSError as exc:
        return None, exc.errno or -1
    addr = socket.inet_ntop(socket.AF_INET6, raw[8:24]) if v6 else socket.inet_ntop(socket.AF_INET, raw[4:8])
    return [addr, struct.unpack("!H", raw[2:4])[0]], 0


def serve(ports: list[int], ipv6: bool) -> None:
    sel = selectors.DefaultSelector()
    for port in ports:
        for family, host in ((socket.AF_INET, "0.0.0.0"),) + (((socket.AF_INET6, "::"),) if ipv6 else ()):
            s = socket.socket(family)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((host, port))
            s.listen(64)
            sel.register(s, selectors.EVENT_READ, None)
    print("READY", flush=True)
    buffers: dict[socket.socket, bytes] = {}
    while True:
        for key, _ in sel.select():
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            if key.data is None:
                conn, _ = sock.accept()
                buffers[conn] = b""
                sel.register(conn, selectors.EVENT_READ, "conn")
                continue
            data = sock.recv(4096)
            buffers[sock] += data
            lines = buffers[sock].split(b"\n")
            buffers[sock] = lines.pop()
            done = not data
            for line in lines:
                if line == b"q":
                    orig, err = original_dst(sock)
                    rec = {"orig_dst": orig, "errno": err, "local": list(sock.getsockname()[:2]),
                           "peer": list(sock.getpeername()[:2])}
                    sock.sendall((json.dumps(rec) + "\n").encode())
                elif line == b"c":
                    done = True
            if done:
                sel.unregister(sock)
                del buffers[sock]
                sock.close()


def client(dst: str, port: int) -> None:
    s = socket.create_connection((dst, port), timeout=10)
    reader = s.makefile("rb")
    print(json.dumps({"local": list(s.getsockname()[:2])}), flush=True)
    for cmd in sys.stdin:
        cmd = cmd.strip()
        if cmd == "query":
            s.sendall(b"q\n")
            print(reader.readline().decode().strip(), flush=True)
        elif cmd == "peer":
            print(json.dumps({"peer": list(s.getpeername()[:2])}), flush=True)
        elif cmd == "close":
            s.sendall(b"c\n")
            while reader.read(4096):    # until the server's FIN
                pass
            s.close()
            print(json.dumps({"closed": True}), flush=True)
            return


if __name__ == "__main__":
    if sys.argv[1] == "server":
        serve([int(p) for p in sys.argv[2].split(",")], sys.argv[3:] == ["ipv6"])
    else:
        client(sys.argv[2], int(sys.argv[3]))
