"""The one module that talks to the Kubernetes API.

Everything else (installer, node agent) calls the functions here, so tests
replace the API by replacing this module's functions and nothing else.
Objects cross this boundary as plain dicts, exactly as the API serves them.
"""

# --- node agent ---
# The agent needs: its node's pods (list + watch with resourceVersion, bookmarks,
# 410 Gone), a patch of its own Node's labels/annotations, and Events.
import json as _json
import os as _os
from typing import Any as _Any, Iterator as _Iterator

from .errors import PermanentError as _PermanentError, TemporaryError as _TemporaryError


class ResourceGone(_TemporaryError):
    """The watch's resourceVersion is too old (HTTP 410): list again."""


def _core_v1() -> _Any:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config(config_file=_os.environ.get("KUBECONFIG"))
    return client.CoreV1Api()


def _classify(exc: Exception, what: str) -> Exception:
    status = getattr(exc, "status", None)
    if status == 410:
        return ResourceGone(f"{what}: resourceVersion too old (410 Gone)")
    if status in (400, 401, 403, 404, 422):
        return _PermanentError(f"{what}: HTTP {status} {getattr(exc, 'reason', '')}".strip())
    return _TemporaryError(f"{what}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")


def list_node_pods(node_name: str) -> tuple[list[dict], str]:
    """Pods bound to ``node_name`` and the list's resourceVersion."""
    try:
        resp = _core_v1().list_pod_for_all_namespaces(
            field_selector=f"spec.nodeName={node_name}", _preload_content=False)
        body = _json.loads(resp.data)
    except Exception as exc:  # kubernetes raises ApiException / urllib3 errors
        raise _classify(exc, "list pods") from None
    return body.get("items") or [], str((body.get("metadata") or {}).get("resourceVersion", ""))


def watch_node_pods(node_name: str, resource_version: str, timeout_seconds: int = 300) -> _Iterator[dict]:
    """Watch events ``{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": {...}}``.

    Ends when the server closes the stream (after ``timeout_seconds``); an
    HTTP 410 when opening raises :class:`ResourceGone`, while a 410 inside the
    stream arrives as an ERROR event whose object is a Status with code 410.
    """
    try:
        resp = _core_v1().list_pod_for_all_namespaces(
            field_selector=f"spec.nodeName={node_name}", resource_version=resource_version,
            watch=True, allow_watch_bookmarks=True, timeout_seconds=timeout_seconds,
            _preload_content=False)
    except Exception as exc:
        raise _classify(exc, "watch pods") from None
    try:
        for line in resp:
            line = line.strip()
            if line:
                yield _json.loads(line)
    finally:
        resp.release_conn()


def patch_node_metadata(node_name: str, labels: dict[str, str | None],
                        annotations: dict[str, str | None]) -> None:
    """Merge-patch the Node's labels/annotations (``None`` deletes a key)."""
    body = {"metadata": {"labels": labels, "annotations": annotations}}
    try:
        _core_v1().patch_node(node_name, body)
    except Exception as exc:
        raise _classify(exc, f"patch node {node_name}") from None


def create_event(namespace: str, involved: dict, reason: str, message: str,
                 event_type: str = "Normal", component: str = "istio-ebpf-agent") -> None:
    """A core/v1 Event about ``involved`` (``{"kind","name","namespace","uid"}``)."""
    import datetime

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    name = f"{involved.get('name', 'node')}.{_os.urandom(6).hex()}"
    body = {"apiVersion": "v1", "kind": "Event",
            "metadata": {"name": name, "namespace": namespace},
            "involvedObject": involved, "reason": reason, "message": message[:1024],
            "type": event_type, "source": {"component": component},
            "firstTimestamp": now, "lastTimestamp": now, "count": 1}
    try:
        _core_v1().create_namespaced_event(namespace, body)
    except Exception as exc:
        raise _classify(exc, "create event") from None

def get_daemonset(namespace: str, name: str) -> dict | None:
    """The DaemonSet as a dict, ``None`` when it does not exist (uninstalled)."""
    try:
        from kubernetes import client

        _core_v1()  # loads the configuration
        resp = client.AppsV1Api().read_namespaced_daemon_set(name, namespace, _preload_content=False)
        return _json.loads(resp.data)
    except Exception as exc:
        if getattr(exc, "status", None) == 404:
            return None
        raise _classify(exc, f"get daemonset {namespace}/{name}") from None
# --- end node agent ---


# --- installer ---
# `istio-ebpf install/uninstall/status` need: injector ConfigMaps (list, get, JSON
# patch), a backup ConfigMap, Nodes (list, label), and the agent's objects
# (server-side apply, get, delete). Calls go through one backend object so
# unit tests swap the whole API here with use_installer_backend(fake).

INSTALLER_FIELD_MANAGER = "istio-ebpf"


class ConcurrentEditError(_TemporaryError):
    """A JSON patch's ``test`` operation failed: someone changed the object meanwhile."""


def classify_api_error(exc: Exception, what: str) -> Exception:
    """kopf-style: PermanentError (retrying cannot help) or TemporaryError (retry later)."""
    if isinstance(exc, (_PermanentError, _TemporaryError)):
        return exc
    status = getattr(exc, "status", None)
    body = str(getattr(exc, "body", "") or "")
    reason = str(getattr(exc, "reason", "") or "")
    if status == 422 and "test" in body.lower() and "fail" in body.lower():
        return ConcurrentEditError(f"{what}: changed concurrently (JSON patch test failed)")
    if status in (409,):
        return _TemporaryError(f"{what}: HTTP 409 conflict")
    if status in (429, 500, 502, 503, 504):
        return _TemporaryError(f"{what}: HTTP {status} {reason}".strip(), delay=2.0)
    if isinstance(status, int) and 400 <= status < 500:
        msg = ""
        try:
            msg = _json.loads(body).get("message", "")
        except (ValueError, AttributeError):
            msg = ""
        return _PermanentError(f"{what}: HTTP {status} {reason}{': ' + msg if msg else ''}".strip())
    first = str(exc).splitlines()[0] if str(exc) else ""
    return _TemporaryError(f"{what}: {type(exc).__name__}: {first}".rstrip(": "))


