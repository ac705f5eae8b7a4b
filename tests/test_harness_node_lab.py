"""The node lab's runtime half: a private containerd, the locally built images, clean teardown.

The kubelet half (node registration, pods) is exercised by tests/test_node_e2e.py.
"""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from istio_ebpf_plugin import PROJECT_ROOT
from istio_ebpf_plugin.harness import node_images, node_lab

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def images() -> node_images.LabImages:
    subprocess.run(["bash", str(PROJECT_ROOT / "scripts" / "setup-node.sh")], check=True)
    if not (node_images.KUBE_SRC / node_images.PAUSE_C).exists():
        # The pause source comes with the Kubernetes source tree (the same script builds kubelet).
        subprocess.run(["bash", str(PROJECT_ROOT / "scripts" / "build-kubernetes.sh")], check=True,
                       stdout=subprocess.DEVNULL)
    return node_images.build()


def test_images_are_what_they_claim(images):
    # pause: Kubernetes' own pause.c, static, answering -v with its version like the upstream image.
    pause = images.pause.parent / "pause"
    assert "statically linked" in subprocess.run(["file", str(pause)], capture_output=True, text=True).stdout
    out = subprocess.run([str(pause), "-v"], capture_output=True, text=True)
    assert out.returncode == 0 and "pause.c" in out.stderr + out.stdout
    with tarfile.open(images.proxy) as tar:
        names = tar.getnames()
    assert "manifest.json" in names
    layer = next(n for n in names if n.endswith("layer.tar"))
    with tarfile.open(fileobj=tarfile.open(images.proxy).extractfile(layer)) as inner:
        files = set(inner.getnames())
    assert {"usr/local/bin/envoy", "usr/local/bin/pilot-agent", "etc/istio-lab/bootstrap.json"} <= files
    assert any(f.endswith("ld-linux-x86-64.so.2") for f in files)


def test_private_containerd_imports_images_and_leaves_nothing(images):
    before_sysctl = Path("/proc/sys/kernel/panic_on_oops").read_text()
    had_run_containerd = os.path.exists("/run/containerd")
    lab = node_lab.NodeLab.create(Path("/nonexistent-kubelet"), images.pause_ref)
    parent_mode = lab.workdir.parent.stat().st_mode   # e.g. /tmp's 1777: teardown must not touch it
    try:
        lab._bridge_up()
        lab._mount_namespace()
        lab._start_containerd(60)
        refs = [r for a in images.archives() for r in lab.import_image(a)]
        assert set(refs) == {images.pause_ref, images.app_ref, images.proxy_ref}
        assert {images.pause_ref, images.app_ref, images.proxy_ref} <= set(lab.images())
        # Its socket and state are under the work directory; the host's default paths stay unused.
        assert lab.socket_path.is_socket() and str(lab.socket_path).startswith(str(lab.workdir))
        # /run/containerd & co. are tmpfs inside the node's mount namespace: empty on the host.
        assert os.listdir("/run/containerd") == [] or had_run_containerd
        node_mounts = {line.split()[4]: line.split(" - ")[1].split()[0]
                       for line in Path(f"/proc/{lab.holder.pid}/mountinfo").read_text().splitlines()}
        assert all(node_mounts.get(d) == "tmpfs" for d in node_lab.PRIVATE_TMPFS)
        # Inside the node's mount namespace the kubelet sysctls are files of ours.
        shadow = lab.in_node("/proc/sys/kernel/panic_on_oops")
        assert shadow.read_text() == before_sysctl
        assert "ie-node" in Path(f"/proc/{lab.holder.pid}/mountinfo").read_text()
        assert "ie-node" not in Path("/proc/self/mountinfo").read_text()
    finally:
        lab.stop()
    assert not lab.workdir.exists()
    assert subprocess.run(["ip", "link", "show", lab.bridge], capture_output=True).returncode != 0
    assert Path("/proc/sys/kernel/panic_on_oops").read_text() == before_sysctl
    assert lab.workdir.parent.stat().st_mode == parent_mode
    assert os.path.exists("/run/containerd") == had_run_containerd
    assert not node_lab.LOCK_FILE.exists() or _unlocked(node_lab.LOCK_FILE)


def _unlocked(path: Path) -> bool:
    import fcntl

    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
    return True
