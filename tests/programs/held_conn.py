"""Held TCP connections whose SO_ORIGINAL_DST can be asked again at any time (stdlib only; run by path).

server: ``held_conn.py server PORT[,PORT...]`` listens on 0.0.0.0 on each port (as Envoy's 15001/15006
would) and keeps every accepted connection open. Each line ``q`` it receives is answered with one JSON
line: the connection's SO_ORIGINAL_DST asked NOW (``orig_dst`` ``[ip, port]`` or null, ``errno``), its
``local`` and ``peer``. ``c`` (or EOF) closes it, the server first, so the TIME_WAIT stays with the
server and the client's socket goes through CLOSE. Prints ``READY`` once listening.

client: ``held_conn.py client DST PORT`` connects, prints ``{"local": [ip, port]}``, then obeys stdin:
``query`` prints the server's answer, ``close`` asks the server to close, waits for its FIN, closes and
prints ``{"closed": true}``.
"""

from __future__ import annotations

import json
import selectors
import socket
import struct
import sys

SO_ORIGINAL_DST = 80


def original_dst(conn: socket.socket) -> tuple[list | None, int]:
    try:
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError as exc:
        return None, exc.errno or -1
    return [socket.inet_ntop(socket.AF_INET, raw[4:8]), struct.unpack("!H", raw[2:4])[0]], 0


def serve(ports: list[int]) -> None:
    sel = selectors.DefaultSelector()
    for port in ports:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
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
                    rec = {"orig_dst": orig, "errno": err, "local": list(sock.getsockname()),
                           "peer": list(sock.getpeername())}
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
    print(json.dumps({"local": list(s.getsockname())}), flush=True)
    for cmd in sys.stdin:
        cmd = cmd.strip()
        if cmd == "query":
            s.sendall(b"q\n")
            print(reader.readline().decode().strip(), flush=True)
        elif cmd == "close":
            s.sendall(b"c\n")
            while reader.read(4096):    # until the server's FIN
                pass
            s.close()
            print(json.dumps({"closed": True}), flush=True)
            return


if __name__ == "__main__":
    if sys.argv[1] == "server":
        serve([int(p) for p in sys.argv[2].split(",")])
    else:
        client(sys.argv[2], int(sys.argv[3]))
