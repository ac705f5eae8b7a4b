"""A stand-in for the Kubernetes API, used by tests, the soak test and local runs.

It is a whole :class:`istio_ebpf_plugin.kube_api.KubeBackend` (``install()`` or
``kube_api.use_backend``; mypy checks that it conforms). For the node agent it keeps pods in
memory with increasing resourceVersions and streams watch events like the API server does:
events after a given resourceVersion, bookmarks on demand, and ``ERROR 410`` when the watcher
asks for a resourceVersion that was compacted. For the installer it keeps injector ConfigMaps
(real JSON-patch semantics: a failed ``test`` op answers 422), nodes with kernels, and applied
objects (a DaemonSet rolls out at once: no kubelet here).

Pods come from the real injected fixtures (:func:`fixture_pod`).

The same flows run against a real kube-apiserver in test_agent_kube_e2e.py. This fake stays
where a test needs what the real server cannot give on demand: a BOOKMARK or an in-stream
ERROR 410 at a chosen moment, a failing node patch, and agents in many short-lived
processes (kernel, fault and scale tests) without a control plane each.
"""

from __future__ import annotations

import copy
import json
import queue
import threading
import time
import uuid
from typing import Any, Callable, Iterator

import jsonpatch
import yaml

from .istio_fixtures import FIXTURES
from istio_ebpf_plugin import kube_api
from istio_ebpf_plugin.agent.pod_spec import pod_from_manifest



def fixture_pod(relpath: str, name: str, node: str, ips: list[str], uid: str | None = None,
                namespace: str = "default", annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """A running Pod built from an injected fixture (``master/inject/hello.yaml.injected``)."""
    doc = next(d for d in yaml.safe_load_all((FIXTURES / relpath).read_text()) if d)
    pod = pod_from_manifest(doc)
    meta = pod["metadata"]
    meta.update(name=name, namespace=namespace, uid=uid or str(uuid.uuid4()))
    meta["annotations"] = {**(meta.get("annotations") or {}), **(annotations or {})}
    pod["spec"]["nodeName"] = node
    pod["status"] = {"phase": "Running", "podIP": ips[0] if ips else None,
                     "podIPs": [{"ip": ip} for ip in ips]}
    return pod


def _node(name: str, kernel: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "uid": str(uuid.uuid4()), "labels": {}, "annotations": {}},
            "status": {"nodeInfo": {"kernelVersion": kernel}}}


