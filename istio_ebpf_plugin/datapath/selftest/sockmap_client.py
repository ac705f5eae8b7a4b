"""Client of the sockmap suite, run in a pod as the app user.

``python3 -S sockmap_client.py DST PORT SIZES CONCURRENCY`` fetches every size in SIZES
(comma list) with the server closing (``close``) and after a half-close (``half``), each
read three ways: ``recv``, FIONREAD-sized reads (as nginx does: must never see 0 while
data is readable) and splice(2) into a pipe; then CONCURRENCY parallel 16 KiB fetches.
Prints one JSON list: {size, mode, reader, seconds, problems}. Stdlib only.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import socket
import struct
import sys
import termios
import time
from concurrent.futures import ThreadPoolExecutor


def _read_splice(s: socket.socket) -> int:
    s.setblocking(True)     # splice(2) on a non-blocking socket answers EAGAIN
    got = 0
    r, w = os.pipe()
    try:
        while True:
            n = os.splice(s.fileno(), w, 1 << 20)
            if n == 0:
                return got
            got += n
            while n:
                n -= len(os.read(r, n))
    finally:
        os.close(r)
        os.close(w)


def _read_fionread(s: socket.socket, problems: list[str]) -> int:
    s.setblocking(False)
    got = zero_reads = 0
    poller = select.poll()
    poller.register(s, select.POLLIN)
    while True:
        if not poller.poll(5000):
            problems.append("poll timeout")
            break
        avail = struct.unpack("i", fcntl.ioctl(s, termios.FIONREAD, b"\0\0\0\0"))[0]
        data = s.recv(max(avail, 1))
        if not data:
            break
        if avail == 0:
            zero_reads += 1      # counted, not listed: one entry per read is unbounded
        got += len(data)
    if zero_reads:
        problems.append(f"FIONREAD 0 with data readable ({zero_reads} reads)")
    return got


def _read_recv(s: socket.socket) -> int:
    got = 0
    while True:
        data = s.recv(1 << 20)
        if not data:
            return got
        got += len(data)


def fetch(dst: str, port: int, size: int, mode: str, reader: str) -> dict:
    started = time.monotonic()
    problems: list[str] = []
    s = socket.create_connection((dst, port), timeout=5)
    try:
        s.sendall(f"{size} {mode}\n".encode())
        if mode == "half":
            s.shutdown(socket.SHUT_WR)
        if reader == "splice":
            got = _read_splice(s)
        elif reader == "fionread":
            got = _read_fionread(s, problems)
        else:
            got = _read_recv(s)
    finally:
        s.close()
    if got != size:
        problems.append(f"got {got} of {size} bytes")
    return {"size": size, "mode": mode, "reader": reader, "seconds": round(time.monotonic() - started, 4),
            "problems": problems}


def main(dst: str, port: int, sizes: list[int], concurrency: int) -> None:
    results = [fetch(dst, port, size, mode, reader)
               for size in sizes for mode in ("close", "half") for reader in ("recv", "fionread", "splice")]
    with ThreadPoolExecutor(max_workers=50) as ex:
        results += list(ex.map(lambda _: fetch(dst, port, 16384, "close", "recv"), range(concurrency)))
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), [int(x) for x in sys.argv[3].split(",")], int(sys.argv[4]))
