"""Data server of the sockmap suite, run in a pod as the app user: ``python3 -S sockmap_server.py PORT``.

Each connection sends one line ``<size> <mode>``; the server answers ``size`` bytes and closes.
Mode ``half``: it first reads until the client's EOF (the client shut down its write side).
Listens on 0.0.0.0 and [::] (v6only); prints READY once both are bound. Stdlib only.
"""

from __future__ import annotations

import socket
import sys
import threading

CHUNK = b"x" * 65536


def serve(conn: socket.socket) -> None:
    try:
        size_text, mode = conn.makefile("rb").readline().split()
        if mode == b"half":
            while conn.recv(65536):
                pass
        left = int(size_text)
        while left:
            left -= conn.send(CHUNK[:min(left, len(CHUNK))])
    finally:
        conn.close()


def accept_loop(listener: socket.socket) -> None:
    while True:
        threading.Thread(target=serve, args=(listener.accept()[0],), daemon=True).start()


def main(port: int) -> None:
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        listener.bind((host, port))
        listener.listen(1024)
        threading.Thread(target=accept_loop, args=(listener,), daemon=True).start()
    print("READY", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main(int(sys.argv[1]))
