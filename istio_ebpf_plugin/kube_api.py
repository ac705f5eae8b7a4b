"""The one module that talks to the Kubernetes API (in the manner of kopf's ``_cogs/clients``).

Everything else (installer, node agent) calls the functions at the bottom; they all go through
one backend object, so tests swap the API with :func:`use_backend` and nothing else. Objects
cross this boundary as plain dicts, exactly as the API serves them.

The real backend speaks HTTP with urllib3 directly: explicit connect/read timeouts, TCP
keep-alive (a silent API server or a dead NAT entry is noticed), no hidden retries (the
callers retry with backoff and know what they retry). The ``kubernetes`` package is used
for what it does well: reading in-cluster and kubeconfig credentials.

Errors are classes (:func:`classify_api_error`): permanent (retrying cannot help),
temporary (retry with backoff), a conflict (re-read and retry), Gone (relist); the
original exception is always chained as the cause.
"""

from __future__ import annotations

import base64
import datetime
import json
import logging
import os
import re
import socket
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, TypeVar
from urllib.parse import quote, urlencode

from .errors import IstioEbpfError, PermanentError, TemporaryError

#: ``fieldManager`` of every write (managedFields show who changed what).
FIELD_MANAGER = "istio-ebpf"
INSTALLER_FIELD_MANAGER = FIELD_MANAGER
#: Istio's injector ConfigMaps carry these labels (istiod chart 1.14 to master): list only those.
INJECTOR_SELECTOR = "operator.istio.io/component=Pilot,istio.io/rev"
INJECTOR_NAME = "istio-sidecar-injector"
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0
#: A watch stream may stay silent until the server ends it after timeoutSeconds; past this
#: margin the server (or the path to it) is dead and the watch is restarted.
WATCH_READ_MARGIN = 30.0
PAGE_SIZE = 100
IN_CLUSTER_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"
IN_CLUSTER_CA = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------- errors
class ResourceGone(TemporaryError):
    """The watch's resourceVersion is too old (HTTP 410): list again."""


class ConcurrentEditError(TemporaryError):
    """The object changed since we read it (409, or 422 from a failed JSON-patch ``test``): re-read, retry."""


class Forbidden(PermanentError):
    """401/403: credentials or RBAC. Retrying soon cannot help."""


class NotFound(PermanentError):
    """404."""


class ApiStatusError(Exception):
    """A non-2xx answer of the API server (what the real backend raises before classification)."""

    def __init__(self, status: int, reason: str, body: str, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status} {reason}")
        self.status, self.reason, self.body, self.retry_after = status, reason, body, retry_after


def _status_message(body: str) -> tuple[str, list]:
    try:
        data = json.loads(body)
    except (ValueError, TypeError):
        return "", []
    if not isinstance(data, dict):
        return "", []
    causes = (data.get("details") or {}).get("causes") or []
    return str(data.get("message") or ""), causes if isinstance(causes, list) else []


def classify_api_error(exc: Exception, what: str) -> IstioEbpfError:
    """Map any client-side exception to our classes; the caller chains ``exc`` as the cause."""
    if isinstance(exc, IstioEbpfError):
        return exc
    status = getattr(exc, "status", None)
    if not isinstance(status, int):
        # urllib3/socket/SSL errors: connection refused, reset, timeouts, a stream cut mid-chunk.
        first = str(exc).splitlines()[0] if str(exc) else ""
        return TemporaryError(f"{what}: {type(exc).__name__}: {first}".rstrip(": "))
    reason = str(getattr(exc, "reason", "") or "")
    message, causes = _status_message(str(getattr(exc, "body", "") or ""))
    detail = f"HTTP {status} {reason}".strip() + (f": {message}" if message else "")
    if status == 410:
        return ResourceGone(f"{what}: resourceVersion too old ({detail})")
    if status == 409:
        return ConcurrentEditError(f"{what}: changed concurrently ({detail})")
    if status == 422 and not causes:
        # A failed JSON-patch `test` (our resourceVersion guard) is a bare 422 without causes;
        # an invalid object is a 422 naming its causes (fields), which retrying cannot fix.
        return ConcurrentEditError(f"{what}: changed concurrently (JSON patch test failed: {detail})")
    if status in (401, 403):
        return Forbidden(f"{what}: {detail}")
    if status == 404:
        return NotFound(f"{what}: {detail}")
    if status == 429 or status >= 500:
        retry_after = getattr(exc, "retry_after", None)
        return TemporaryError(f"{what}: {detail}", delay=float(retry_after or 2.0))
    return PermanentError(f"{what}: {detail}")


