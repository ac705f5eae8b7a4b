"""Helpers shared by tests/test_hardening_*.py and tests/test_soak.py.

* :data:`ESCAPE_CLIENT` (``programs/escape_client.py``): a stdlib client run inside a pod that first
  tries an escape trick (setuid, SO_MARK, bind) and then connects, printing one JSON line like the
  probe client.
* :data:`RAW_SYN` / :data:`SYN_SNIFFER` (``programs/raw_syn.py``, ``programs/syn_sniffer.py``): a
  hand-made TCP SYN on a raw socket, and a raw-socket observer in the destination netns that
  reports which SYNs arrived.
* :class:`ChurnPod`: a short-lived pod (netns + cgroup + one process) that can be created and
  deleted many times on one :class:`~istio_ebpf_plugin.harness.Node` (Node has no pod delete).
"""

from __future__ import annotations

import json
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

from istio_ebpf_plugin.harness import names
from istio_ebpf_plugin.datapath.selftest.topology import delete_netns, kill_cgroup, kill_netns_processes, remove_cgroup
from istio_ebpf_plugin.harness.probe import PYTHON
from .polling import wait_for

PROGRAMS = Path(__file__).resolve().parents[1] / "programs"
#: Program texts, run with ``python3 -S -c`` (see each file's docstring for its arguments).
ESCAPE_CLIENT = (PROGRAMS / "escape_client.py").read_text()
RAW_SYN = (PROGRAMS / "raw_syn.py").read_text()
SYN_SNIFFER = (PROGRAMS / "syn_sniffer.py").read_text()


def run_escape(pod, args: dict, uid: int | None, gid: int | None = None, *, prefix: list[str] | None = None,
               cgroup_procs: Path | None = None, timeout: float = 20) -> dict:
    """Run :data:`ESCAPE_CLIENT` in ``pod`` (optionally in another cgroup, or behind ``prefix``
    such as ``setpriv``) and return its JSON record."""
    argv = pod.launch_argv([*(prefix or []), PYTHON, "-S", "-c", ESCAPE_CLIENT, json.dumps(args)], uid, gid)
    if cgroup_procs is not None:
        argv[4] = str(cgroup_procs)     # launch_argv: sh -c LAUNCH sh <cgroup.procs> <netns> ...
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"escape client failed in {pod.name}: {proc.stderr[-800:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def outcome(rec: dict, src_pod) -> tuple:
    """(listener, whose listener, original destination) with the pod name made relative.

    As in harness.capture_cases, SO_ORIGINAL_DST is taken strictly: without an answer the
    outcome says so (``errno N``); the socket's local address never stands in for it (under
    sk_lookup it is the original destination, which would hide a lost answer)."""
    who = rec.get("pod")
    if who is not None:
        who = "self" if who == src_pod.name else who
    orig = None
    if rec.get("listener") in ("outbound", "inbound"):
        orig = tuple(rec["orig_dst"]) if rec.get("orig_dst") else f"errno {rec.get('orig_dst_errno')}"
        own = {src_pod.ipv4: "<own IPv4>", src_pod.ipv6: "<own IPv6>"}
        if isinstance(orig, tuple) and orig[0] in own:
            orig = (own[orig[0]], *orig[1:])
    return (rec.get("listener"), who, orig)


@dataclass
class ChurnPod:
    """A pod that comes and goes: netns ``ie-<node token>-z<n>``, cgroup ``<parent>/z<n>``,
    one ``sleep`` process inside both (what the agent's locator needs). No veth: churn pods
    only need to exist, be captured while they live and vanish without a trace."""

    node: object
    n: int
    ipv4: str
    ipv6: str
    uid: str = ""
    proc: subprocess.Popen | None = None

    @property
    def name(self) -> str:
        return f"z{self.n}"

    @property
    def netns(self) -> str:
        return f"{names.NETNS_PREFIX}{self.node.token}-{self.name}"

    @property
    def netns_path(self) -> str:
        return str(names.NETNS_DIR / self.netns)

    @property
    def cgroup_path(self) -> Path:
        return self.node.parent_cgroup / self.name

    @property
    def pod_ips(self) -> tuple[str, str]:
        return (self.ipv4, self.ipv6)

    def create(self) -> "ChurnPod":
        self.uid = self.uid or str(uuid.UUID(int=(0xC0FFEE << 96) | self.n))
        self.cgroup_path.mkdir()
        subprocess.run(["ip", "netns", "add", self.netns], check=True, capture_output=True)
        subprocess.run(["ip", "netns", "exec", self.netns, "ip", "link", "set", "lo", "up"], check=True,
                       capture_output=True)
        launch = 'echo $$ > "$1" || exit 126; n="$2"; shift 2; exec nsenter --net="$n" "$@"'
        self.proc = subprocess.Popen(["sh", "-c", launch, "sh", str(self.cgroup_path / "cgroup.procs"),
                                      self.netns_path, "sleep", "100000"], stdin=subprocess.DEVNULL)
        wait_for(lambda: (self.cgroup_path / "cgroup.procs").read_text().strip(), timeout=5, interval=0.005,
                 what=f"{self.name}'s process to join its cgroup")
        return self

    def run(self, argv: list[str], uid: int = 1000, timeout: float = 10) -> subprocess.CompletedProcess:
        launch = 'echo $$ > "$1" || exit 126; n="$2"; shift 2; exec nsenter --net="$n" "$@"'
        return subprocess.run(["sh", "-c", launch, "sh", str(self.cgroup_path / "cgroup.procs"), self.netns_path,
                               "-S", str(uid), "-G", str(uid), "--", *argv],
                              capture_output=True, text=True, timeout=timeout)

    def delete(self) -> list[str]:
        errors = []
        if not kill_cgroup(self.cgroup_path):
            errors.append(f"processes left in {self.cgroup_path}")
        if self.proc is not None:
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                errors.append(f"pid {self.proc.pid} did not exit")
        kill_netns_processes(self.netns_path)
        for err in (remove_cgroup(self.cgroup_path), delete_netns(self.netns)):
            if err:
                errors.append(err)
        return errors


def churn_ips(n: int) -> tuple[str, str]:
    """IPs for churn pod n from a pool of 100, so addresses are reused like a real node's."""
    k = n % 100
    return f"10.244.1.{k + 10}", f"fd00:1f::{k + 10:x}"