class _KubernetesInstaller:
    """The real backend: the kubernetes client, in-cluster config first, then kubeconfig."""

    def __init__(self) -> None:
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            try:
                config.load_kube_config(config_file=_os.environ.get("KUBECONFIG"))
            except (config.ConfigException, OSError, TypeError) as exc:
                raise _PermanentError(f"no Kubernetes configuration (in-cluster or kubeconfig): {exc}") from None
        self.api = client.ApiClient()
        self.core = client.CoreV1Api(self.api)

    def _json(self, resp: _Any) -> _Any:
        return _json.loads(resp.data)

    def list_configmaps(self) -> list[dict]:
        return self._json(self.core.list_config_map_for_all_namespaces(_preload_content=False)).get("items") or []

    def get_configmap(self, namespace: str, name: str) -> dict | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self._json(self.core.read_namespaced_config_map(name, namespace, _preload_content=False))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def json_patch_configmap(self, namespace: str, name: str, ops: list[dict]) -> dict:
        # A list body makes the client send application/json-patch+json.
        return self._json(self.core.patch_namespaced_config_map(name, namespace, ops, _preload_content=False))

    def apply(self, body: dict) -> dict:
        from kubernetes.dynamic import DynamicClient

        dyn = DynamicClient(self.api)
        res = dyn.resources.get(api_version=body["apiVersion"], kind=body["kind"])
        ns = (body.get("metadata") or {}).get("namespace") if res.namespaced else None
        out = dyn.server_side_apply(res, body=body, namespace=ns, field_manager=INSTALLER_FIELD_MANAGER,
                                    force_conflicts=True)
        return out.to_dict()

    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict | None:
        from kubernetes.dynamic import DynamicClient
        from kubernetes.dynamic.exceptions import NotFoundError

        dyn = DynamicClient(self.api)
        res = dyn.resources.get(api_version=api_version, kind=kind)
        try:
            return dyn.get(res, name=name, namespace=namespace if res.namespaced else None).to_dict()
        except NotFoundError:
            return None

    def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> bool:
        from kubernetes.dynamic import DynamicClient
        from kubernetes.dynamic.exceptions import NotFoundError

        dyn = DynamicClient(self.api)
        res = dyn.resources.get(api_version=api_version, kind=kind)
        try:
            dyn.delete(res, name=name, namespace=namespace if res.namespaced else None)
            return True
        except NotFoundError:
            return False

    def list_nodes(self) -> list[dict]:
        return self._json(self.core.list_node(_preload_content=False)).get("items") or []

    def patch_node_labels(self, name: str, labels: dict[str, str | None]) -> None:
        self.core.patch_node(name, {"metadata": {"labels": labels}})


_installer_backend: _Any = None


def use_installer_backend(backend: _Any) -> _Any:
    """Replace the installer's API backend (tests pass a fake); returns the previous one."""
    global _installer_backend
    previous, _installer_backend = _installer_backend, backend
    return previous


def _installer() -> _Any:
    global _installer_backend
    if _installer_backend is None:
        try:
            _installer_backend = _KubernetesInstaller()
        except ImportError as exc:  # pragma: no cover - kubernetes is a dependency
            raise _PermanentError(f"the kubernetes client is not installed: {exc}") from None
    return _installer_backend


def _call(what: str, fn: str, *args: _Any) -> _Any:
    backend = _installer()
    try:
        return getattr(backend, fn)(*args)
    except (_PermanentError, _TemporaryError):
        raise
    except Exception as exc:  # ApiException, urllib3 and socket errors
        raise classify_api_error(exc, what) from None


def list_injector_configmaps() -> list[dict]:
    """Every ``istio-sidecar-injector[-<rev>]`` ConfigMap in the cluster."""
    items = _call("list configmaps", "list_configmaps")
    out = []
    for cm in items:
        name = (cm.get("metadata") or {}).get("name", "")
        if name == "istio-sidecar-injector" or name.startswith("istio-sidecar-injector-"):
            out.append(cm)
    return out


def get_configmap(namespace: str, name: str) -> dict | None:
    return _call(f"get configmap {namespace}/{name}", "get_configmap", namespace, name)


def json_patch_configmap(namespace: str, name: str, ops: list[dict]) -> dict:
    """Apply RFC 6902 ``ops``; :class:`ConcurrentEditError` when a ``test`` fails."""
    return _call(f"patch configmap {namespace}/{name}", "json_patch_configmap", namespace, name, ops)


def apply_object(body: dict) -> dict:
    meta = body.get("metadata") or {}
    return _call(f"apply {body.get('kind')} {meta.get('name')}", "apply", body)


def get_object(api_version: str, kind: str, namespace: str | None, name: str) -> dict | None:
    return _call(f"get {kind} {name}", "get", api_version, kind, namespace, name)


def delete_object(api_version: str, kind: str, namespace: str | None, name: str) -> bool:
    """Delete; ``False`` when it was already gone."""
    return _call(f"delete {kind} {name}", "delete", api_version, kind, namespace, name)


def list_nodes() -> list[dict]:
    return _call("list nodes", "list_nodes")


def label_node(name: str, labels: dict[str, str | None]) -> None:
    """Merge-patch node labels (``None`` removes one)."""
    _call(f"label node {name}", "patch_node_labels", name, labels)
# --- end installer ---