# ---------------------------------------------------------------------------------- connection
@dataclass
class _Connection:
    server: str
    pool: Any                                  # urllib3.PoolManager
    auth_headers: Callable[[], dict[str, str]]  # Authorization (token refreshed by the kubernetes loader)


_conn_lock = threading.Lock()
_conn_cache: tuple[tuple, _Connection] | None = None
_insecure_warned: set[str] = set()     # servers already announced as unverified (once per process)


def _config_key() -> tuple:
    """What the connection was built from; a change (token rotated, kubeconfig rewritten) reloads it."""
    def mtime(path: str) -> float:
        try:
            return os.stat(path).st_mtime
        except OSError:
            return 0.0

    if os.environ.get("KUBERNETES_SERVICE_HOST") and os.path.exists(IN_CLUSTER_TOKEN):
        return ("in-cluster", mtime(IN_CLUSTER_TOKEN))
    path = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    return ("kubeconfig", path, mtime(path))


def _keepalive_options() -> list[tuple[int, int, int]]:
    from urllib3.connection import HTTPConnection

    opts = list(HTTPConnection.default_socket_options) + [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):
            opts.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    return opts


@dataclass(frozen=True)
class _TokenAccess:
    """A server reached with a bearer token: all an agent pod (in-cluster) or a token kubeconfig needs."""

    server: str
    token: str
    ca_file: str | None = None
    ca_data: str | None = None
    verify: bool = True


def _token_access(key: tuple) -> _TokenAccess | None:
    """In-cluster, or a kubeconfig whose user is a token, read here; None for anything else.

    The kubernetes client package (its loaders import every API model) cost the agent 21 MiB of
    its RSS; it stays the reader of kubeconfigs with client certificates, exec plugins or auth
    providers.
    """
    if key[0] == "in-cluster":
        host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        with open(IN_CLUSTER_TOKEN) as f:
            token = f.read().strip()
        return _TokenAccess(f"https://{f'[{host}]' if ':' in host else host}:{port}", token, ca_file=IN_CLUSTER_CA)
    import yaml

    try:
        with open(key[1]) as f:
            doc = yaml.safe_load(f)
        named = {(kind, e["name"]): e[kind[:-1]] for kind in ("clusters", "users", "contexts")
                 for e in doc.get(kind) or []}
        context = named[("contexts", doc["current-context"])]
        cluster, user = named[("clusters", context["cluster"])], named[("users", context["user"])]
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError):
        return None          # the kubernetes loader says what is wrong with it
    if set(user) - {"token"} or not user.get("token") or not isinstance(cluster.get("server"), str):
        return None
    ca_file = cluster.get("certificate-authority")
    if ca_file:
        ca_file = os.path.join(os.path.dirname(os.path.abspath(key[1])), ca_file)
    ca_data = cluster.get("certificate-authority-data")
    return _TokenAccess(cluster["server"].rstrip("/"), str(user["token"]), ca_file=ca_file,
                        ca_data=base64.b64decode(ca_data).decode() if ca_data else None,
                        verify=not cluster.get("insecure-skip-tls-verify", False))


def _pool(*, verify: bool, ca_file: str | None = None, ca_data: str | None = None, cert_file: str | None = None,
          key_file: str | None = None) -> Any:
    import urllib3

    return urllib3.PoolManager(
        num_pools=2, maxsize=4, retries=False,   # urllib3 would retry 3 times silently: fail fast instead
        timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT, read=READ_TIMEOUT),
        socket_options=_keepalive_options(), cert_reqs="CERT_REQUIRED" if verify else "CERT_NONE",
        ca_certs=ca_file, ca_cert_data=ca_data, cert_file=cert_file, key_file=key_file)


