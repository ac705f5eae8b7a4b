"""Helpers shared by tests/test_hardening_*.py and tests/test_soak.py.

* :data:`ESCAPE_CLIENT`: a stdlib client run inside a pod that first tries an escape trick
  (setuid, SO_MARK, bind) and then connects, printing one JSON line like the probe client.
* :data:`RAW_SYN` / :data:`SYN_SNIFFER`: a hand-made TCP SYN on a raw socket, and a raw-socket
  observer in the destination netns that reports which SYNs arrived.
* :class:`ChurnPod`: a short-lived pod (netns + cgroup + one process) that can be created and
  deleted many times on one :class:`~istio_ebpf_plugin.harness.Node` (Node has no pod delete).
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from istio_ebpf_plugin.harness import names
from istio_ebpf_plugin.datapath.topology import delete_netns, kill_cgroup, kill_netns_processes, remove_cgroup
from istio_ebpf_plugin.harness.probe import PYTHON

ESCAPE_CLIENT = r"""
import errno, json, os, socket, sys
a = json.loads(sys.argv[1])
rec = {"setup": {}}
def step(name, fn):
    try:
        fn(); rec["setup"][name] = "ok"
    except OSError as e:
        rec["setup"][name] = errno.errorcode.get(e.errno, str(e.errno))
if "setuid" in a:
    step("setgid", lambda: os.setgid(a["setuid"]))
    step("setuid", lambda: os.setuid(a["setuid"]))
rec["uid"] = os.getuid()
fam = socket.AF_INET6 if a.get("family") == 6 or ":" in a["dst"] else socket.AF_INET
udp = a.get("udp", False)
s = socket.socket(fam, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
s.settimeout(a.get("timeout", 2.0))
if "mark" in a:
    step("so_mark", lambda: s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, a["mark"]))
if "bind" in a:
    step("bind", lambda: s.bind((a["bind"], 0)))
try:
    if udp:
        s.sendto(b"probe", (a["dst"], a["port"]))
        data, src = s.recvfrom(4096)
        rec.update(json.loads(data)); rec["reply_from"] = [src[0], src[1]]
    else:
        s.connect((a["dst"], a["port"]))
        buf = b""
        while True:
            c = s.recv(4096)
            if not c:
                break
            buf += c
        rec.update(json.loads(buf) if buf.strip() else {"listener": "error", "error": "empty reply"})
except ConnectionRefusedError:
    rec["listener"] = "refused"
except socket.timeout:
    rec["listener"] = "timeout"
except OSError as e:
    rec["listener"] = "error"; rec["errno"] = errno.errorcode.get(e.errno, str(e.errno))
print(json.dumps(rec))
"""

#: argv[1..4] = source IP, destination IP, destination port, source port. Prints
#: {"socket": "ok"|errno, "reply": [ip, port, flags] | null}.
RAW_SYN = r"""
import errno, json, select, socket, struct, sys, time
src, dst, dport, sport = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
try:
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
except OSError as e:
    print(json.dumps({"socket": errno.errorcode.get(e.errno, str(e.errno)), "reply": None})); sys.exit(0)
def csum(b):
    if len(b) % 2: b += b"\0"
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while t >> 16: t = (t & 0xffff) + (t >> 16)
    return ~t & 0xffff
hdr = struct.pack("!HHLLBBHHH", sport, dport, 12345, 0, 5 << 4, 0x02, 64240, 0, 0)
pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(hdr))
hdr = hdr[:16] + struct.pack("!H", csum(pseudo + hdr)) + hdr[18:]
s.sendto(hdr, (dst, 0))
reply, end = None, time.time() + 1.5
while reply is None and time.time() < end:
    if select.select([s], [], [], 0.1)[0]:
        pkt, addr = s.recvfrom(65535)
        ihl = (pkt[0] & 0xf) * 4
        sp, dp = struct.unpack("!HH", pkt[ihl:ihl + 4])
        if dp == sport:
            reply = [addr[0], sp, pkt[ihl + 13]]
print(json.dumps({"socket": "ok", "reply": reply}))
"""

#: Run as root in the destination netns: argv[1] = port, argv[2] = max seconds; stops early
#: when a line arrives on stdin. Prints READY, then one JSON list of [source ip, source port]
#: of every SYN (without ACK) to that port.
SYN_SNIFFER = r"""
import json, select, socket, struct, sys, time
port, dur = int(sys.argv[1]), float(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
print("READY", flush=True)
watch = [s, sys.stdin]
seen, end = [], time.time() + dur
while time.time() < end:
    r = select.select(watch, [], [], 0.05)[0]
    if sys.stdin in r:
        if sys.stdin.readline():
            end = time.time() + 0.2     # drain what is still in flight
        watch = [s]
    if s in r:
        pkt, addr = s.recvfrom(65535)
        ihl = (pkt[0] & 0xf) * 4
        sp, dp = struct.unpack("!HH", pkt[ihl:ihl + 4])
        if dp == port and pkt[ihl + 13] & 0x12 == 0x02:
            seen.append([addr[0], sp])
print(json.dumps(seen), flush=True)
"""


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
        deadline = time.monotonic() + 5
        while not (self.cgroup_path / "cgroup.procs").read_text().strip():
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: process never joined its cgroup")
            time.sleep(0.005)
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
