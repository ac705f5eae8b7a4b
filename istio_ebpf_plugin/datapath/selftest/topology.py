"""Local pods for the datapath's own checks: a network namespace plus a cgroup v2 directory.

The start-up self-test (:mod:`.sockmap_check`) needs two pods with real traffic between them
and a parent cgroup to attach to, without touching the host's namespace or root cgroup.
:class:`PodPair` builds exactly that; the lab's ``harness.Node`` builds its bridged pods
from the same :class:`Pod` and the same teardown helpers.

Processes are started through ``sh`` (writes its own pid to the pod's ``cgroup.procs``)
then ``nsenter --net`` (enters the pod netns, then drops to the requested uid/gid and
clears supplementary groups) then ``exec`` of the command, so cgroup membership is in
place before the command runs and no ``ip netns exec`` /sys remount is involved.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from ...errors import KernelError, UsageError
from ...timeouts import scaled
from .. import userns
from ..host import require_cgroup_v2_root

NETNS_DIR = Path("/run/netns")
#: The interpreter pod helper scripts run with (``-S``: stdlib only, fast start, no venv needed).
PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable

#: Sysctls set in every pod netns (connection churn must not stall in TIME_WAIT).
POD_SYSCTLS = {
    "net.ipv4.tcp_tw_reuse": "1",
    "net.ipv4.ip_local_port_range": "20000 64999",
    "net.ipv4.ip_unprivileged_port_start": "0",    # probe/target servers on port 53 as non-root
    "net.ipv6.conf.all.accept_dad": "0",
    "net.ipv6.conf.default.accept_dad": "0",
    "net.core.somaxconn": "4096",
}

_LAUNCH = 'echo $$ > "$1" || exit 126; n="$2"; shift 2; exec nsenter --net="$n" "$@"'


def run_checked(argv: Sequence[str], *, check: bool = True, timeout: float = 30,
                input: str | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise KernelError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def wait_ready(proc: subprocess.Popen, what: str, timeout: float = 10.0) -> None:
    """Wait for a helper process's "READY" line; kill it and raise if it does not come."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], scaled(timeout))
    line = proc.stdout.readline().strip() if ready else ""
    if line != "READY":
        proc.kill()
        err = proc.stderr.read() if proc.stderr else ""
        raise KernelError(f"{what} did not start: {line!r} {str(err).strip()[-500:]}")


def stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds; reaped either way."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)


@dataclass(eq=False)
class Pod:
    """One pod: a network namespace and a cgroup v2 directory; ``processes`` are ended at teardown."""

    name: str
    netns: str
    cgroup_path: Path
    ipv4: str
    ipv6: str
    workdir: Path
    processes: list[subprocess.Popen] = field(default_factory=list)
    #: A user namespace the pod's processes run in (the lab's pods with ``hostUsers: false``):
    #: uid/gid given to :meth:`spawn` and :meth:`run` are IDs inside it. None: the host's users.
    userns_path: str | None = None

    @property
    def netns_path(self) -> str:
        return str(NETNS_DIR / self.netns)

    @property
    def pod_ips(self) -> tuple[str, str]:
        return (self.ipv4, self.ipv6)

    # -- processes -------------------------------------------------------------
    def launch_argv(self, argv: Sequence[str], uid: int | None = None, gid: int | None = None) -> list[str]:
        """argv that runs ``argv`` in this pod's cgroup and netns as uid/gid."""
        if not argv:
            raise UsageError("empty command")
        creds: list[str] = [f"--user={self.userns_path}"] if self.userns_path else []
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
        self.processes.append(proc)
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
                timeout: float = 30, as_pod_root: bool = False) -> subprocess.CompletedProcess:
        """Run a root tool (ip, iptables, sysctl) in the pod netns, outside the pod cgroup.

        ``as_pod_root``: as root of the pod's user namespace, if it has one (iptables accepts
        owner-match rules only from the user namespace that owns the network namespace).
        """
        user = [f"--user={self.userns_path}"] if as_pod_root and self.userns_path else []
        return run_checked(["nsenter", f"--net={self.netns_path}", *user, "--", *argv], check=check, input=input,
                           timeout=timeout)

    def host_ids(self, uid: int, gid: int) -> tuple[int, int]:
        """``uid``/``gid`` of the pod's processes as host IDs (the same without a user namespace):
        who owns the files they write."""
        if not self.userns_path:
            return uid, gid
        proc = Path(self.userns_path).parent.parent        # /proc/<holder>
        host = (userns.to_outside(uid, userns.parse_id_map((proc / "uid_map").read_text())),
                userns.to_outside(gid, userns.parse_id_map((proc / "gid_map").read_text())))
        if host[0] is None or host[1] is None:
            raise UsageError(f"{self.name}: {uid}/{gid} not mapped in the pod's user namespace")
        return host[0], host[1]

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


# -- building ------------------------------------------------------------------------
def make_workdir(path: Path) -> None:
    """A directory UID 1337 (Envoy) can read its bootstrap from."""
    path.mkdir(mode=0o755)
    os.chmod(path, 0o755)


