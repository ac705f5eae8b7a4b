"""A real Kubernetes node on this machine: containerd 1.6 + runc + bridge CNI + kubelet 1.20.2.

Lab only (the node e2e test, ``make e2e``), never imported by the product.

Isolation from the host and from other tests:

* Every node process (containerd, its shims, kubelet) runs in a **private mount namespace**
  held by one ``unshare`` process. Inside it ``/`` is made rshared, as systemd does on a real
  node (the agent's ``mount-bpffs`` init container asks for Bidirectional propagation), and
  tmpfs covers ``/run/netns``, ``/run/containerd``, ``/var/log/pods``, ``/var/log/containers``
  and ``/var/lib/cni``: whatever the runtime writes there disappears with the namespace. The
  sysctls kubelet insists on setting (``kernel.panic_on_oops=1`` among them) are files bound
  over ``/proc/sys/...`` inside that namespace only: the shared host keeps its own values.
* containerd has its own config, root, state and socket under the node's work directory; its CRI
  plugin sets ``restrict_oom_score_adj`` (root may not lower oom_score_adj on this machine:
  runc otherwise fails with "can't get final child's PID from pipe: EOF").
* Pods get addresses from a bridge CNI conflist on a private /24 of a bridge this class creates
  and deletes (no masquerading, no iptables rule). kubelet runs with the cgroupfs driver and
  ``makeIPTablesUtilChains: false``.
* kube-proxy does not run: a small relay on ``10.96.0.1:443`` (the ``kubernetes`` Service
  address, on the node's bridge) forwards to the loopback apiserver, so in-cluster clients (the
  agent pod) reach the API exactly as they would through kube-proxy.

Only one node lab runs at a time on a machine (kubelet's ``kubepods`` cgroups are global): a
lock file enforces it. ``stop()`` removes everything: processes (by PID), the mount namespace,
``kubepods`` cgroups in every hierarchy, the bridge, the work directory.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..timeouts import scaled
from . import cleanup, names
from .ports import free_port
from .processes import stop as _stop_pid

LOCK_FILE = Path("/run/lock/istio-ebpf-node-lab.lock")
CGROUP_ROOT = Path("/sys/fs/cgroup")
#: kube-controller-manager controllers for a cluster with this node: nodelifecycle lifts the
#: node.kubernetes.io/not-ready taint once kubelet reports Ready.
CONTROLLERS = "*,-nodeipam,-attachdetach,-persistentvolume-binder"
SERVICE_IP = "10.96.0.1"          # first address of the control plane's service range
#: Directories the runtime and kubelet write outside their configurable roots: tmpfs in the node's
#: mount namespace, so nothing lands on the host.
PRIVATE_TMPFS = ("/run/netns", "/run/containerd", "/var/log/pods", "/var/log/containers", "/var/lib/cni",
                 "/var/lib/kubelet")   # kubelet 1.20 puts device-plugins/kubelet.sock there whatever --root-dir
#: Sysctls kubelet sets at start (setupKernelTunables): shadowed inside the node's mount namespace.
KUBELET_SYSCTLS = ("vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
                   "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes")


def claim_workdir(workdir: Path) -> None:
    """Mark a ``/tmp/istio-ebpf-test-<token>-*`` directory as in use by this process, so a
    concurrent ``harness-cleanup`` (another session) leaves it and its token's objects alone."""
    (workdir / cleanup.OWNER_FILE).write_text(f"{os.getpid()}\n")


class NodeLabError(RuntimeError):
    """The node could not be set up (message names the log to read)."""


def _run(cmd: list[str], check: bool = True, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=timeout, **kw)


