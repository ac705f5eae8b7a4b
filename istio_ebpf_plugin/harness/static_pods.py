"""A fixed list of lab pods as the node agent's Kubernetes API (the lab's pod source).

The agent reads its node's pods through :class:`istio_ebpf_plugin.kube_api.KubeBackend`
(``kube_api.use_backend``). In the lab there is no control plane: the pods are the harness's own
(network namespace + cgroup + processes), and this backend lists exactly those, never changes
them (a watch ends after its timeout without an event, as a quiet API server's does), and accepts
the node label and Events the agent publishes. Installer operations are not served.
"""

from __future__ import annotations

import copy
import threading
import uuid
from typing import Any, Iterator

from ..errors import UsageError


class StaticPods:
    def __init__(self, node: str, pods: list[dict[str, Any]]) -> None:
        self.node = node
        self.pods = [copy.deepcopy(p) for p in pods]
        self.node_uid = str(uuid.uuid4())
        self.labels: dict[str, Any] = {}
        self.annotations: dict[str, Any] = {}
        self.events: list[dict[str, Any]] = []
        self._quiet = threading.Event()      # never set: a watch just waits out its timeout

    # ---- node agent
    def list_node_pods(self, node_name: str) -> tuple[list[dict], str]:
        return [copy.deepcopy(p) for p in self.pods if (p.get("spec") or {}).get("nodeName") == node_name], "1"

    def watch_node_pods(self, node_name: str, resource_version: str, timeout_seconds: int) -> Iterator[dict]:
        self._quiet.wait(timeout_seconds)
        return iter(())

    def patch_node_metadata(self, node_name: str, labels: dict, annotations: dict) -> dict:
        self.labels.update(labels)
        self.annotations.update(annotations)
        return {"metadata": {"name": node_name, "uid": self.node_uid, "labels": dict(self.labels),
                             "annotations": dict(self.annotations)}}

    def create_event(self, namespace: str, involved: dict, reason: str, message: str, event_type: str,
                     component: str) -> None:
        self.events.append({"reason": reason, "message": message, "type": event_type})

    def get_daemonset(self, namespace: str, name: str) -> dict | None:
        return {"metadata": {"name": name, "namespace": namespace}}   # installed: --if-uninstalled keeps pins

    # ---- installer: not the lab agent's business
    def _installer(self, *args: Any) -> Any:
        raise UsageError("the lab's static pod source serves the node agent only")

    def list_configmaps(self, label_selector: str) -> list[dict]:
        return self._installer()

    def get_configmap(self, namespace: str, name: str) -> dict | None:
        return self._installer()

    def json_patch_configmap(self, namespace: str, name: str, ops: list[dict]) -> dict:
        return self._installer()

    def apply(self, body: dict) -> dict:
        return self._installer()

    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict | None:
        return self._installer()

    def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> bool:
        return self._installer()

    def list_nodes(self) -> list[dict]:
        return self._installer()

    def patch_node_labels(self, name: str, labels: dict[str, str | None]) -> None:
        self._installer()

    def list_pods(self, namespace: str, label_selector: str) -> list[dict]:
        return self._installer()

    def patch_pod_annotations(self, namespace: str, name: str, annotations: dict[str, str | None]) -> None:
        self._installer()