def _load_connection(key: tuple) -> _Connection:
    try:
        plain = _token_access(key)
    except OSError as exc:
        raise PermanentError(f"no in-cluster Kubernetes configuration: {exc}") from exc
    if plain is not None:
        if not plain.verify:
            _warn_insecure(plain.server)
        header = {"Authorization": f"Bearer {plain.token}"}
        return _Connection(plain.server, _pool(verify=plain.verify, ca_file=plain.ca_file, ca_data=plain.ca_data),
                           lambda: header)
    from kubernetes import client, config

    cfg = client.Configuration()
    try:
        if key[0] == "in-cluster":
            config.load_incluster_config(client_configuration=cfg)
        else:
            config.load_kube_config(config_file=key[1], client_configuration=cfg)
    except (config.ConfigException, OSError, TypeError, ValueError) as exc:
        raise PermanentError(f"no Kubernetes configuration (in-cluster or kubeconfig {key[1]}): "
                             f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    if not cfg.verify_ssl:
        _warn_insecure(cfg.host)
    pool = _pool(verify=cfg.verify_ssl, ca_file=cfg.ssl_ca_cert, cert_file=cfg.cert_file, key_file=cfg.key_file)

    def auth_headers() -> dict[str, str]:
        # auth_settings() names the header across client versions (the token key moved in v35).
        return {a["key"]: a["value"] for a in cfg.auth_settings().values()
                if a.get("in") == "header" and a.get("value")}

    return _Connection(cfg.host.rstrip("/"), pool, auth_headers)


def _warn_insecure(server: str) -> None:
    """One line per process instead of urllib3's two-line InsecureRequestWarning on every request."""
    import urllib3

    warnings.filterwarnings("ignore", category=urllib3.exceptions.InsecureRequestWarning)
    if server not in _insecure_warned:
        _insecure_warned.add(server)
        log.warning("TLS verification is off for %s (insecure-skip-tls-verify in the kubeconfig): "
                    "the API server's identity is not checked", server)


def _connection() -> _Connection:
    global _conn_cache
    key = _config_key()
    with _conn_lock:
        if _conn_cache is None or _conn_cache[0] != key:
            _conn_cache = (key, _load_connection(key))
        return _conn_cache[1]


# ---------------------------------------------------------------------------------- resources
# kind -> (plural, namespaced): the kinds we read and write. No discovery round trips.
_RESOURCES: dict[str, tuple[str, bool]] = {
    "Namespace": ("namespaces", False), "Node": ("nodes", False),
    "ClusterRole": ("clusterroles", False), "ClusterRoleBinding": ("clusterrolebindings", False),
    "ServiceAccount": ("serviceaccounts", True), "ConfigMap": ("configmaps", True), "Secret": ("secrets", True),
    "Role": ("roles", True), "RoleBinding": ("rolebindings", True), "Service": ("services", True),
    "DaemonSet": ("daemonsets", True), "Deployment": ("deployments", True), "Pod": ("pods", True),
    "Event": ("events", True),
}


def resource_path(api_version: str, kind: str, namespace: str | None = None, name: str | None = None) -> str:
    try:
        plural, namespaced = _RESOURCES[kind]
    except KeyError:
        raise PermanentError(f"istio-ebpf does not manage objects of kind {kind!r}") from None
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    if namespaced and namespace:
        base += f"/namespaces/{quote(namespace, safe='')}"
    base += f"/{plural}"
    return base + (f"/{quote(name, safe='')}" if name else "")


class KubeBackend(Protocol):
    """The seam: one method per API operation the product needs, objects as plain dicts.

    :class:`HttpBackend` is the real one; tests swap in a double with :func:`use_backend`.
    Errors may be anything: the functions below classify them (:func:`classify_api_error`).
    """

    # ---- node agent
    def list_node_pods(self, node_name: str) -> tuple[list[dict], str]: ...   # pods, resourceVersion
    def watch_node_pods(self, node_name: str, resource_version: str, timeout_seconds: int) -> Iterator[dict]: ...
    def patch_node_metadata(self, node_name: str, labels: dict, annotations: dict) -> dict: ...
    def create_event(self, namespace: str, involved: dict, reason: str, message: str, event_type: str,
                     component: str) -> None: ...
    def get_daemonset(self, namespace: str, name: str) -> dict | None: ...

    # ---- installer
    def list_configmaps(self, label_selector: str) -> list[dict]: ...
    def get_configmap(self, namespace: str, name: str) -> dict | None: ...
    def json_patch_configmap(self, namespace: str, name: str, ops: list[dict]) -> dict: ...
    def apply(self, body: dict) -> dict: ...                           # server-side apply
    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict | None: ...
    def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> bool: ...
    def list_nodes(self) -> list[dict]: ...
    def patch_node_labels(self, name: str, labels: dict[str, str | None]) -> None: ...
    def json_patch_node(self, name: str, ops: list[dict]) -> dict: ...
    def list_pods(self, namespace: str, label_selector: str) -> list[dict]: ...   # namespace "": all
    def patch_pod_annotations(self, namespace: str, name: str, annotations: dict[str, str | None]) -> None: ...


def _drop_managed_fields(obj: Any) -> None:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    if isinstance(meta, dict):
        meta.pop("managedFields", None)


_WS = re.compile(r"[ \t\n\r]*")


def _skip_ws(text: str, i: int) -> int:
    m = _WS.match(text, i)
    return m.end() if m else i


def decode_pod_list(raw: bytes) -> tuple[list[dict], str]:
    """A PodList's items and resourceVersion, each pod decoded on its own and without
    ``metadata.managedFields`` (half of an injected pod's JSON, never read here).

    ``json.loads`` of the whole body built every pod whole at once: ~24 MB of objects for 500
    pods, a high-water mark the agent's RSS kept. One pod at a time, what is dropped is freed
    before the next is read. Anything but the expected shape is decoded whole instead.
    """
    text = raw.decode()
    decoder = json.JSONDecoder()
    items: list[dict] = []
    meta: Any = {}
    try:
        i = _skip_ws(text, 0)
        if text[i] != "{":
            raise ValueError("not an object")
        i += 1
        while True:
            i = _skip_ws(text, i)
            if text[i] == "}":
                break
            if text[i] == ",":
                i += 1
                continue
            key, i = decoder.raw_decode(text, i)
            i = _skip_ws(text, i)
            if not isinstance(key, str) or text[i] != ":":
                raise ValueError("expected a key")
            i = _skip_ws(text, i + 1)
            if key == "items" and text[i] == "[":
                i = _skip_ws(text, i + 1)
                while text[i] != "]":
                    pod, i = decoder.raw_decode(text, i)
                    _drop_managed_fields(pod)
                    items.append(pod)
                    i = _skip_ws(text, i)
                    if text[i] == ",":
                        i = _skip_ws(text, i + 1)
                i += 1
            else:
                value, i = decoder.raw_decode(text, i)
                if key == "metadata":
                    meta = value
    except (ValueError, IndexError):
        whole = json.loads(text) if text.strip() else {}
        items = list(whole.get("items") or []) if isinstance(whole, dict) else []
        for pod in items:
            _drop_managed_fields(pod)
        meta = whole.get("metadata") if isinstance(whole, dict) else {}
    return items, str((meta if isinstance(meta, dict) else {}).get("resourceVersion", ""))


class HttpBackend:
    """The real API (a :class:`KubeBackend`): one method per operation the product needs."""

    def _request(self, method: str, path: str, query: dict[str, Any] | None = None, body: Any = None,
                 content_type: str = "application/json", read_timeout: float | None = None,
                 stream: bool = False, decode: Callable[[bytes], Any] | None = None) -> Any:
        import urllib3

        conn = _connection()
        url = conn.server + path + ("?" + urlencode({k: v for k, v in (query or {}).items() if v is not None})
                                    if query else "")
        headers = {"Accept": "application/json", "User-Agent": "istio-ebpf", **conn.auth_headers()}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = content_type
        timeout = urllib3.Timeout(connect=CONNECT_TIMEOUT, read=read_timeout or READ_TIMEOUT)
        resp = conn.pool.request(method, url, body=data, headers=headers, timeout=timeout,
                                 preload_content=not stream, redirect=False)
        if resp.status >= 300:
            text = resp.data.decode("utf-8", "replace") if not stream else resp.read().decode("utf-8", "replace")
            retry = resp.headers.get("Retry-After")
            if stream:
                resp.release_conn()
            raise ApiStatusError(resp.status, resp.reason or "", text,
                                 float(retry) if retry and retry.isdigit() else None)
        if stream:
            return resp
        if decode is not None:
            return decode(resp.data)
        return json.loads(resp.data) if resp.data else {}

    def _list(self, path: str, query: dict[str, Any]) -> tuple[list[dict], str]:
        """All pages of a list (``limit``/``continue``); items and the list's resourceVersion."""
        items: list[dict] = []
        cont = None
        while True:
            page = self._request("GET", path, {**query, "limit": PAGE_SIZE, "continue": cont})
            items.extend(page.get("items") or [])
            meta = page.get("metadata") or {}
            cont = meta.get("continue")
            if not cont:
                return items, str(meta.get("resourceVersion", ""))

    # ---- node agent
    def list_node_pods(self, node_name: str) -> tuple[list[dict], str]:
        # resourceVersion=0: served from the apiserver's watch cache (informers do the same), so a
        # relist storm after a 410 does not reach etcd.
        listed: tuple[list[dict], str] = self._request(
            "GET", "/api/v1/pods", {"fieldSelector": f"spec.nodeName={node_name}", "resourceVersion": "0"},
            decode=decode_pod_list)
        return listed

    def watch_node_pods(self, node_name: str, resource_version: str, timeout_seconds: int) -> Iterator[dict]:
        resp = self._request("GET", "/api/v1/pods", {
            "fieldSelector": f"spec.nodeName={node_name}", "watch": "1", "resourceVersion": resource_version,
            "allowWatchBookmarks": "true", "timeoutSeconds": str(timeout_seconds)},
            read_timeout=timeout_seconds + WATCH_READ_MARGIN, stream=True)
        try:
            buf = b""
            for chunk in resp.stream(65536):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)
            if buf.strip():
                yield json.loads(buf)
        finally:
            resp.release_conn()

    def patch_node_metadata(self, node_name: str, labels: dict, annotations: dict) -> dict:
        return self._request("PATCH", resource_path("v1", "Node", name=node_name), {"fieldManager": FIELD_MANAGER},
                             {"metadata": {"labels": labels, "annotations": annotations}},
                             "application/merge-patch+json")

    def create_event(self, namespace: str, involved: dict, reason: str, message: str, event_type: str,
                     component: str) -> None:
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {"apiVersion": "v1", "kind": "Event",
                "metadata": {"name": f"{involved.get('name', 'node')}.{os.urandom(6).hex()}", "namespace": namespace},
                "involvedObject": involved, "reason": reason, "message": message[:1024], "type": event_type,
                "source": {"component": component}, "reportingComponent": component,
                "firstTimestamp": now, "lastTimestamp": now, "count": 1}
        self._request("POST", resource_path("v1", "Event", namespace), {"fieldManager": FIELD_MANAGER}, body)

    def get_daemonset(self, namespace: str, name: str) -> dict | None:
        return self.get("apps/v1", "DaemonSet", namespace, name)

    # ---- installer
    def list_configmaps(self, label_selector: str) -> list[dict]:
        return self._list("/api/v1/configmaps", {"labelSelector": label_selector})[0]

    def get_configmap(self, namespace: str, name: str) -> dict | None:
        return self.get("v1", "ConfigMap", namespace, name)

    def json_patch_configmap(self, namespace: str, name: str, ops: list[dict]) -> dict:
        return self._request("PATCH", resource_path("v1", "ConfigMap", namespace, name),
                             {"fieldManager": FIELD_MANAGER}, ops, "application/json-patch+json")

    def apply(self, body: dict) -> dict:
        # Server-side apply (beta and on by default since 1.16, GA in 1.22): we own our fields only.
        meta = body.get("metadata") or {}
        path = resource_path(body["apiVersion"], body["kind"], meta.get("namespace"), meta["name"])
        return self._request("PATCH", path, {"fieldManager": FIELD_MANAGER, "force": "true"}, body,
                             "application/apply-patch+yaml")   # JSON is YAML

    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict | None:
        try:
            return self._request("GET", resource_path(api_version, kind, namespace, name))
        except ApiStatusError as exc:
            if exc.status == 404:
                return None
            raise

    def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> bool:
        try:
            self._request("DELETE", resource_path(api_version, kind, namespace, name), None,
                          {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"})
            return True
        except ApiStatusError as exc:
            if exc.status == 404:
                return False
            raise

    def list_nodes(self) -> list[dict]:
        return self._list("/api/v1/nodes", {})[0]

    def json_patch_node(self, name: str, ops: list[dict]) -> dict:
        return self._request("PATCH", resource_path("v1", "Node", name=name), {"fieldManager": FIELD_MANAGER},
                             ops, "application/json-patch+json")

    def patch_node_labels(self, name: str, labels: dict[str, str | None]) -> None:
        self._request("PATCH", resource_path("v1", "Node", name=name), {"fieldManager": FIELD_MANAGER},
                      {"metadata": {"labels": labels}}, "application/merge-patch+json")

    def list_pods(self, namespace: str, label_selector: str) -> list[dict]:
        return self._list(resource_path("v1", "Pod", namespace), {"labelSelector": label_selector or None})[0]

    def patch_pod_annotations(self, namespace: str, name: str, annotations: dict[str, str | None]) -> None:
        self._request("PATCH", resource_path("v1", "Pod", namespace, name), {"fieldManager": FIELD_MANAGER},
                      {"metadata": {"annotations": annotations}}, "application/merge-patch+json")


# ---------------------------------------------------------------------------------- the seam
_backend_override: KubeBackend | None = None
_default_backend: KubeBackend = HttpBackend()
T = TypeVar("T")


def use_backend(backend: KubeBackend | None) -> KubeBackend | None:
    """Replace the API backend (tests pass a fake; ``None`` restores the real one); returns the previous one."""
    global _backend_override
    previous, _backend_override = _backend_override, backend
    return previous


#: Older name of the same seam.
use_installer_backend = use_backend


def _backend() -> KubeBackend:
    return _backend_override if _backend_override is not None else _default_backend


def _call(what: str, operation: Callable[[KubeBackend], T]) -> T:
    try:
        return operation(_backend())
    except IstioEbpfError:
        raise
    except Exception as exc:  # ApiStatusError, urllib3, socket and SSL errors
        raise classify_api_error(exc, what) from exc


# ---------------------------------------------------------------------------------- node agent
def list_node_pods(node_name: str) -> tuple[list[dict], str]:
    """Pods bound to ``node_name`` and the list's resourceVersion."""
    return _call("list pods", lambda b: b.list_node_pods(node_name))


def watch_node_pods(node_name: str, resource_version: str, timeout_seconds: int = 300) -> Iterator[dict]:
    """Watch events ``{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": {...}}``.

    Ends when the server closes the stream (after ``timeout_seconds``). An HTTP 410 when opening
    raises :class:`ResourceGone`, a 410 inside the stream arrives as an ERROR event (code 410),
    and a stream cut mid-chunk raises :class:`TemporaryError`.
    """
    stream = _call("watch pods", lambda b: b.watch_node_pods(node_name, resource_version, timeout_seconds))
    try:
        yield from stream
    except IstioEbpfError:
        raise
    except Exception as exc:
        raise classify_api_error(exc, "watch pods") from exc
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()


def patch_node_metadata(node_name: str, labels: dict[str, str | None],
                        annotations: dict[str, str | None]) -> dict | None:
    """Merge-patch the Node's labels/annotations (``None`` deletes a key); the Node as patched."""
    return _call(f"patch node {node_name}", lambda b: b.patch_node_metadata(node_name, labels, annotations))


def create_event(namespace: str, involved: dict, reason: str, message: str,
                 event_type: str = "Normal", component: str = "istio-ebpf-agent") -> None:
    """A core/v1 Event about ``involved`` (``{"kind", "name", "namespace", "uid"}``)."""
    _call("create event", lambda b: b.create_event(namespace, involved, reason, message, event_type, component))


def get_daemonset(namespace: str, name: str) -> dict | None:
    """The DaemonSet as a dict, ``None`` when it does not exist (uninstalled)."""
    return _call(f"get daemonset {namespace}/{name}", lambda b: b.get_daemonset(namespace, name))


# ---------------------------------------------------------------------------------- installer
def list_injector_configmaps() -> list[dict]:
    """Every ``istio-sidecar-injector[-<rev>]`` ConfigMap, selected by Istio's labels, page by page."""
    items = _call("list injector configmaps", lambda b: b.list_configmaps(INJECTOR_SELECTOR))
    return [cm for cm in items
            if (name := (cm.get("metadata") or {}).get("name", "")) == INJECTOR_NAME
            or name.startswith(INJECTOR_NAME + "-")]


def get_configmap(namespace: str, name: str) -> dict | None:
    return _call(f"get configmap {namespace}/{name}", lambda b: b.get_configmap(namespace, name))


def json_patch_configmap(namespace: str, name: str, ops: list[dict]) -> dict:
    """Apply RFC 6902 ``ops``; :class:`ConcurrentEditError` when a ``test`` fails or on a conflict."""
    return _call(f"patch configmap {namespace}/{name}", lambda b: b.json_patch_configmap(namespace, name, ops))


def apply_object(body: dict) -> dict:
    meta = body.get("metadata") or {}
    return _call(f"apply {body.get('kind')} {meta.get('name')}", lambda b: b.apply(body))


def get_object(api_version: str, kind: str, namespace: str | None, name: str) -> dict | None:
    return _call(f"get {kind} {name}", lambda b: b.get(api_version, kind, namespace, name))


def delete_object(api_version: str, kind: str, namespace: str | None, name: str) -> bool:
    """Delete; ``False`` when it was already gone."""
    return _call(f"delete {kind} {name}", lambda b: b.delete(api_version, kind, namespace, name))


def list_nodes() -> list[dict]:
    return _call("list nodes", lambda b: b.list_nodes())


def label_node(name: str, labels: dict[str, str | None]) -> None:
    """Merge-patch node labels (``None`` removes one)."""
    _call(f"label node {name}", lambda b: b.patch_node_labels(name, labels))


def label_node_if_unchanged(node: dict, key: str, value: str) -> dict:
    """Set one label on the Node as read (``node``), only if its resourceVersion is still the one read:
    a JSON patch starting with a ``test`` of it, so a concurrent writer (the agent) is never overwritten.
    Raises ConcurrentEditError when the Node changed meanwhile."""
    meta = node.get("metadata") or {}
    name = meta.get("name", "")
    esc = key.replace("~", "~0").replace("/", "~1")
    ops: list[dict] = []
    if meta.get("resourceVersion"):
        ops.append({"op": "test", "path": "/metadata/resourceVersion", "value": meta["resourceVersion"]})
    if isinstance(meta.get("labels"), dict):
        ops.append({"op": "add", "path": f"/metadata/labels/{esc}", "value": value})
    else:
        ops.append({"op": "add", "path": "/metadata/labels", "value": {key: value}})
    return _call(f"label node {name}", lambda b: b.json_patch_node(name, ops))


def list_pods(namespace: str, label_selector: str) -> list[dict]:
    """Pods of ``namespace`` (``""``: every namespace) matching ``label_selector`` (``""``: all)."""
    return _call(f"list pods in {namespace or 'every namespace'}", lambda b: b.list_pods(namespace, label_selector))


def annotate_pod(namespace: str, name: str, annotations: dict[str, str | None]) -> None:
    """Merge-patch a pod's annotations (``None`` removes one)."""
    _call(f"annotate pod {namespace}/{name}", lambda b: b.patch_pod_annotations(namespace, name, annotations))
