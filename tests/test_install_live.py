"""End to end against a real cluster with Istio (kind, k3s...): install, status, install again, uninstall.

Runs only when KUBECONFIG names a reachable cluster that has an istio-sidecar-injector
ConfigMap; otherwise it is skipped with the reason.
"""

from __future__ import annotations

import os

import pytest

from istio_ebpf_plugin import kube_api
from istio_ebpf_plugin.cli import main
from istio_ebpf_plugin.errors import IstioEbpfError
from istio_ebpf_plugin.install import injector_config

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def live_cluster():
    path = os.environ.get("KUBECONFIG")
    if not path or not os.path.exists(path):
        pytest.skip("KUBECONFIG is not set to an existing file: no Kubernetes cluster to test against")
    previous = kube_api.use_installer_backend(None)
    try:
        cms = kube_api.list_injector_configmaps()
    except IstioEbpfError as exc:
        pytest.skip(f"cluster in KUBECONFIG is not reachable: {exc}")
    if not cms:
        pytest.skip("cluster in KUBECONFIG has no istio-sidecar-injector ConfigMap (Istio not installed)")
    yield cms
    kube_api.use_installer_backend(previous)


def _configs() -> dict[str, str]:
    return {f"{cm['metadata']['namespace']}/{cm['metadata']['name']}": cm["data"]["config"]
            for cm in kube_api.list_injector_configmaps()}


def test_install_status_reinstall_uninstall(live_cluster):
    before = _configs()
    try:
        assert main(["install", "--timeout", "300"]) == 0
        installed = _configs()
        assert all(injector_config.is_installed(c) for c in installed.values())
        assert main(["install", "--timeout", "60"]) == 0
        assert _configs() == installed  # second install changes nothing
        assert main(["status"]) in (0, 1)
    finally:
        assert main(["uninstall"]) == 0
    assert _configs() == before
