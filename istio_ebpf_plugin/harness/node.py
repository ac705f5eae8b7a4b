"""A local "node": pods made of a network namespace plus a cgroup v2 directory.

Topology (all inside namespaces this module creates; nothing touches the host netns)::

    netns ie-<tok>-node : bridge br0 10.244.0.1/24, fd00:1e::1/64
        veth vh<i>  <->  eth0 in netns ie-<tok>-<pod>   (10.244.0.<i+1>/24, fd00:1e::<i+1>/64)

    cgroup <cgroup v2 root>/istio-ebpf-test-<tok>/            <- Node.parent_cgroup (attach BPF here)
                                             /<pod>/           <- Pod.cgroup_path

Pods, process launching and teardown are the datapath's own (:mod:`istio_ebpf_plugin.datapath.selftest.topology`,
also used by the sockmap self-test); this module adds the bridge, the names the clean-up finds,
exit hooks, and the lab's conveniences (Envoy, Istio's iptables rules, probes).
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import signal
import subprocess
import sys
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..datapath.podconfig import PodConfig
from ..datapath.selftest import topology
from ..datapath.selftest.envoy import Envoy
from ..datapath.selftest.topology import (POD_SYSCTLS, configure_pod_addresses, create_pod_netns, delete_netns,
                                          kill_cgroup, kill_netns_processes, make_workdir, remove_cgroup, run_checked,
                                          wait_ready)
from ..errors import KernelError, UsageError
from . import envoy, istio_iptables, names, probe

# Re-exported: the clean-up and the tests remove leftovers with the same helpers.
__all__ = ["Node", "Pod", "delete_netns", "kill_cgroup", "kill_netns_processes", "remove_cgroup"]

IPV4_PREFIX = "10.244.0."
IPV6_PREFIX = "fd00:1e::"
BRIDGE = "br0"
MAX_PODS = 200

NODE_SYSCTLS = {
    "net.ipv6.conf.all.accept_dad": "0",
    "net.ipv6.conf.default.accept_dad": "0",
    "net.ipv4.ip_forward": "1",
    "net.ipv6.conf.all.forwarding": "1",
}

_live_nodes: "weakref.WeakSet[Node]" = weakref.WeakSet()
_hooks_installed = False
_hooks_lock = threading.Lock()


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
class Pod(topology.Pod):
    """One pod of a :class:`Node`: the datapath's pod plus the lab's conveniences."""

    node: "Node | None" = None
    index: int = 0
    envoys: list = field(default_factory=list)

    # -- sidecar and capture ---------------------------------------------------
    def start_envoy(self, **kwargs: Any) -> "Envoy":
        """Start a real Envoy sidecar (UID/GID 1337) in this pod; see :func:`.envoy.start_envoy`."""
        env = envoy.start_envoy(self, **kwargs)
        self.envoys.append(env)
        return env

    def apply_istio_iptables(self, podconfig: PodConfig, *, ipv6: bool = True) -> None:
        """Load Istio's rules for ``podconfig`` into this pod's netns (iptables-restore)."""
        istio_iptables.apply_to_pod(self, podconfig, ipv6=ipv6)

    def flush_iptables(self) -> None:
        istio_iptables.flush_pod(self)

    def iptables_rule_count(self) -> int:
        """Number of ``-A`` rules in nat, mangle and raw, IPv4 plus IPv6."""
        return istio_iptables.count_rules(self)


#: Host IDs of user-namespace pods: pod i gets [USERNS_BASE + i * USERNS_SIZE, + USERNS_SIZE), as
#: kubelet gives every pod with ``hostUsers: false`` its own 65536 IDs. Its group IDs start
#: USERNS_GID_SHIFT higher: kubelet maps both alike, the lab does not, so a UID taken for a GID
#: (or the reverse) anywhere shows.
USERNS_BASE = 1 << 20
USERNS_SIZE = 1 << 16
USERNS_GID_SHIFT = 1 << 24

_HOLD = 'echo $$ > "$1" || exit 126; shift; exec "$@"'


def create_userns_pod_netns(pod: Pod, host_base: int, size: int = USERNS_SIZE) -> None:
    """The pod's cgroup, work directory and a network namespace OWNED BY a new user namespace
    whose UIDs 0..size-1 are host UIDs ``host_base``.. and GIDs 0..size-1 host GIDs ``host_base +
    USERNS_GID_SHIFT``.. (what a runtime sets up for a pod with ``hostUsers: false``; Istio's
    ``-m owner`` rules are read through that namespace).

    A holder process in the pod cgroup (the pod's "pause") creates both and keeps them; the
    pod's processes then enter its user namespace (``Pod.userns_path``).
    """
    make_workdir(pod.workdir)
    pod.cgroup_path.mkdir()
    holder = subprocess.Popen(["sh", "-c", _HOLD, "sh", str(pod.cgroup_path / "cgroup.procs"),
                               "unshare", "--user", "--net", "--", "sh", "-c", "echo READY; exec sleep infinity"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pod.processes.append(holder)
    wait_ready(holder, f"user namespace of pod {pod.name}")
    for name, base in (("uid_map", host_base), ("gid_map", host_base + USERNS_GID_SHIFT)):
        Path(f"/proc/{holder.pid}/{name}").write_text(f"0 {base} {size}\n")
    pod.userns_path = f"/proc/{holder.pid}/ns/user"
    run_checked(["ip", "netns", "attach", pod.netns, str(holder.pid)])
    # -e: the kernel may hide net.core.somaxconn in a netns owned by another user namespace
    # (5.10 does: "cannot stat"); the pod then keeps the default backlog.
    pod.ns_exec(["sysctl", "-e", "-q", "-w", *[f"{k}={v}" for k, v in POD_SYSCTLS.items()]])


class Node:
    """Creates pods; ``with Node() as node`` removes everything on exit, even on errors."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token or names.new_token()
        names.created_tokens.add(self.token)
        self.netns = f"{names.NETNS_PREFIX}{self.token}-node"
        self.parent_cgroup = names.cgroup_v2_root() / f"{names.CGROUP_PREFIX}{self.token}"
        self.workdir = names.TMP_ROOT / f"{names.TMP_PREFIX}{self.token}"
        self.pods: dict[str, Pod] = {}
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
            make_workdir(self.workdir)  # Envoy (UID 1337) must read its bootstrap
            (self.workdir / "owner.pid").write_text(f"{os.getpid()}\n")  # harness-cleanup spares live runs
            self.parent_cgroup.mkdir()
            run_checked(["ip", "netns", "add", self.netns])
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
        return run_checked(["nsenter", f"--net={self.netns_path}", "--", *argv])

    def _sysctl_node(self, values: dict[str, str]) -> None:
        self._node_exec(["sysctl", "-q", "-w", *[f"{k}={v}" for k, v in values.items()]])

    def add_pod(self, name: str, group: str | None = None, userns: bool = False) -> Pod:
        """Create pod ``name`` (letters, digits, '-'; at most 8 chars to fit interface names).

        ``group`` puts the pod cgroup under ``parent_cgroup/<group>/`` so different capture
        mechanisms can be attached to different sets of pods (see :meth:`group_cgroup`).
        ``userns``: a pod with ``hostUsers: false`` (see :func:`create_userns_pod_netns`).
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
        if userns:
            create_userns_pod_netns(pod, USERNS_BASE + index * USERNS_SIZE)
        else:
            create_pod_netns(pod)
        host_if = f"vh{index}"
        self._node_exec(["ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0",
                         "netns", pod.netns_path])
        self._node_exec(["ip", "link", "set", host_if, "master", BRIDGE])
        self._node_exec(["ip", "link", "set", host_if, "up"])
        configure_pod_addresses(pod, 24, 64, gateways=(f"{IPV4_PREFIX}1", f"{IPV6_PREFIX}1"))
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
        return probe.probe_connect(src_pod, uid, gid, dst_ip, dst_port, bind=bind, proto=proto, timeout=timeout,
                                   nat_pods=self.pods.values())

    # -- teardown ----------------------------------------------------------------
    def close(self) -> None:
        """Remove processes, cgroups, namespaces and files. Idempotent; never raises."""
        with self._lock:
            if self._closed or not self._started:
                self._closed = True
                return
            self._closed = True
        errors = topology.teardown(self.pods.values(), self.parent_cgroup, extra_netns=[self.netns],
                                   workdir=self.workdir)
        _live_nodes.discard(self)
        if errors:
            print(f"istio-ebpf harness: teardown of node {self.token} incomplete: {'; '.join(errors)}",
                  file=sys.stderr)

