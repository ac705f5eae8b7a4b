"""kube_api unit tests: error classes, the HTTP layer's timeouts/retries/pagination, the watch thread.

The HTTP tests talk to a small local HTTP server because they need faults the real apiserver
cannot produce on demand (a stream cut mid-chunk, a server that accepts and never answers,
a scripted 503). Everything the real server can show is in test_install_kube_e2e.py / test_agent_kube_e2e.py.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

import pytest

from istio_ebpf_plugin import kube_api
from istio_ebpf_plugin.agent.watch import PodWatcher
from istio_ebpf_plugin.errors import PermanentError, TemporaryError
from istio_ebpf_plugin.timeouts import scaled
from support.polling import wait_for


class ApiError(Exception):
    def __init__(self, status: int, body: str = "", retry_after: float | None = None) -> None:
        super().__init__(f"({status})")
        self.status, self.body, self.reason, self.retry_after = status, body, "x", retry_after


@pytest.mark.parametrize("status,body,cls", [
    (410, "", kube_api.ResourceGone),
    (409, '{"message": "the object has been modified"}', kube_api.ConcurrentEditError),
    # What a real 1.20 apiserver answers for a failed JSON-patch test: no causes.
    (422, '{"message": "the server rejected our request due to an error in our request"}',
     kube_api.ConcurrentEditError),
    (422, '{"message": "invalid", "details": {"causes": [{"field": "data"}]}}', PermanentError),
    (403, '{"message": "events is forbidden"}', kube_api.Forbidden),
    (401, "", kube_api.Forbidden),
    (404, "", kube_api.NotFound),
    (400, "", PermanentError),
    (429, "", TemporaryError),
    (503, "", TemporaryError),
])
def test_status_codes_map_to_classes(status, body, cls):
    err = kube_api.classify_api_error(ApiError(status, body), "do it")
    assert type(err) is cls
    assert str(err).startswith("do it: ") and "\n" not in str(err)


def test_connection_errors_are_temporary_and_retry_after_is_kept():
    assert type(kube_api.classify_api_error(ConnectionRefusedError("refused"), "x")) is TemporaryError
    assert kube_api.classify_api_error(ApiError(503, "", retry_after=7), "x").delay == 7


def test_calls_chain_the_original_cause():
    original = ApiError(403, '{"message": "nodes is forbidden"}')

    class Backend:
        def list_nodes(self):
            raise original

    previous = kube_api.use_backend(Backend())
    try:
        with pytest.raises(kube_api.Forbidden) as info:
            kube_api.list_nodes()
    finally:
        kube_api.use_backend(previous)
    assert info.value.__cause__ is original and "nodes is forbidden" in str(info.value)


def test_resource_paths():
    assert kube_api.resource_path("apps/v1", "DaemonSet", "ns", "a") == "/apis/apps/v1/namespaces/ns/daemonsets/a"
    assert kube_api.resource_path("v1", "Namespace", "ignored", "n") == "/api/v1/namespaces/n"
    assert kube_api.resource_path("rbac.authorization.k8s.io/v1", "ClusterRole", None, "r") == \
        "/apis/rbac.authorization.k8s.io/v1/clusterroles/r"
    with pytest.raises(PermanentError):
        kube_api.resource_path("example.com/v1", "Widget", "ns", "w")


def test_keepalive_is_on_for_every_connection():
    opts = {(level, name): value for level, name, value in kube_api._keepalive_options()}
    assert opts[(socket.SOL_SOCKET, socket.SO_KEEPALIVE)] == 1
    assert opts[(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)] == 30


# ------------------------------------------------------------------------------ a scripted HTTP server
class Server:
    """Loopback HTTP server; ``handler(req)`` writes the answer. Records every request."""

    def __init__(self, handler: Callable[[BaseHTTPRequestHandler], None]) -> None:
        self.requests: list[dict[str, Any]] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                outer.requests.append({"method": self.command, "path": parts.path,
                                       "query": {k: v[0] for k, v in parse_qs(parts.query).items()},
                                       "auth": self.headers.get("Authorization"),
                                       "type": self.headers.get("Content-Type"),
                                       "body": self.rfile.read(length) if length else b""})
                handler(self)

            do_GET = do_PATCH = do_POST = do_DELETE = _any  # noqa: N815 (http.server API)

            def log_message(self, *a: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def reply(h: BaseHTTPRequestHandler, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    h.send_response(status)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    h.wfile.write(data)


@pytest.fixture
def api(tmp_path, monkeypatch):
    """Point the real backend at a scripted server through a kubeconfig, as a user would."""
    made: list[Server] = []

    def start(handler, token="t0k3n"):
        server = Server(handler)
        made.append(server)
        write_kubeconfig(tmp_path / "kubeconfig", server.url, token)
        monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        return server

    yield start
    for s in made:
        s.close()


def write_kubeconfig(path, server: str, token: str) -> None:
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": server}}],
        "users": [{"name": "u", "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))


def test_list_is_paginated_and_label_selected(api):
    def handler(h):
        cont = parse_qs(urlsplit(h.path).query).get("continue", [""])[0]
        name = "istio-sidecar-injector" if not cont else "istio-sidecar-injector-canary"
        reply(h, 200, {"kind": "ConfigMapList", "metadata": {"continue": "" if cont else "page2",
                                                             "resourceVersion": "9"},
                       "items": [{"metadata": {"name": name, "namespace": "istio-system"}}]})

    server = api(handler)
    cms = kube_api.list_injector_configmaps()
    assert [c["metadata"]["name"] for c in cms] == ["istio-sidecar-injector", "istio-sidecar-injector-canary"]
    assert [r["query"].get("continue") for r in server.requests] == [None, "page2"]
    for r in server.requests:
        assert r["path"] == "/api/v1/configmaps" and r["auth"] == "Bearer t0k3n"
        assert r["query"]["labelSelector"] == kube_api.INJECTOR_SELECTOR and r["query"]["limit"] == "100"


def test_no_hidden_retries(api):
    server = api(lambda h: reply(h, 503, {"message": "etcd leader changed"}))
    with pytest.raises(TemporaryError) as info:
        kube_api.list_nodes()
    assert len(server.requests) == 1 and "etcd leader changed" in str(info.value)


def test_patches_carry_the_field_manager(api):
    server = api(lambda h: reply(h, 200, {"metadata": {"name": "n", "uid": "u-1"}}))
    node = kube_api.patch_node_metadata("n", {"a": "b"}, {})
    kube_api.json_patch_configmap("ns", "cm", [{"op": "test", "path": "/metadata/resourceVersion", "value": "1"}])
    kube_api.apply_object({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "s", "namespace": "ns"}})
    assert node["metadata"]["uid"] == "u-1"
    assert [r["type"] for r in server.requests] == [
        "application/merge-patch+json", "application/json-patch+json", "application/apply-patch+yaml"]
    assert all(r["query"]["fieldManager"] == kube_api.FIELD_MANAGER for r in server.requests)
    assert server.requests[2]["query"]["force"] == "true"


def test_a_silent_server_times_out(api, monkeypatch):
    monkeypatch.setattr(kube_api, "READ_TIMEOUT", 0.5)
    release = threading.Event()
    api(lambda h: release.wait(10))
    start = time.monotonic()
    try:
        with pytest.raises(TemporaryError) as info:
            kube_api.list_nodes()
    finally:
        release.set()
    assert time.monotonic() - start < scaled(5)   # READ_TIMEOUT 0.5 s, not the server's 10 s
    assert "timed out" in str(info.value).lower() or "Timeout" in str(info.value)


def test_kubeconfig_rewrite_reloads_the_token(api, tmp_path):
    server = api(lambda h: reply(h, 200, {"items": [], "metadata": {}}))
    kube_api.list_nodes()
    write_kubeconfig(tmp_path / "kubeconfig", server.url, "rotated")
    import os
    st = os.stat(tmp_path / "kubeconfig")
    os.utime(tmp_path / "kubeconfig", (st.st_atime, st.st_mtime + 1))   # coarse mtime on some filesystems
    kube_api.list_nodes()
    assert [r["auth"] for r in server.requests] == ["Bearer t0k3n", "Bearer rotated"]


def test_a_token_kubeconfig_needs_no_kubernetes_package_and_lists_without_managed_fields(api, tmp_path):
    """The agent's path (token, CA data): read without the kubernetes client (21 MiB of RSS); the
    node's pod list comes back without metadata.managedFields."""
    pod = {"metadata": {"name": "p", "uid": "u", "managedFields": [{"manager": "kubelet"}]}, "spec": {}}
    server = api(lambda h: reply(h, 200, {"items": [pod], "metadata": {"resourceVersion": "7"}}))
    cfg = json.loads((tmp_path / "kubeconfig").read_text())
    cfg["clusters"][0]["cluster"]["certificate-authority-data"] = "LS0tLS1CRUdJTg=="   # unused over http
    (tmp_path / "kubeconfig").write_text(json.dumps(cfg))
    script = ("import json, sys; from istio_ebpf_plugin import kube_api; "
              "items, rv = kube_api.list_node_pods('n'); "
              "print(json.dumps([items, rv, 'kubernetes' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "KUBECONFIG": str(tmp_path / "kubeconfig")})
    assert out.returncode == 0, out.stderr
    items, rv, imported = json.loads(out.stdout)
    assert items == [{"metadata": {"name": "p", "uid": "u"}, "spec": {}}] and rv == "7" and imported is False
    assert server.requests[0]["auth"] == "Bearer t0k3n"


@pytest.mark.parametrize("indent", [None, 1])
def test_a_pod_list_is_decoded_pod_by_pod_as_json_loads_would_without_managed_fields(indent):
    pods = [{"metadata": {"name": f"p{i}", "uid": str(i), "annotations": {"a": '{"x": [1, "]"]}'},
                          "managedFields": [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}]},
             "spec": {"containers": [{"name": "c", "args": ["-x", "", "\\", "\u00e9"]}]}, "status": {"podIPs": []}}
            for i in range(3)]
    for body in ({"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "42"}, "items": pods},
                 {"items": pods, "metadata": {"resourceVersion": "43", "continue": ""}, "kind": "PodList"},
                 {"kind": "PodList", "metadata": {"resourceVersion": "44"}, "items": []},
                 {"kind": "PodList", "metadata": {"resourceVersion": "45"}, "items": None}):
        raw = json.dumps(body, indent=indent).encode()
        expected = json.loads(raw)
        for pod in expected["items"] or []:
            del pod["metadata"]["managedFields"]
        assert kube_api.decode_pod_list(raw) == (expected["items"] or [], expected["metadata"]["resourceVersion"])


def test_a_client_certificate_kubeconfig_still_goes_through_the_kubernetes_loader(tmp_path):
    cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "c",
           "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
           "users": [{"name": "u", "user": {"client-certificate": "/nonexistent.crt",
                                            "client-key": "/nonexistent.key"}}],
           "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}
    (tmp_path / "kubeconfig").write_text(json.dumps(cfg))
    assert kube_api._token_access(("kubeconfig", str(tmp_path / "kubeconfig"), 0.0)) is None
    with pytest.raises(PermanentError, match="no Kubernetes configuration"):
        kube_api._load_connection(("kubeconfig", str(tmp_path / "kubeconfig"), 0.0))


def _cut_stream(h: BaseHTTPRequestHandler) -> None:
    """One good event, then half a chunk and a closed connection (a proxy or apiserver dying)."""
    h.send_response(200)
    h.send_header("Content-Type", "application/json")
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    line = json.dumps({"type": "ADDED", "object": {"metadata": {"name": "p", "resourceVersion": "5"}}}).encode()
    line += b"\n"
    h.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
    h.wfile.write(b"400\r\n{\"type\": \"MOD")
    h.wfile.flush()
    h.close_connection = True
    h.connection.shutdown(socket.SHUT_RDWR)


def test_a_stream_cut_mid_chunk_is_a_temporary_error_with_its_cause(api):
    api(_cut_stream)
    got = []
    with pytest.raises(TemporaryError) as info:
        for event in kube_api.watch_node_pods("n", "1", 5):
            got.append(event)
    assert [e["object"]["metadata"]["name"] for e in got] == ["p"]
    import urllib3
    assert isinstance(info.value.__cause__, urllib3.exceptions.HTTPError)


# ------------------------------------------------------------------------------ the watch thread
class ScriptedBackend:
    """list/watch answers from a script; each entry is a value, an exception or a callable."""

    def __init__(self) -> None:
        self.lists: list[float] = []
        self.watches: list[str] = []
        self.list_script: list[Any] = []

    def list_node_pods(self, node):
        self.lists.append(time.monotonic())
        step = self.list_script.pop(0) if self.list_script else None
        if isinstance(step, BaseException):
            raise step
        return [], str(len(self.lists) * 10)

    def watch_node_pods(self, node, rv, timeout):
        self.watches.append(rv)
        n = len(self.watches)
        if n == 1:
            raise AttributeError("a bug, not an API error")       # must not kill the thread
        if n == 2:
            def cut():
                yield {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "21"}}}
                import urllib3
                raise urllib3.exceptions.ProtocolError("Connection broken: IncompleteRead")
            return cut()
        if n == 3:
            return iter([{"type": "ERROR", "object": {"code": 410, "message": "too old resource version"}}])
        time.sleep(0.05)
        return iter([])


