"""A local "node": pods made of a network namespace plus a cgroup v2 directory.

Topology (all inside namespaces this module creates; nothing touches the host netns)::

    netns ie-<tok>-node : bridge br0 10.244.0.1/24, fd00:1e::1/64
        veth vh<i>  <->  eth0 in netns ie-<tok>-<pod>   (10.244.0.<i+1>/24, fd00:1e::<i+1>/64)

    cgroup <cgroup v2 root>/istio-ebpf-test-<tok>/            <- Node.parent_cgroup (attach BPF here)
                                             /<pod>/           <- Pod.cgroup_path

Processes are started through ``sh`` (writes its own pid to the pod's ``cgroup.procs``)
then ``nsenter --net`` (enters the pod netns, then drops to the requested uid/gid and
clears supplementary groups) then ``exec`` of the command, so cgroup membership is in
place before the command runs and no ``ip netns exec`` /sys remount is involved.
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import shutil
import signal
import subprocess
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import KernelError, UsageError
from . import names

if TYPE_CHECKING:  # pragma: no cover
    from ..datapath.podconfig import PodConfig
    from .envoy import Envoy

IPV4_PREFIX = "10.244.0."
IPV6_PREFIX = "fd00:1e::"
BRIDGE = "br0"
MAX_PODS = 200

#: Sysctls set in every pod netns (connection churn must not stall in TIME_WAIT).
POD_SYSCTLS = {
    "net.ipv4.tcp_tw_reuse": "1",
    "net.ipv4.ip_local_port_range": "20000 64999",
    "net.ipv4.ip_unprivileged_port_start": "0",    # probe/target servers on port 53 as non-root
    "net.ipv6.conf.all.accept_dad": "0",
    "net.ipv6.conf.default.accept_dad": "0",
    "net.core.somaxconn": "4096",
}
NODE_SYSCTLS = {
    "net.ipv6.conf.all.accept_dad": "0",
    "net.ipv6.conf.default.accept_dad": "0",
    "net.ipv4.ip_forward": "1",
    "net.ipv6.conf.all.forwarding": "1",
}

_LAUNCH = 'echo $$ > "$1" || exit 126; n="$2"; shift 2; exec nsenter --net="$n" "$@"'

_live_nodes: "weakref.WeakSet[Node]" = weakref.WeakSet()
_hooks_installed = False
_hooks_lock = threading.Lock()


def _sh(argv: Sequence[str], *, check: bool = True, timeout: float = 30,
        input: str | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise KernelError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def _close_all_nodes() -> None:
    for node in list(_live_nodes):
        node.close()


def _install_exit_hooks() -> None:
    """atexit + SIGTERM/SIGHUP: tear down every live Node before the interpreter goes."""
    global _hooks_installed
    with _hooks_lock:
        if _hooks_installed:
            return
        _hooks_installed = True
    atexit.register(_close_all_nodes)
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        previous = signal.getsignal(sig)
        if previous not in (signal.SIG_DFL, None):
            continue  # someone else owns it; atexit still runs on a normal exit

        def handler(signum: int, _frame: Any, _sig: signal.Signals = sig) -> None:
            _close_all_nodes()
            signal.signal(_sig, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

        signal.signal(sig, handler)


@dataclass(eq=False)
class Pod:
    """One pod: a network namespace and a cgroup v2 directory of its :class:`Node`."""

    node: "Node"
    name: str
    index: int
    netns: str
    cgroup_path: Path
    ipv4: str
    ipv6: str
    workdir: Path
    envoys: list = field(default_factory=list)

    @property
    def netns_path(self) -> str:
        return str(names.NETNS_DIR / self.netns)

    @property
    def pod_ips(self) -> tuple[str, str]:
        return (self.ipv4, self.ipv6)

    # -- processes -------------------------------------------------------------
    def launch_argv(self, argv: Sequence[str], uid: int | None = None, gid: int | None = None) -> list[str]:
        """argv that runs ``argv`` in this pod's cgroup and netns as uid/gid."""
        if not argv:
            raise UsageError("empty command")
        creds: list[str] = []
        if uid is not None:
            creds += ["-S", str(uid)]
        if gid is not None or uid is not None:
            creds += ["-G", str(gid if gid is not None else uid)]
        return ["sh", "-c", _LAUNCH, "sh", str(self.cgroup_path / "cgroup.procs"), self.netns_path,
                *creds, "--", *[str(a) for a in argv]]

    def spawn(self, argv: Sequence[str], uid: int | None = None, gid: int | None = None,
              **popen_kwargs: Any) -> subprocess.Popen:
        """Start ``argv`` in the pod (cgroup first, then netns, then uid/gid). Killed at teardown."""
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self.launch_argv(argv, uid, gid), **popen_kwargs)
        self.node._processes.append(proc)
        return proc

    def run(self, argv: Sequence[str], uid: int | None = None, gid: int | None = None,
            timeout: float = 30, check: bool = False, input: str | None = None) -> subprocess.CompletedProcess:
        """Run ``argv`` in the pod and wait; stdout/stderr captured as text."""
        proc = subprocess.run(self.launch_argv(argv, uid, gid), capture_output=True, text=True,
                              timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise KernelError(f"{self.name}: {' '.join(map(str, argv))} failed ({proc.returncode}): "
                              f"{proc.stderr.strip()}")
        return proc

    def ns_exec(self, argv: Sequence[str], *, check: bool = True, input: str | None = None,
                timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a root tool (ip, iptables, sysctl) in the pod netns, outside the pod cgroup."""
        return _sh(["nsenter", f"--net={self.netns_path}", "--", *argv], check=check, input=input,
                   timeout=timeout)

    # -- sidecar and capture ---------------------------------------------------
    def start_envoy(self, **kwargs: Any) -> "Envoy":
        """Start a real Envoy sidecar (UID/GID 1337) in this pod; see :func:`.envoy.start_envoy`."""
        from .envoy import start_envoy
        env = start_envoy(self, **kwargs)
        self.envoys.append(env)
        return env

    def apply_istio_iptables(self, podconfig: "PodConfig", *, ipv6: bool = True) -> None:
        """Load Istio's rules for ``podconfig`` into this pod's netns (iptables-restore)."""
        from .istio_iptables import apply_to_pod
        apply_to_pod(self, podconfig, ipv6=ipv6)

    def flush_iptables(self) -> None:
        from .istio_iptables import flush_pod
        flush_pod(self)

    def iptables_rule_count(self) -> int:
        """Number of ``-A`` rules in nat, mangle and raw, IPv4 plus IPv6."""
        from .istio_iptables import count_rules
        return count_rules(self)

    # -- accounting --------------------------------------------------------------
    def cpu_usage_usec(self) -> int:
        """``usage_usec`` of the pod cgroup (all processes of the pod, Envoy included)."""
        for line in (self.cgroup_path / "cpu.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value)
        raise KernelError(f"{self.cgroup_path}/cpu.stat has no usage_usec")

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.cgroup_path / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            return []


class Node:
    """Creates pods; ``with Node() as node`` removes everything on exit, even on errors."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token or names.new_token()
        names.created_tokens.add(self.token)
        self.netns = f"{names.NETNS_PREFIX}{self.token}-node"
        self.parent_cgroup = names.cgroup_v2_root() / f"{names.CGROUP_PREFIX}{self.token}"
        self.workdir = names.TMP_ROOT / f"{names.TMP_PREFIX}{self.token}"
        self.pods: dict[str, Pod] = {}
        self._processes: list[subprocess.Popen] = []
        self._started = False
        self._closed = False
        self._lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------
    def __enter__(self) -> "Node":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def netns_path(self) -> str:
        return str(names.NETNS_DIR / self.netns)

    def start(self) -> "Node":
        if os.geteuid() != 0:
            raise KernelError("the pod harness needs root (network namespaces, cgroups)")
        _install_exit_hooks()
        _live_nodes.add(self)
        self._started = True
        try:
            self.workdir.mkdir(mode=0o755)
            os.chmod(self.workdir, 0o755)  # Envoy (UID 1337) must read its bootstrap
            (self.workdir / "owner.pid").write_text(f"{os.getpid()}\n")  # harness-cleanup spares live runs
            self.parent_cgroup.mkdir()
            _sh(["ip", "netns", "add", self.netns])
            self._node_exec(["ip", "link", "set", "lo", "up"])
            self._sysctl_node(NODE_SYSCTLS)
            self._node_exec(["ip", "link", "add", BRIDGE, "type", "bridge"])
            self._node_exec(["ip", "addr", "add", f"{IPV4_PREFIX}1/24", "dev", BRIDGE])
            self._node_exec(["ip", "-6", "addr", "add", f"{IPV6_PREFIX}1/64", "dev", BRIDGE, "nodad"])
            self._node_exec(["ip", "link", "set", BRIDGE, "up"])
        except BaseException:
            self.close()
            raise
        return self

    def _node_exec(self, argv: Sequence[str]) -> subprocess.CompletedProcess:
        return _sh(["nsenter", f"--net={self.netns_path}", "--", *argv])

    def _sysctl_node(self, values: dict[str, str]) -> None:
        self._node_exec(["sysctl", "-q", "-w", *[f"{k}={v}" for k, v in values.items()]])

    def add_pod(self, name: str, group: str | None = None) -> Pod:
        """Create pod ``name`` (letters, digits, '-'; at most 8 chars to fit interface names).

        ``group`` puts the pod cgroup under ``parent_cgroup/<group>/`` so different capture
        mechanisms can be attached to different sets of pods (see :meth:`group_cgroup`).
        """
        if not self._started or self._closed:
            raise UsageError("Node is not running (use `with Node() as node:`)")
        if not name or len(name) > 8 or not all(c.isalnum() or c == "-" for c in name):
            raise UsageError(f"bad pod name {name!r}: 1-8 letters, digits or '-'")
        if name in self.pods:
            raise UsageError(f"pod {name!r} exists")
        if name == "node":
            raise UsageError("pod name 'node' is reserved")
        index = len(self.pods) + 1
        if index > MAX_PODS:
            raise UsageError(f"at most {MAX_PODS} pods per node")
        ipv4 = f"{IPV4_PREFIX}{index + 1}"
        ipv6 = str(ipaddress.ip_address(f"{IPV6_PREFIX}{index + 1:x}"))
        if group is not None and (not group.isalnum() or group in self.pods):
            raise UsageError(f"bad pod group {group!r}: letters and digits, not a pod name")
        cgroup_dir = self.group_cgroup(group) if group else self.parent_cgroup
        pod = Pod(node=self, name=name, index=index, netns=f"{names.NETNS_PREFIX}{self.token}-{name}",
                  cgroup_path=cgroup_dir / name, ipv4=ipv4, ipv6=ipv6,
                  workdir=self.workdir / name)
        self.pods[name] = pod  # registered first so close() removes a half-built pod
        pod.workdir.mkdir(mode=0o755)
        os.chmod(pod.workdir, 0o755)
        pod.cgroup_path.mkdir()
        _sh(["ip", "netns", "add", pod.netns])
        pod.ns_exec(["sysctl", "-q", "-w", *[f"{k}={v}" for k, v in POD_SYSCTLS.items()]])
        host_if = f"vh{index}"
        self._node_exec(["ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0",
                         "netns", pod.netns_path])
        self._node_exec(["ip", "link", "set", host_if, "master", BRIDGE])
        self._node_exec(["ip", "link", "set", host_if, "up"])
        for argv in (["ip", "link", "set", "lo", "up"],
                     # Istio's inbound passthrough source for IPv6 (istio-iptables adds it too).
                     ["ip", "-6", "addr", "add", "::6/128", "dev", "lo", "nodad"],
                     ["ip", "addr", "add", f"{ipv4}/24", "dev", "eth0"],
                     ["ip", "-6", "addr", "add", f"{ipv6}/64", "dev", "eth0", "nodad"],
                     ["ip", "link", "set", "eth0", "up"],
                     ["ip", "route", "add", "default", "via", f"{IPV4_PREFIX}1"],
                     ["ip", "-6", "route", "add", "default", "via", f"{IPV6_PREFIX}1"]):
            pod.ns_exec(argv)
        return pod

    def group_cgroup(self, group: str) -> Path:
        """``parent_cgroup/<group>`` (created on first use): attach a datapath to one group of pods."""
        path = self.parent_cgroup / group
        path.mkdir(exist_ok=True)
        return path

    def pod(self, name: str) -> Pod:
        return self.pods[name]

    # -- probes (see probe.py) -----------------------------------------------------
    def probe_connect(self, src_pod: Pod, uid: int, gid: int, dst_ip: str, dst_port: int,
                      bind: tuple[str, int] | None = None, proto: str = "tcp", timeout: float = 3.0):
        """Connect from ``src_pod`` as uid/gid and report who answered (:class:`.probe.Outcome`)."""
        from .probe import probe_connect
        return probe_connect(src_pod, uid, gid, dst_ip, dst_port, bind=bind, proto=proto, timeout=timeout)

    # -- teardown ----------------------------------------------------------------
    def close(self) -> None:
        """Remove processes, cgroups, namespaces and files. Idempotent; never raises."""
        with self._lock:
            if self._closed or not self._started:
                self._closed = True
                return
            self._closed = True
        errors: list[str] = []
        for proc in self._processes:
            if proc.poll() is None:
                try:
                    proc.terminate()
                except OSError:
                    pass
        deadline = time.monotonic() + 3
        for proc in self._processes:
            try:
                proc.wait(timeout=max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                try:
                    proc.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    errors.append(f"pid {proc.pid} did not exit")
        for pod in self.pods.values():
            if not kill_cgroup(pod.cgroup_path):
                errors.append(f"processes left in {pod.cgroup_path}")
        for proc in self._processes:  # reap what cgroup.kill ended
            try:
                proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        for pod in self.pods.values():
            kill_netns_processes(pod.netns_path)  # strays started outside the cgroup
            for err in (remove_cgroup(pod.cgroup_path), delete_netns(pod.netns)):
                if err:
                    errors.append(err)
        kill_netns_processes(self.netns_path)
        for err in (remove_cgroup(self.parent_cgroup), delete_netns(self.netns)):
            if err:
                errors.append(err)
        shutil.rmtree(self.workdir, ignore_errors=True)
        _live_nodes.discard(self)
        if errors:
            import sys
            print(f"istio-ebpf harness: teardown of node {self.token} incomplete: {'; '.join(errors)}",
                  file=sys.stderr)


def kill_cgroup(path: Path, timeout: float = 5.0) -> bool:
    """SIGKILL every process in cgroup ``path`` (cgroup.kill) and wait until it is empty."""
    if not path.exists():
        return True
    try:
        (path / "cgroup.kill").write_text("1")
    except OSError:
        for pid in (path / "cgroup.procs").read_text().split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not (path / "cgroup.procs").read_text().strip():
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.02)
    return False


def remove_cgroup(path: Path) -> str | None:
    """rmdir a cgroup tree bottom-up; returns an error text or None."""
    if not path.exists():
        return None
    for child in sorted((p for p in path.iterdir() if p.is_dir()), reverse=True):
        kill_cgroup(child)
        err = remove_cgroup(child)
        if err:
            return err
    kill_cgroup(path)
    for _ in range(50):
        try:
            path.rmdir()
            return None
        except FileNotFoundError:
            return None
        except OSError:
            time.sleep(0.05)
    return f"cannot remove cgroup {path}"


def kill_netns_processes(netns_path: str) -> int:
    """SIGKILL every process whose network namespace is ``netns_path``; returns how many."""
    try:
        st = os.stat(netns_path)
    except FileNotFoundError:
        return 0
    killed = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            ns = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (ns.st_ino, ns.st_dev) == (st.st_ino, st.st_dev):
            try:
                os.kill(int(entry), signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    return killed


def delete_netns(name: str) -> str | None:
    if not (names.NETNS_DIR / name).exists():
        return None
    proc = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True)
    if proc.returncode != 0 and (names.NETNS_DIR / name).exists():
        return f"cannot delete netns {name}: {proc.stderr.strip()}"
    return None