def create_pod_netns(pod: Pod) -> None:
    """The pod's cgroup, work directory and network namespace (sysctls set, no links yet)."""
    make_workdir(pod.workdir)
    pod.cgroup_path.mkdir()
    run_checked(["ip", "netns", "add", pod.netns])
    pod.ns_exec(["sysctl", "-q", "-w", *[f"{k}={v}" for k, v in POD_SYSCTLS.items()]])


def configure_pod_addresses(pod: Pod, prefix4: int, prefix6: int,
                            gateways: tuple[str, str] | None = None) -> None:
    """lo up with Istio's ::6, the pod addresses on eth0, default routes via ``gateways``."""
    argvs = [["ip", "link", "set", "lo", "up"],
             # Istio's inbound passthrough source for IPv6 (istio-iptables adds it too).
             ["ip", "-6", "addr", "add", "::6/128", "dev", "lo", "nodad"],
             ["ip", "addr", "add", f"{pod.ipv4}/{prefix4}", "dev", "eth0"],
             ["ip", "-6", "addr", "add", f"{pod.ipv6}/{prefix6}", "dev", "eth0", "nodad"],
             ["ip", "link", "set", "eth0", "up"]]
    if gateways:
        argvs += [["ip", "route", "add", "default", "via", gateways[0]],
                  ["ip", "-6", "route", "add", "default", "via", gateways[1]]]
    for argv in argvs:
        pod.ns_exec(argv)


# -- teardown ------------------------------------------------------------------------
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
    if not (NETNS_DIR / name).exists():
        return None
    proc = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True)
    if proc.returncode != 0 and (NETNS_DIR / name).exists():
        return f"cannot delete netns {name}: {proc.stderr.strip()}"
    return None


def _end_processes(processes: Iterable[subprocess.Popen], errors: list[str]) -> None:
    processes = list(processes)
    for proc in processes:
        if proc.poll() is None:
            try:
                proc.terminate()
            except OSError:
                pass
    deadline = time.monotonic() + 3
    for proc in processes:
        try:
            proc.wait(timeout=max(0.05, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                errors.append(f"pid {proc.pid} did not exit")


def teardown(pods: Iterable[Pod], parent_cgroup: Path, extra_netns: Iterable[str] = (),
             workdir: Path | None = None) -> list[str]:
    """Remove pods' processes, cgroups, namespaces and files; the error texts (empty: all gone)."""
    pods = list(pods)
    processes = [p for pod in pods for p in pod.processes]
    errors: list[str] = []
    _end_processes(processes, errors)
    for pod in pods:
        if not kill_cgroup(pod.cgroup_path):
            errors.append(f"processes left in {pod.cgroup_path}")
    for proc in processes:  # reap what cgroup.kill ended
        try:
            proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass
    for pod in pods:
        kill_netns_processes(pod.netns_path)  # strays started outside the cgroup
        for err in (remove_cgroup(pod.cgroup_path), delete_netns(pod.netns)):
            if err:
                errors.append(err)
    for name in extra_netns:
        kill_netns_processes(str(NETNS_DIR / name))
        err = delete_netns(name)
        if err:
            errors.append(err)
    err = remove_cgroup(parent_cgroup)
    if err:
        errors.append(err)
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)
    return errors


# -- the self-test's topology -------------------------------------------------------------
SELFTEST_PREFIX = "istio-ebpf-selftest-"


class PodPair:
    """Two pods joined by one veth pair (no bridge, no host link), under one parent cgroup.

    ``with PodPair() as pair:`` gives ``pair.client``, ``pair.server`` and ``pair.parent_cgroup``
    (attach cgroup programs there, never to the root cgroup). Names carry a random token,
    so several pairs (and several agents' self-tests) never collide; ``close`` removes all.
    """

    V4 = ("10.250.0.1", "10.250.0.2")
    V6 = ("fd00:ebf::1", "fd00:ebf::2")

    def __init__(self, prefix: str = SELFTEST_PREFIX) -> None:
        if os.geteuid() != 0:
            raise KernelError("local pods need root (network namespaces, cgroups)")
        self.token = secrets.token_hex(4)
        self.name = f"{prefix}{self.token}"
        self.parent_cgroup = require_cgroup_v2_root() / self.name
        self.workdir = Path("/tmp") / self.name
        self.client = self._pod("client", 0)
        self.server = self._pod("server", 1)
        self._closed = False

    def _pod(self, role: str, i: int) -> Pod:
        return Pod(name=role, netns=f"{self.name}-{role}", cgroup_path=self.parent_cgroup / role,
                   ipv4=self.V4[i], ipv6=str(ipaddress.ip_address(self.V6[i])), workdir=self.workdir / role)

    def __enter__(self) -> "PodPair":
        try:
            make_workdir(self.workdir)
            self.parent_cgroup.mkdir()
            for pod in (self.client, self.server):
                create_pod_netns(pod)
            self.client.ns_exec(["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
                                 "netns", self.server.netns_path])
            for pod in (self.client, self.server):
                configure_pod_addresses(pod, 24, 64)
        except BaseException:
            try:
                self.close()
            except KernelError:
                pass          # the first error is the one to report
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Remove everything; raises only when something could not be removed."""
        if self._closed:
            return
        self._closed = True
        errors = teardown((self.client, self.server), self.parent_cgroup, workdir=self.workdir)
        if errors:
            raise KernelError(f"self-test pods not fully removed: {'; '.join(errors)}")
