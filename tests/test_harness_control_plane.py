"""The lab's real control plane: Kubernetes 1.20.2 built from Debian's source package, etcd 3.4.

These tests check the fixture itself (the e2e tests build on it): the apiserver is the real one,
RBAC is enforced for service-account tokens, and the controller-manager is running.
"""

from __future__ import annotations

import uuid

from support.polling import wait_for


def _eventually(cond, timeout: float, what: str) -> None:
    wait_for(cond, timeout, what, interval=0.3)   # conditions that ask the apiserver


def test_real_apiserver_version_and_readiness(kube_control_plane):
    cp = kube_control_plane
    status, version = cp.request("GET", "/version")
    assert status == 200 and version["gitVersion"].startswith("v1.20.2")
    assert cp.ready()
    assert cp.url.startswith("https://127.0.0.1:")          # loopback only
    assert cp.request("GET", "/api/v1/namespaces", token="not-a-token")[0] == 401


def test_controller_manager_creates_default_service_account(kube_control_plane):
    cp = kube_control_plane
    ns = f"cp-{uuid.uuid4().hex[:8]}"
    status, _ = cp.request("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                          "metadata": {"name": ns}})
    assert status == 201
    try:
        # The serviceaccount controller (kube-controller-manager) makes "default" in every namespace.
        _eventually(lambda: cp.default_service_account_ready(ns),
                    60, "the default ServiceAccount")
    finally:
        cp.request("DELETE", f"/api/v1/namespaces/{ns}")


def test_service_account_token_is_subject_to_rbac(kube_control_plane):
    cp = kube_control_plane
    ns = f"cp-{uuid.uuid4().hex[:8]}"
    assert cp.request("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                     "metadata": {"name": ns}})[0] == 201
    try:
        assert cp.request("POST", f"/api/v1/namespaces/{ns}/serviceaccounts",
                          {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "probe"}})[0] == 201
        token = cp.service_account_token(ns, "probe")
        status, body = cp.request("GET", "/api/v1/pods", token=token)
        assert status == 403 and f"system:serviceaccount:{ns}:probe" in body["message"]
        role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                "metadata": {"name": f"{ns}-pods"},
                "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]}
        binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                   "metadata": {"name": f"{ns}-pods"},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": f"{ns}-pods"},
                   "subjects": [{"kind": "ServiceAccount", "name": "probe", "namespace": ns}]}
        assert cp.request("POST", "/apis/rbac.authorization.k8s.io/v1/clusterroles", role)[0] == 201
        assert cp.request("POST", "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", binding)[0] == 201
        _eventually(lambda: cp.request("GET", "/api/v1/pods", token=token)[0] == 200, 30, "the RBAC grant")
        assert cp.request("GET", "/api/v1/nodes", token=token)[0] == 403   # only what was granted
    finally:
        cp.request("DELETE", f"/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/{ns}-pods")
        cp.request("DELETE", f"/apis/rbac.authorization.k8s.io/v1/clusterroles/{ns}-pods")
        cp.request("DELETE", f"/api/v1/namespaces/{ns}")