def pick_subnet(token: str) -> ipaddress.IPv4Network:
    """A /24 in 10.200.0.0/13 derived from the token, avoiding every route the host has."""
    used = [ipaddress.ip_network(r["dst"], strict=False)
            for r in json.loads(_run(["ip", "-j", "route", "show", "table", "all"]).stdout or "[]")
            if r.get("dst", "default") not in ("default",) and ":" not in r.get("dst", "")]
    seed = int(token, 16)
    for i in range(2048):
        n = (seed + i * 7919) % 2048
        net = ipaddress.ip_network(f"10.{200 + n // 256}.{n % 256}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise NodeLabError("no free /24 in 10.200.0.0/13 for the node's bridge")


class TcpRelay:
    """A stand-in for kube-proxy's rule for one Service: ``listen`` -> ``target``, byte for byte."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]) -> None:
        self.target = target
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(listen)
        self.sock.listen(128)
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True, name="kubernetes-svc-relay")
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        t = threading.Thread(target=pump, args=(upstream, client), daemon=True)
        t.start()
        pump(client, upstream)
        t.join(timeout=5)
        client.close()
        upstream.close()

    def close(self) -> None:
        self._stop = True
        self.sock.close()


@dataclass
class NodeLab:
    """One node. ``start(kubeconfig, apiserver_port)`` / ``stop()``; a context manager after ``create``."""

    workdir: Path
    token: str
    node_name: str
    bridge: str
    subnet: ipaddress.IPv4Network
    kubelet_bin: Path
    pause_ref: str
    bpffs: bool = True        # False: the node starts without bpffs (the agent's init container mounts it)
    holder: subprocess.Popen | None = None
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    relay: TcpRelay | None = None
    _lock: Any = None
    _created_dirs: list[str] = field(default_factory=list)

    @classmethod
    def create(cls, kubelet_bin: Path, pause_ref: str, bpffs: bool = True) -> "NodeLab":
        token = names.new_token()
        names.created_tokens.add(token)
        workdir = Path(tempfile.mkdtemp(prefix=f"{names.TMP_PREFIX}{token}-node-", dir=names.TMP_ROOT))
        workdir.chmod(0o755)
        claim_workdir(workdir)
        return cls(workdir=workdir, token=token, node_name=f"ie-node-{token}", bridge=f"ie-br-{token}",
                   subnet=pick_subnet(token), kubelet_bin=kubelet_bin, pause_ref=pause_ref, bpffs=bpffs)

    # ------------------------------------------------------------------ paths
    @property
    def socket_path(self) -> Path:
        return self.workdir / "containerd" / "containerd.sock"

    @property
    def gateway(self) -> str:
        return str(self.subnet.network_address + 1)

    def log(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def in_node(self, path: str) -> Path:
        """A path as the node's processes see it (their private tmpfs directories included)."""
        assert self.holder is not None
        return Path(f"/proc/{self.holder.pid}/root") / path.lstrip("/")

    # ------------------------------------------------------------------ start
    def start(self, kubeconfig: Path, apiserver_port: int, timeout: float = 180.0) -> None:
        self._lock = open(LOCK_FILE, "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise NodeLabError(f"another node lab runs on this machine ({LOCK_FILE} is locked)") from None
        self._check_no_kubepods()
        self._bridge_up()
        self.relay = TcpRelay((SERVICE_IP, 443), ("127.0.0.1", apiserver_port))
        self._mount_namespace()
        self._start_containerd(timeout)
        self._start_kubelet(kubeconfig)

    def _check_no_kubepods(self) -> None:
        for h in self._hierarchies():
            if (h / "kubepods").exists():
                raise NodeLabError(f"{h / 'kubepods'} exists: another kubelet runs (or ran) on this machine")

    def _bridge_up(self) -> None:
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        _run(["ip", "addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge])
        _run(["ip", "addr", "add", f"{SERVICE_IP}/32", "dev", self.bridge])
        _run(["ip", "link", "set", self.bridge, "up"])

    def _mount_namespace(self) -> None:
        """The holder process: a private mount namespace set up like a systemd node's."""
        shadow = self.workdir / "sysctl"
        binds = []
        for name in KUBELET_SYSCTLS:
            f = shadow / name.replace("/", "_")
            shadow.mkdir(exist_ok=True)
            f.write_text(Path("/proc/sys", name).read_text())
            binds.append(f"mount --bind {f} /proc/sys/{name}")
        for d in PRIVATE_TMPFS:
            if not os.path.isdir(d):
                os.makedirs(d)
                self._created_dirs.append(d)
        # Without bpffs, pins made inside the node live in the bpffs the node mounts itself: they
        # vanish with the namespace and never meet the host's /sys/fs/bpf.
        no_bpffs = [] if self.bpffs else ["{ ! mountpoint -q /sys/fs/bpf || umount /sys/fs/bpf; }"]
        script = " && ".join(["mount --make-rprivate /", *no_bpffs, "mount --make-rshared /",
                              *(f"mount -t tmpfs -o mode=755 ie-node {d}" for d in PRIVATE_TMPFS),
                              *binds, "echo ready", "exec sleep infinity"])
        self.holder = subprocess.Popen(["unshare", "--mount", "--propagation", "unchanged", "sh", "-c", script],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       start_new_session=True)
        line = self.holder.stdout.readline() if self.holder.stdout else ""
        if line.strip() != "ready":
            err = self.holder.stderr.read() if self.holder.stderr else ""
            raise NodeLabError(f"node mount namespace set-up failed: {err.strip()[-300:]}")

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        assert self.holder is not None
        logf = open(self.log(name), "ab")
        try:
            proc = subprocess.Popen(["nsenter", f"--mount=/proc/{self.holder.pid}/ns/mnt", "--", *args],
                                    stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        finally:
            logf.close()
        self.procs[name] = proc
        return proc

    # ------------------------------------------------------------------ containerd
    def containerd_config(self) -> str:
        d = self.workdir / "containerd"
        runc_opts = f'BinaryName = "runc"\n      Root = "{d / "runc"}"\n      SystemdCgroup = false'
        return f'''version = 2
root = "{d / "root"}"
state = "{d / "state"}"
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.aufs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{self.socket_path}"
[ttrpc]
  address = "{self.socket_path}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{self.pause_ref}"
  # This machine does not let root lower oom_score_adj; the sandbox asks for -998.
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      {runc_opts}
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{self.workdir / "cni"}"
    max_conf_num = 1
'''

    def cni_conflist(self) -> dict:
        return {"cniVersion": "0.4.0", "name": f"ie-lab-{self.token}", "plugins": [
            {"type": "bridge", "bridge": self.bridge, "isGateway": True, "ipMasq": False, "hairpinMode": True,
             "ipam": {"type": "host-local", "dataDir": str(self.workdir / "cni-ipam"),
                      "ranges": [[{"subnet": str(self.subnet), "gateway": self.gateway}]],
                      "routes": [{"dst": "0.0.0.0/0"}]}}]}

    def _start_containerd(self, timeout: float) -> None:
        d = self.workdir / "containerd"
        d.mkdir(exist_ok=True)
        (d / "config.toml").write_text(self.containerd_config())
        (self.workdir / "cni").mkdir(exist_ok=True)
        (self.workdir / "cni" / "10-ie-lab.conflist").write_text(json.dumps(self.cni_conflist(), indent=1))
        proc = self._spawn("containerd", ["containerd", "--config", str(d / "config.toml"), "--log-level", "info"])
        deadline = time.monotonic() + scaled(timeout)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise NodeLabError(f"containerd exited with {proc.returncode}; see {self.log('containerd')}")
            if self.socket_path.exists() and self.ctr("version", check=False).returncode == 0:
                return
            time.sleep(0.2)
        raise NodeLabError(f"containerd not ready after {scaled(timeout):.0f}s; see {self.log('containerd')}")

    def ctr(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        """``ctr`` against this node's containerd, namespace k8s.io (the CRI's)."""
        assert self.holder is not None
        # In the node's mount namespace: unpacking mounts snapshots, which belong there.
        cmd = ["nsenter", f"--mount=/proc/{self.holder.pid}/ns/mnt", "--",
               "ctr", "--address", str(self.socket_path), "--namespace", "k8s.io", *args]
        proc = _run(cmd, check=False, timeout=timeout)
        if check and proc.returncode != 0:
            raise NodeLabError(f"ctr {' '.join(args)}: {proc.stderr.strip()[-300:]}")
        return proc

    def import_image(self, archive: Path) -> list[str]:
        """``ctr -n k8s.io images import`` a docker-archive; returns the image names it holds."""
        out = self.ctr("images", "import", str(archive)).stdout
        # "unpacking <ref> (sha256:...)...done" or "<ref> saved": the refs are what the archive names.
        refs = [line.split()[1] for line in out.splitlines() if line.startswith("unpacking ")]
        return refs or [line.split()[0] for line in out.splitlines() if line.strip()]

    def images(self) -> list[str]:
        return self.ctr("images", "ls", "-q").stdout.split()

    # ------------------------------------------------------------------ kubelet
    def kubelet_config(self) -> dict:
        return {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "cgroupDriver": "cgroupfs", "failSwapOn": False,
            "address": "127.0.0.1", "port": free_port(), "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": free_port(),
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            # No rule in the host's iptables (kubelet would add KUBE-MARK-DROP/KUBE-FIREWALL).
            "makeIPTablesUtilChains": False,
            "volumePluginDir": str(self.workdir / "kubelet" / "volume-plugins"),
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                             "nodefs.inodesFree": "1%"},
            "clusterDomain": "cluster.local", "serializeImagePulls": False,
            "syncFrequency": "5s", "fileCheckFrequency": "5s",
            "nodeStatusUpdateFrequency": "4s",
        }

    def _start_kubelet(self, kubeconfig: Path) -> None:
        k = self.workdir / "kubelet"
        (k / "volume-plugins").mkdir(parents=True, exist_ok=True)
        (k / "config.json").write_text(json.dumps(self.kubelet_config(), indent=1))
        endpoint = f"unix://{self.socket_path}"
        self._spawn("kubelet", [str(self.kubelet_bin), f"--config={k / 'config.json'}",
                                f"--kubeconfig={kubeconfig}", f"--root-dir={k / 'root'}",
                                f"--cert-dir={k / 'pki'}", f"--hostname-override={self.node_name}",
                                "--container-runtime=remote", f"--container-runtime-endpoint={endpoint}",
                                f"--image-service-endpoint={endpoint}",
                                f"--pod-infra-container-image={self.pause_ref}", "--v=2"])

    def wait_ready(self, get_node: Callable[[str], dict | None], timeout: float = 120.0) -> dict:
        """Wait for the Node object to report Ready; returns it."""
        deadline = time.monotonic() + scaled(timeout)
        last: dict | None = None
        while time.monotonic() < deadline:
            kubelet = self.procs.get("kubelet")
            if kubelet is not None and kubelet.poll() is not None:
                raise NodeLabError(f"kubelet exited with {kubelet.returncode}; see {self.log('kubelet')}")
            last = get_node(self.node_name)
            for cond in ((last or {}).get("status") or {}).get("conditions") or []:
                if cond.get("type") == "Ready" and cond.get("status") == "True":
                    return last
            time.sleep(1)
        raise NodeLabError(f"node {self.node_name} not Ready after {scaled(timeout):.0f}s; see {self.log('kubelet')}")

    # ------------------------------------------------------------------ stop
    def __enter__(self) -> "NodeLab":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _hierarchies(self) -> list[Path]:
        out = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1] in ("cgroup", "cgroup2") and fields[4].startswith(str(CGROUP_ROOT)):
                out.append(Path(fields[4]))
        return out

    def _kubepods_pids(self) -> set[int]:
        pids: set[int] = set()
        for h in self._hierarchies():
            for procs in (h / "kubepods").rglob("cgroup.procs") if (h / "kubepods").exists() else []:
                try:
                    pids.update(int(p) for p in procs.read_text().split())
                except (OSError, ValueError):
                    pass
        return pids

    def _ns_pids(self) -> set[int]:
        """Every process living in the node's mount namespace (shims included)."""
        if self.holder is None:
            return set()
        try:
            ns = os.stat(f"/proc/{self.holder.pid}/ns/mnt").st_ino
        except OSError:
            return set()
        pids = set()
        for p in os.listdir("/proc"):
            if p.isdigit() and int(p) != self.holder.pid:
                try:
                    if os.stat(f"/proc/{p}/ns/mnt").st_ino == ns:
                        pids.add(int(p))
                except OSError:
                    pass
        return pids

    def stop(self) -> None:
        """Remove everything this node created, in dependency order; safe after a partial start."""
        kubelet = self.procs.pop("kubelet", None)
        if kubelet is not None:
            _stop_pid(kubelet.pid, signal.SIGTERM, wait=15)
        # Containers (they run in their own mount namespaces, inside kubepods cgroups), then the
        # runtime and its shims (in the node's mount namespace), then the namespace holder.
        for _ in range(3):
            pids = self._kubepods_pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        containerd = self.procs.pop("containerd", None)
        if containerd is not None:
            _stop_pid(containerd.pid, signal.SIGTERM, wait=10)
        for pid in self._ns_pids():
            _stop_pid(pid, signal.SIGKILL, wait=5)
        for proc in self.procs.values():
            _stop_pid(proc.pid, signal.SIGKILL, wait=5)
        self.procs.clear()
        if self.holder is not None:
            _stop_pid(self.holder.pid, signal.SIGKILL, wait=5)
            self.holder = None
        if self.relay is not None:
            self.relay.close()
            self.relay = None
        self._remove_cgroups()
        _run(["ip", "link", "del", self.bridge], check=False)
        for d in reversed(self._created_dirs):
            try:
                os.rmdir(d)
            except OSError:
                pass
        self._created_dirs.clear()
        self._remove_workdir()
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        names.created_tokens.discard(self.token)

    def _remove_cgroups(self) -> None:
        for h in self._hierarchies():
            top = h / "kubepods"
            if not top.exists():
                continue
            dirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
            for d in [*dirs, top]:
                for _ in range(50):
                    try:
                        d.rmdir()
                        break
                    except FileNotFoundError:
                        break
                    except OSError:
                        time.sleep(0.1)

    def _remove_workdir(self) -> None:
        # Overlay and tmpfs mounts lived in the node's mount namespace (gone with it); what is
        # left is plain files, some read-only (snapshots): make them writable where needed.
        top = os.path.realpath(self.workdir)

        def onerror(func: Any, path: str, _exc: Any) -> None:
            parent = os.path.dirname(os.path.realpath(path))
            # Only directories of our own tree: never the work directory's parent (/tmp).
            if func not in (os.rmdir, os.unlink) or not (parent == top or parent.startswith(top + os.sep)):
                return
            try:
                os.chmod(parent, 0o755)
                func(path)
            except OSError:
                pass

        shutil.rmtree(self.workdir, onerror=onerror)