class FakeKube:
    def __init__(self, node: str = "node-a", configs: dict[str, str] | None = None,
                 kernels: dict[str, str] | None = None) -> None:
        """``node``: the agent's node; ``configs``: injector ConfigMap name -> its ``config``
        (istio-system); ``kernels``: the cluster's node names -> kernel versions."""
        self.node = node
        self.rv = 100
        self.pods: dict[str, dict[str, Any]] = {}              # uid -> pod
        self.history: list[dict[str, Any]] = []               # watch events, each with its rv
        self.compacted_below = 0                              # rvs below this answer 410
        self.events: list[dict[str, Any]] = []
        self.daemonset: dict[str, Any] | None = {"metadata": {"name": "istio-ebpf-agent"}}
        self.list_calls = 0
        self.watch_calls: list[str] = []                      # resourceVersions watched from
        self._wakeup = threading.Condition()
        self._injected: "queue.Queue[dict[str, Any]]" = queue.Queue()  # raw events (BOOKMARK, ERROR)
        self.fail_patch = 0                                   # next N patches fail (TemporaryError)
        # installer side
        self.configmaps: dict[tuple[str, str], dict[str, Any]] = {("istio-system", name): {
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": "istio-system", "resourceVersion": "1",
                         "labels": {"operator.istio.io/component": "Pilot", "istio.io/rev": "default"}},
            "data": {"config": cfg, "values": "{}"}} for name, cfg in (configs or {}).items()}
        self.nodes = {n: _node(n, k) for n, k in (kernels or {node: "6.1.0-18-amd64"}).items()}
        self.objects: dict[tuple[str, str, str, str], dict[str, Any]] = {}
        self.patches: list[tuple[str, list]] = []
        #: run once before the next ConfigMap patch is applied (a concurrent editor)
        self.before_patch: Callable[[FakeKube], None] | None = None

    def _agent_node(self) -> dict[str, Any]:
        return self.nodes.setdefault(self.node, _node(self.node, ""))

    @property
    def node_uid(self) -> str:
        return self._agent_node()["metadata"]["uid"]

    @property
    def node_labels(self) -> dict[str, str]:
        return self._agent_node()["metadata"]["labels"]

    @property
    def node_annotations(self) -> dict[str, str]:
        return self._agent_node()["metadata"]["annotations"]

    # ------------------------------------------------------------------ install
    def install(self, monkeypatch: Any) -> "FakeKube":
        """Be kube_api's backend for one test (its one seam; monkeypatch restores the real one)."""
        backend: kube_api.KubeBackend = self     # mypy: the fake is the whole seam
        monkeypatch.setattr(kube_api, "_backend_override", backend)
        return self

    # ------------------------------------------------------------------ mutations (the "cluster")
    def _bump(self, etype: str, pod: dict[str, Any]) -> None:
        with self._wakeup:
            self.rv += 1
            pod["metadata"]["resourceVersion"] = str(self.rv)
            self.history.append({"type": etype, "object": copy.deepcopy(pod), "rv": self.rv})
            self._wakeup.notify_all()

    def add(self, pod: dict[str, Any]) -> dict[str, Any]:
        self.pods[pod["metadata"]["uid"]] = pod
        self._bump("ADDED", pod)
        return pod

    def modify(self, uid: str, annotations: dict[str, str | None] | None = None,
               ips: list[str] | None = None, status: dict[str, Any] | None = None) -> dict[str, Any]:
        """Change a pod (``status``: fields merged into its status, as kubelet writes them)."""
        pod = self.pods[uid]
        pod["status"].update(status or {})
        ann = pod["metadata"].setdefault("annotations", {})
        for k, v in (annotations or {}).items():
            if v is None:
                ann.pop(k, None)
            else:
                ann[k] = v
        if ips is not None:
            pod["status"]["podIPs"] = [{"ip": ip} for ip in ips]
            pod["status"]["podIP"] = ips[0] if ips else None
        self._bump("MODIFIED", pod)
        return pod

    def delete_pod(self, uid: str) -> None:
        pod = self.pods.pop(uid)
        self._bump("DELETED", pod)

    def bookmark(self) -> None:
        with self._wakeup:
            self.rv += 1
            self._injected.put({"type": "BOOKMARK", "object": {
                "kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": str(self.rv)}}})
            self._wakeup.notify_all()

    def expire(self) -> None:
        """Compact history: open watches get ERROR 410, as after an etcd compaction."""
        with self._wakeup:
            self.compacted_below = self.rv + 1
            self._injected.put({"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Expired",
                "message": "too old resource version", "code": 410}})
            self._wakeup.notify_all()

    # ------------------------------------------------------------------ kube_api surface: node agent
    def list_node_pods(self, node_name: str) -> tuple[list[dict], str]:
        self.list_calls += 1
        with self._wakeup:
            items = [copy.deepcopy(p) for p in self.pods.values()
                     if p["spec"].get("nodeName") == node_name]
            return items, str(self.rv)

    def watch_node_pods(self, node_name: str, resource_version: str, timeout_seconds: int = 300) -> Iterator[dict]:
        self.watch_calls.append(resource_version)
        start_rv = int(resource_version or 0)
        if start_rv < self.compacted_below - 1:
            raise kube_api.ResourceGone("watch: too old resource version (410)")
        sent = start_rv
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            with self._wakeup:
                pending = [e for e in self.history if e["rv"] > sent]
                if not pending and self._injected.empty():
                    self._wakeup.wait(timeout=min(0.1, max(0.0, deadline - time.monotonic())))
                    continue
            for e in pending:
                sent = e["rv"]
                if e["object"]["spec"].get("nodeName") == node_name:
                    yield {"type": e["type"], "object": copy.deepcopy(e["object"])}
            while not self._injected.empty():
                yield self._injected.get_nowait()

    def patch_node_metadata(self, node_name: str, labels: dict, annotations: dict) -> dict:
        if self.fail_patch:
            self.fail_patch -= 1
            from istio_ebpf_plugin.errors import TemporaryError
            raise TemporaryError("patch node: connection refused")
        for target, values in ((self.node_labels, labels), (self.node_annotations, annotations)):
            for k, v in values.items():
                if v is None:
                    target.pop(k, None)
                else:
                    target[k] = v
        return {"metadata": {"name": node_name, "uid": self.node_uid, "labels": dict(self.node_labels),
                             "annotations": dict(self.node_annotations)}}

    def create_event(self, namespace: str, involved: dict, reason: str, message: str,
                     event_type: str = "Normal", component: str = "istio-ebpf-agent") -> None:
        self.events.append({"namespace": namespace, "involvedObject": involved, "reason": reason,
                            "message": message, "type": event_type})

    def get_daemonset(self, namespace: str, name: str) -> dict | None:
        return self.daemonset

    # ------------------------------------------------------------------ kube_api surface: installer
    def list_configmaps(self, label_selector: str) -> list[dict]:
        assert label_selector == kube_api.INJECTOR_SELECTOR
        return [copy.deepcopy(c) for c in self.configmaps.values()]

    def get_configmap(self, namespace: str, name: str) -> dict | None:
        return copy.deepcopy(self.configmaps.get((namespace, name)))

    def json_patch_configmap(self, namespace: str, name: str, ops: list[dict]) -> dict:
        if self.before_patch:
            hook, self.before_patch = self.before_patch, None
            hook(self)
        cm = self.configmaps[(namespace, name)]
        try:
            new = jsonpatch.JsonPatch(ops).apply(cm)
        except jsonpatch.JsonPatchTestFailed as exc:
            raise kube_api.ApiStatusError(422, "Unprocessable Entity", json.dumps(
                {"message": f"testing value failed: test failed: {exc}"})) from exc
        new["metadata"]["resourceVersion"] = str(int(cm["metadata"]["resourceVersion"]) + 1)
        self.configmaps[(namespace, name)] = new
        self.patches.append((name, ops))
        return copy.deepcopy(new)

    @staticmethod
    def _key(api_version: str, kind: str, namespace: str | None, name: str) -> tuple[str, str, str, str]:
        return (api_version, kind, namespace or "", name)

    def apply(self, body: dict) -> dict:
        meta = body["metadata"]
        obj = copy.deepcopy(body)
        if body["kind"] == "DaemonSet":
            obj["metadata"]["generation"] = 1
            obj["status"] = {"observedGeneration": 1, "desiredNumberScheduled": len(self.nodes),
                             "updatedNumberScheduled": len(self.nodes), "numberAvailable": len(self.nodes)}
        self.objects[self._key(body["apiVersion"], body["kind"], meta.get("namespace"), meta["name"])] = obj
        return copy.deepcopy(obj)

    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict | None:
        return copy.deepcopy(self.objects.get(self._key(api_version, kind, namespace, name)))

    def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> bool:
        return self.objects.pop(self._key(api_version, kind, namespace, name), None) is not None

    def list_nodes(self) -> list[dict]:
        return [copy.deepcopy(n) for n in self.nodes.values()]

    def list_pods(self, namespace: str, label_selector: str) -> list[dict]:
        return []   # no kubelet here: a DaemonSet never has pods

    def patch_pod_annotations(self, namespace: str, name: str, annotations: dict[str, str | None]) -> None:
        raise kube_api.ApiStatusError(404, "Not Found", "{}")   # the installer's pods: none here

    def json_patch_node(self, name: str, ops: list[dict]) -> dict:
        node = self.nodes[name]
        try:
            new = jsonpatch.JsonPatch(ops).apply(node)
        except jsonpatch.JsonPatchTestFailed as exc:
            raise kube_api.ApiStatusError(422, "Unprocessable Entity", json.dumps(
                {"message": f"testing value failed: test failed: {exc}"})) from exc
        rv = str((node.get("metadata") or {}).get("resourceVersion") or "0")
        new["metadata"]["resourceVersion"] = str(int(rv) + 1) if rv.isdigit() else rv
        self.nodes[name] = new
        return copy.deepcopy(new)

    def patch_node_labels(self, name: str, labels: dict[str, str | None]) -> None:
        current = self.nodes[name]["metadata"]["labels"]
        for k, v in labels.items():
            if v is None:
                current.pop(k, None)
            else:
                current[k] = v
