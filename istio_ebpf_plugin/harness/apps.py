"""Application processes for pods: a real HTTP server and an HTTP client run as the app user."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..datapath.staging import staged
from ..datapath.selftest.topology import PYTHON, Pod, wait_ready
from ..errors import KernelError
from ..timeouts import scaled

HTTP_SERVER_SCRIPT = Path(__file__).resolve().parent / "http_server.py"
HTTP_CLIENT_SCRIPT = Path(__file__).resolve().parent / "http_client.py"
APP_UID = 1000
APP_GID = 1000


@dataclass
class HttpServer:
    pod: Pod
    port: int
    proc: subprocess.Popen


def start_http_server(pod: Pod, port: int, uid: int = APP_UID, gid: int = APP_GID) -> HttpServer:
    """Threaded Python HTTP server on 0.0.0.0:port and [::]:port in ``pod`` as the app user."""
    proc = pod.spawn([PYTHON, "-S", staged(HTTP_SERVER_SCRIPT), "--pod", pod.name, "--port", str(port)],
                     uid=uid, gid=gid, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_ready(proc, f"http server in pod {pod.name}")
    return HttpServer(pod, port, proc)


def http_get(pod: Pod, url: str, count: int = 1, uid: int = APP_UID, gid: int = APP_GID,
             timeout: float = 5.0) -> list[dict]:
    """GET ``url`` ``count`` times from ``pod`` as uid/gid; one dict per request
    (status, bytes, info = the server's JSON first line)."""
    timeout = scaled(timeout)   # a request's deadline, not a measurement
    proc = pod.run([PYTHON, "-S", staged(HTTP_CLIENT_SCRIPT), url, str(count), str(timeout)], uid=uid, gid=gid,
                   timeout=timeout * count + scaled(15))
    if proc.returncode != 0:
        raise KernelError(f"http client in pod {pod.name} failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout)


def url_for(ip: str, port: int, path: str = "/") -> str:
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}{path}"
