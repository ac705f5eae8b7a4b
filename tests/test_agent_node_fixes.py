"""What running the agent as its DaemonSet pod on a real node found, each fix with its test.

* The locator under a private cgroup namespace: ``/proc/<pid>/cgroup`` reads ``0::/../../…``.
* The locator on a hybrid host: pod cgroup paths are relative to the v2 mount
  (``/sys/fs/cgroup/unified``), not ``/sys/fs/cgroup`` (pod-IP mode keys pods by that directory).
* The bpffs check of the init container: ``mountpoint -q`` is true for kubelet's bind mount.
* Scheduling and host paths of the DaemonSet.

The node e2e (tests/test_node_e2e.py) runs the same code in the real pod.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from istio_ebpf_plugin import PROJECT_ROOT
from istio_ebpf_plugin.agent.locate import PodLocator, mount_of
from istio_ebpf_plugin.harness.names import CGROUP_PREFIX, TMP_PREFIX, cgroup_v2_root, new_token

LOCATE_IN_CHILD = r"""
import json, sys
from istio_ebpf_plugin.agent.locate import PodLocator
pid, uid, mount, search = sys.argv[1:5]
raw = open(f"/proc/{pid}/cgroup").read()
loc = PodLocator("/proc", mount, search_root=search).locate(uid)
print(json.dumps({"raw": raw, "cgroup_path": loc.cgroup_path if loc else None, "pid": loc.pid if loc else None}))
"""


def _rmtree_cgroup(top: Path) -> None:
    if not top.exists():
        return
    for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        d.rmdir()
    top.rmdir()


@pytest.mark.kernel
def test_locator_resolves_paths_relative_to_a_private_cgroup_namespace():
    root = cgroup_v2_root() / f"{CGROUP_PREFIX}cgns-{new_token()}"
    kubepods = root / "kubepods"
    uid, agent_uid = str(uuid.uuid4()), str(uuid.uuid4())
    pod_dir = kubepods / "besteffort" / f"pod{uid}"
    agent_dir = kubepods / "besteffort" / f"pod{agent_uid}" / "agent"
    (pod_dir / "app").mkdir(parents=True)
    agent_dir.mkdir(parents=True)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (pod_dir / "app" / "cgroup.procs").write_text(str(sleeper.pid))
        # The locator runs in a process whose cgroup namespace is rooted at its own container's
        # cgroup, as containerd sets it up for a non-privileged container on cgroup v2.
        child = subprocess.run(
            ["unshare", "--cgroup", sys.executable, "-c", LOCATE_IN_CHILD, str(sleeper.pid), uid,
             str(cgroup_v2_root()), str(kubepods)],
            preexec_fn=lambda: (agent_dir / "cgroup.procs").write_text(str(os.getpid())),
            capture_output=True, text=True, timeout=60, cwd=PROJECT_ROOT)
        assert child.returncode == 0, child.stderr
        out = json.loads(child.stdout)
        # The kernel's own rendering: relative to the reader's namespace root.
        assert f"0::/../../pod{uid}/app" in out["raw"].splitlines()
        assert out["pid"] == sleeper.pid
        assert out["cgroup_path"] == str(pod_dir)
        # Joining the relative path onto the mount (the old behaviour) names no directory.
        assert not (cgroup_v2_root() / ".." / ".." / f"pod{uid}").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
        deadline = time.monotonic() + 10
        while True:
            try:
                _rmtree_cgroup(root)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def test_locator_paths_are_relative_to_the_v2_mount_on_a_hybrid_host(tmp_path):
    uid = "3b1f5a8e-7c2d-4e9f-8a10-5d6c7b8a9e01"
    d = tmp_path / "proc" / "77"
    (d / "ns").mkdir(parents=True)
    (d / "ns" / "net").write_text("")
    (d / "cgroup").write_text(f"3:memory:/kubepods/besteffort/pod{uid}/c1\n0::/kubepods/besteffort/pod{uid}/c1\n")
    loc = PodLocator(str(tmp_path / "proc"), "/sys/fs/cgroup/unified").locate(uid)
    assert loc.cgroup_path == f"/sys/fs/cgroup/unified/kubepods/besteffort/pod{uid}"
    # The agent derives that mount from its attach directory.
    assert mount_of(str(cgroup_v2_root() / "no-such-kubepods")) == str(cgroup_v2_root())


@pytest.mark.kernel
def test_bpffs_check_mounts_bpffs_over_a_plain_bind_mount(tmp_path):
    """In the init container /sys/fs/bpf is a bind mount of the host directory: ``mountpoint``
    says yes even without bpffs. setup.sh must look at the file system type."""
    d = Path(f"/tmp/{TMP_PREFIX}bpffs-{new_token()}")
    d.mkdir()
    try:
        script = (f"mount --make-rprivate / && mount --bind {d} {d} && "
                  f"mountpoint -q {d} && echo bind-is-a-mountpoint && "
                  f"BPFFS={d} {PROJECT_ROOT}/scripts/setup.sh host && stat -f -c %T {d}")
        out = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.split()
        assert "bind-is-a-mountpoint" in lines
        assert f"setup: mounted bpffs at {d}" in out.stdout
        assert lines[-1] == "bpf_fs"
        # Already bpffs: nothing mounted a second time.
        again = subprocess.run(["unshare", "--mount", "sh", "-c",
                                f"mount --make-rprivate / && mount -t bpf bpf {d} && "
                                f"BPFFS={d} {PROJECT_ROOT}/scripts/setup.sh host"],
                               capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and "mounted bpffs" not in again.stdout
    finally:
        d.rmdir()


def test_daemonset_is_scheduled_on_linux_amd64_and_needs_no_header_directories():
    (ds,) = [d for d in yaml.safe_load_all((PROJECT_ROOT / "manifests" / "daemonset.yaml").read_text()) if d]
    spec = ds["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}
    types = {v["hostPath"]["path"]: v["hostPath"]["type"] for v in spec["volumes"] if "hostPath" in v}
    assert types["/usr/src"] == types["/lib/modules"] == "DirectoryOrCreate"
    assert types["/sys/fs/cgroup"] == types["/proc"] == "Directory"
