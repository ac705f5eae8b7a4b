"""Connection state on the real kernel: an inbound connection's entry and an outbound app
connection's entry never overwrite or delete each other (issue #21, item 8).

In pod-IP mode every entry of origin_by_tuple has netns 0: an inbound entry is keyed by the
client's ip:port, an outbound one by the app socket's ip:port. On one node the two coincide
when the client pod's proxy (Envoy's upstream connection) and one of its apps use the same
source port, which the kernel allows whenever the 4-tuples differ. Here the client pod has a
single ephemeral port, so they always coincide: one connection is held open while the other
kind is opened and closed, and the held one's SO_ORIGINAL_DST is asked again afterwards (as
conntrack, it must keep answering for the connection's whole life).
"""

from __future__ import annotations

import json
import select
import subprocess
import uuid
from pathlib import Path

import pytest

from istio_ebpf_plugin.datapath import libbpf, maps
from istio_ebpf_plugin.datapath.loader import Datapath
from istio_ebpf_plugin.datapath.podconfig import INBOUND_PORT, OUTBOUND_PORT, PROXY_UID, PodConfig, ip_list
from istio_ebpf_plugin.datapath.staging import staged
from istio_ebpf_plugin.harness.probe import PYTHON, wait_ready
from istio_ebpf_plugin.timeouts import scaled

from support.datapath_modes import require_mode
from support.polling import wait_for

pytestmark = pytest.mark.kernel

SCRIPT = Path(__file__).resolve().parent / "programs" / "held_conn.py"
#: The client pod's only ephemeral port: every connection it opens gets it.
THE_PORT = 40123
APP_UID = 1000


class Held:
    """One client connection, held open by its own process in a pod (uid decides its capture)."""

    def __init__(self, pod, uid: int, dst: str, port: int) -> None:
        self.proc = pod.spawn([PYTHON, "-S", staged(SCRIPT), "client", dst, str(port)], uid=uid, gid=uid,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
        self.local = tuple(self._line()["local"])

    def _line(self) -> dict:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], scaled(15))
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            self.proc.kill()
            self.proc.wait()
            err = self.proc.stderr.read().decode() if self.proc.stderr else ""
            raise AssertionError(f"held connection client gave no answer: {err.strip()[-300:]}")
        return json.loads(line)

    def _send(self, cmd: str) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{cmd}\n".encode())
        return self._line()

    def original_dst(self) -> tuple[tuple[str, int] | None, int]:
        """SO_ORIGINAL_DST as the listener that holds the other end answers it now, and its errno."""
        rec = self._send("query")
        return (tuple(rec["orig_dst"]) if rec["orig_dst"] else None), rec["errno"]

    def peer(self) -> tuple[str, int]:
        """getpeername() as the app that holds the connection asks it now."""
        ip, port = self._send("peer")["peer"]
        return ip, port

    def close(self) -> None:
        assert self._send("close") == {"closed": True}
        self.proc.wait(timeout=scaled(10))


def _origins(dp: Datapath) -> set[tuple[str, int, int]]:
    """(original ip, port, listener) of every origin_by_tuple entry."""
    fd = dp.map_fds["origin_by_tuple"]
    out = set()
    for key in libbpf.map_keys(fd, maps.ConnKey):
        val = maps.Origin()
        if libbpf.map_lookup(fd, key, val):
            out.add((str(val.ip.address()), val.port, val.listener))
    return out


@pytest.fixture
def lab(node, request):
    """(node, datapath, client pod a with one ephemeral port, server pod b); listeners as Envoy's:
    15001 in a, 15006 in b (uid 1337, registered as b's inbound listener)."""
    mode = request.param
    require_mode(mode)
    dp = Datapath(mode=mode, pin_root=f"/sys/fs/bpf/istio-ebpf-test-{uuid.uuid4().hex[:8]}").load()
    try:
        dp.attach_cgroup(str(node.parent_cgroup))
        a, b = node.add_pod("a"), node.add_pod("b")
        a.ns_exec(["sysctl", "-q", "-w", f"net.ipv4.ip_local_port_range={THE_PORT} {THE_PORT}"])
        for pod, port in ((a, OUTBOUND_PORT), (b, INBOUND_PORT)):
            proc = pod.spawn([PYTHON, "-S", staged(SCRIPT), "server", str(port)], uid=PROXY_UID, gid=PROXY_UID,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            wait_ready(proc, f"held-connection server in pod {pod.name}")
        for pod in (a, b):     # after the listeners: pod-IP mode registers 15006 when a pod is added
            dp.add_pod(pod.netns_path, PodConfig(pod_ips=ip_list(pod.pod_ips)), str(pod.cgroup_path))
        yield node, dp, a, b
    finally:
        dp.close(cleanup=True)


#: The two kinds of connection of the client pod: uid, destination port on b, and the listener
#: that answers its SO_ORIGINAL_DST (the original port itself for sk_lookup's inbound).
KINDS = {"proxy": (PROXY_UID, 8080, 8080),        # Envoy's upstream: uncaptured out, inbound at b
         "app": (APP_UID, 9090, OUTBOUND_PORT)}   # captured to a's 15001


@pytest.mark.parametrize("lab", ["podip", "cookie"], indirect=True)
@pytest.mark.parametrize("held,other", [("proxy", "app"), ("app", "proxy")])
def test_held_connection_keeps_its_answer_while_the_other_kind_comes_and_goes(lab, held, other):
    """held=proxy: a proxy connection a -> b:8080 is held by b's 15006; an app connection of a
    to b:9090 (captured to a's 15001) gets the same source ip:port, then closes. b's
    SO_ORIGINAL_DST for the proxy connection still names b:8080. held=app: the other way round.
    Today's shared key space fails both: the second entry replaces the first (EPERM or ENOENT),
    and the second connection's close deletes it."""
    node, dp, a, b = lab
    connections: dict[str, Held] = {}
    for kind in (held, other):
        uid, port, _ = KINDS[kind]
        connections[kind] = conn = Held(a, uid, b.ipv4, port)
        assert conn.local == (a.ipv4, THE_PORT), "the collision needs the same source ip:port"
        assert conn.original_dst() == ((b.ipv4, port), 0)
    assert connections[held].original_dst() == ((b.ipv4, KINDS[held][1]), 0)   # not replaced

    connections[other].close()
    _, port, listener = KINDS[other]
    # The closing socket's sockops has run: its entry, and only that one, is gone.
    wait_for(lambda: (b.ipv4, port, listener) not in _origins(dp), scaled(10), f"the {other} entry's delete")
    assert connections[held].original_dst() == ((b.ipv4, KINDS[held][1]), 0)

    connections[held].close()
    wait_for(lambda: not _origins(dp), scaled(10), "every entry gone with its connection")
    assert dp.counters()["origdst_miss"] == 0