def test_watch_thread_survives_bugs_cuts_and_410_with_backoff(monkeypatch):
    backend = ScriptedBackend()
    monkeypatch.setattr(kube_api, "_backend_override", backend)
    out: "queue.Queue" = queue.Queue()
    w = PodWatcher("n", out, backoff=0.2, max_backoff=1.0, watch_timeout=1)
    w.start()
    try:
        wait_for(lambda: len(backend.watches) >= 4, what="four watches (three failures relisted)")
        assert w.health(60)[0] and w._thread.is_alive()
        assert backend.watches[:3] == ["10", "20", "30"]   # every failure relists (list RV 10, 20, 30)
        gaps = [b - a for a, b in zip(backend.lists, backend.lists[1:], strict=False)][:3]
        assert gaps[0] >= 0.18 and gaps[1] >= 0.38 and gaps[2] >= 0.75   # 0.2, 0.4, 0.8: backoff doubles
        assert w.errors == 3 and "relisting" in w.last_error
    finally:
        w.stop()


def test_watch_health_goes_stale_when_the_api_stops_answering(monkeypatch):
    backend = ScriptedBackend()
    backend.list_script = [TemporaryError("connection refused")] * 100
    monkeypatch.setattr(kube_api, "_backend_override", backend)
    w = PodWatcher("n", queue.Queue(), backoff=0.05, max_backoff=0.1)
    w.start()
    try:
        wait_for(lambda: w.last_error and not w.health(0.3)[0], what="the watch to go stale with an error")
        ok, why = w.health(0.3)
        assert not ok and "connection refused" in why
        assert w.health(60)[0]       # the thread itself is alive
    finally:
        w.stop()


def test_periodic_relist_waits_until_the_agent_took_the_previous_list(monkeypatch):
    """A resync slower than the relist period must not pile whole lists up in the queue."""
    class Backend:
        lists = 0
        watches = 0

        def list_node_pods(self, node):
            Backend.lists += 1
            return [], str(Backend.lists)

        def watch_node_pods(self, node, rv, timeout):
            Backend.watches += 1
            time.sleep(0.01)
            return iter([])

    monkeypatch.setattr(kube_api, "_backend_override", Backend())
    out: "queue.Queue" = queue.Queue()
    w = PodWatcher("n", out, resync_seconds=0.05, watch_timeout=1)
    w.start()
    try:
        wait_for(lambda: Backend.watches >= 20, what="the watch going on past several relist periods")
        assert Backend.lists == 1 and out.qsize() == 1          # the agent has not taken the first list
        assert out.get_nowait()[0] == "RESYNC"
        wait_for(lambda: Backend.lists >= 2, what="the periodic relist once the queue is empty")
    finally:
        w.stop()
