"""``/healthz``, ``/readyz``, ``/metrics`` and JSON routes (``/pods``) on one small HTTP server thread."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Mapping
from urllib.parse import parse_qs

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

Check = Callable[[], tuple[bool, str]]
#: query (parse_qs of the URL's query string) -> (HTTP status, JSON-able body)
JsonRoute = Callable[[Mapping[str, list[str]]], tuple[int, Any]]


class HealthServer:
    def __init__(self, host: str, port: int, healthy: Check, ready: Check,
                 registry: CollectorRegistry, json_routes: Mapping[str, JsonRoute] | None = None) -> None:
        checks = {"/healthz": healthy, "/readyz": ready}
        routes = dict(json_routes or {})

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                path, _, query = self.path.partition("?")
                if path == "/metrics":
                    body, status, ctype = generate_latest(registry), 200, CONTENT_TYPE_LATEST
                elif path in routes:
                    try:
                        status, obj = routes[path](parse_qs(query))
                    except Exception as exc:  # noqa: BLE001 - one bad request never stops the server
                        status, obj = 500, {"error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}
                    body, ctype = (json.dumps(obj, sort_keys=True) + "\n").encode(), "application/json"
                elif path in checks:
                    ok, text = checks[path]()
                    body, status, ctype = (text + "\n").encode(), 200 if ok else 503, "text/plain"
                else:
                    body, status, ctype = b"not found\n", 404, "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: object) -> None:  # probes every few seconds: stay quiet
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="health", daemon=True)

    def start(self) -> "HealthServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
