"""Steady load for the upgrade tests, run as the app in the client pod (stdlib only, ``python3 -S``).

``upgrade_load.py TOS TARGET...`` (TARGET = ``ip,port`` HTTP server, or ``dns:ip`` a nameserver
the pod's DNS capture must send to its 15053) loops over its targets until a line arrives on stdin,
then prints one JSON summary. Every socket carries IP TOS / IPv6 traffic class TOS, which Envoy does
not copy to its upstream connections: a SYN with TOS at the server is the app's own, uncaptured.
Per HTTP request it checks what the app sees (getpeername = the address it dialled: the
app-visible address hooks) and what the server saw (its peer 127.0.0.6/::6: through the server's
Envoy; its local address = the original destination Envoy was told). Per DNS query: connected UDP,
the reply's source and getpeername are the nameserver (the recvmsg/getpeername restore).
"""

import json
import select
import socket
import sys
import time

tos = int(sys.argv[1])
targets = sys.argv[2:]
stats = {"requests": 0, "ok": 0, "failed": [], "view_wrong": [], "server_peer_wrong": [],
         "server_local_wrong": [], "dns": 0, "dns_failed": []}


def family(ip):
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def mark(s, fam):
    if fam == socket.AF_INET:
        s.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, tos)
    else:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, tos)


def http(ip, port):
    fam = family(ip)
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(10)
    mark(s, fam)
    try:
        s.connect((ip, port))
        peer = s.getpeername()[:2]
        if (peer[0], peer[1]) != (ip, port):
            stats["view_wrong"].append([ip, port, list(peer)])
        s.sendall(f"GET /upgrade HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1]) if head else 0
        if status != 200:
            raise OSError(f"status {status}")
        info = json.loads(body.split(b"\n", 1)[0])
        if info["peer"][0] not in ("127.0.0.6", "::6"):
            stats["server_peer_wrong"].append([ip, port, info["peer"]])
        if (info["local"][0], info["local"][1]) != (ip, port):
            stats["server_local_wrong"].append([ip, port, info["local"]])
        stats["ok"] += 1
    except (OSError, ValueError, IndexError) as exc:
        stats["failed"].append([ip, port, time.time(), f"{type(exc).__name__}: {exc}"])
    finally:
        stats["requests"] += 1
        s.close()


def dns(ip):
    fam = family(ip)
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.settimeout(5)
    mark(s, fam)
    stats["dns"] += 1
    try:
        s.connect((ip, 53))
        s.send(b"upgrade-query")
        data, src = s.recvfrom(512)
        if data != b"upgrade-query" or src[:2] != (ip, 53) or s.getpeername()[:2] != (ip, 53):
            raise OSError(f"reply {data!r} from {src} peer {s.getpeername()}")
    except OSError as exc:
        stats["dns_failed"].append([ip, time.time(), f"{type(exc).__name__}: {exc}"])
    finally:
        s.close()


print("READY", flush=True)
while not select.select([sys.stdin], [], [], 0)[0]:
    for t in targets:
        if t.startswith("dns:"):
            dns(t[4:])
        else:
            ip, port = t.rsplit(",", 1)
            http(ip, int(port))
print(json.dumps(stats), flush=True)
