"""Small threaded HTTP/1.1 server (stdlib only; run by path inside a pod).

Listens on 0.0.0.0:PORT and [::]:PORT (v6only). ``GET /anything?size=N`` answers a JSON
line with the server's pod name, the peer and local addresses of the connection, then
pads the body to N bytes when N is larger. Keep-alive is supported. Prints ``READY``.

    python3 -S http_server.py --pod b --port 8080
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    pod = "?"

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        query = parse_qs(urlparse(self.path).query)
        size = int(query.get("size", ["0"])[0])
        info = {"pod": self.pod, "peer": list(self.client_address[:2]),
                "local": list(self.connection.getsockname()[:2]), "path": self.path}
        body = (json.dumps(info) + "\n").encode()
        if size > len(body):
            body += b"x" * (size - len(body))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass


class Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        super().server_bind()


class Server4(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pod", default="?")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args(argv)
    Handler.pod = args.pod
    servers = [Server4(("0.0.0.0", args.port), Handler), Server6(("::", args.port), Handler)]
    for srv in servers[1:]:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    print("READY", flush=True)
    servers[0].serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
