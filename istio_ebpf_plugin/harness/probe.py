"""Probe servers and client calls: "which listener got this connection, with what original destination".

* :func:`start_probe_server` runs :mod:`.probe_server` in a pod (as UID/GID 1337 by default, like
  Envoy and istio-validation): sidecar listeners 15001/15006/15053 plus "direct" target ports.
* :func:`probe_connect` runs :mod:`.probe_client` in a pod as a given uid/gid and returns an
  :class:`Outcome`.

Both scripts are stdlib-only and run with ``python3 -S <path>`` so they start fast and need no
virtualenv inside the pod.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

from ..datapath.staging import staged
from ..datapath.selftest.topology import PYTHON, Pod, stop_process, wait_ready
from ..errors import KernelError
from ..timeouts import scaled
from . import conntrack

__all__ = ["PYTHON", "Outcome", "ProbeServer", "probe_connect", "start_probe_server", "wait_ready"]

HERE = Path(__file__).resolve().parent
SERVER_SCRIPT = HERE / "probe_server.py"
CLIENT_SCRIPT = HERE / "probe_client.py"


def _norm_ip(ip: str) -> str:
    return str(ipaddress.ip_address(ip))


def _pair(value: object) -> tuple[str, int] | None:
    if not value:
        return None
    ip, port = value  # type: ignore[misc]
    return (_norm_ip(ip), int(port))


@dataclass(frozen=True)
class Outcome:
    """Result of one probe connection.

    ``listener``: "outbound" (15001), "inbound" (15006), "dns" (15053), "direct" (a target
    server on the destination port), or "refused" / "timeout" / "unreachable" / "error".
    ``pod``: name of the pod whose listener answered. ``orig_dst``: SO_ORIGINAL_DST seen by
    that listener (None if the socket had none). ``seen_peer``: the client address the
    listener saw. ``nat_peer``: the client's address after conntrack moved its source port (a
    REDIRECT reply-tuple clash, see :mod:`.conntrack`); None when NAT left the source alone.
    """

    listener: str
    pod: str | None = None
    orig_dst: tuple[str, int] | None = None
    seen_peer: tuple[str, int] | None = None
    port: int | None = None
    local: tuple[str, int] | None = None
    client_local: tuple[str, int] | None = None
    reply_from: tuple[str, int] | None = None
    #: getpeername() of the client socket: what the application believes it is connected to.
    client_peer: tuple[str, int] | None = None
    #: errno name of a failed connection (ECONNREFUSED, ETIMEDOUT, ...), None on success.
    errno: str | None = None
    #: errno of the listener's SO_ORIGINAL_DST query (0 = answered).
    orig_dst_errno: int | None = None
    nat_peer: tuple[str, int] | None = None
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_record(cls, rec: dict) -> "Outcome":
        return cls(listener=rec.get("listener", "error"), pod=rec.get("pod"),
                   orig_dst=_pair(rec.get("orig_dst")), seen_peer=_pair(rec.get("peer")),
                   port=rec.get("port"), local=_pair(rec.get("local")),
                   client_local=_pair(rec.get("client_local")), reply_from=_pair(rec.get("reply_from")),
                   client_peer=_pair(rec.get("client_peer")), errno=rec.get("errno"),
                   orig_dst_errno=rec.get("orig_dst_errno"), raw=rec)

    def key(self) -> tuple:
        """What the differential test compares: listener, answering pod, original destination."""
        orig = self.orig_dst if self.listener in ("outbound", "inbound") else None
        return (self.listener, self.pod, orig)


@dataclass
class ProbeServer:
    pod: Pod
    proc: subprocess.Popen
    targets: tuple[int, ...]
    udp_targets: tuple[int, ...]

    def stop(self) -> None:
        stop_process(self.proc, timeout=3)


def start_probe_server(pod: Pod, targets: Iterable[int] = (), udp_targets: Iterable[int] = (), *,
                       uid: int = 1337, gid: int = 1337, sidecar_ports: bool = True,
                       timeout: float = 10.0) -> ProbeServer:
    """Start the probe server in ``pod`` and wait until all its sockets are bound."""
    targets = tuple(sorted(set(targets)))
    udp_targets = tuple(sorted(set(udp_targets)))
    argv = [PYTHON, "-S", staged(SERVER_SCRIPT), "--pod", pod.name,
            "--targets", ",".join(map(str, targets)), "--udp-targets", ",".join(map(str, udp_targets))]
    if not sidecar_ports:
        argv.append("--no-sidecar-ports")
    proc = pod.spawn(argv, uid=uid, gid=gid, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_ready(proc, f"probe server in pod {pod.name}", timeout)
    return ProbeServer(pod=pod, proc=proc, targets=targets, udp_targets=udp_targets)


def probe_connect(src_pod: Pod, uid: int, gid: int, dst_ip: str, dst_port: int, *,
                  bind: tuple[str, int] | None = None, proto: str = "tcp", timeout: float = 3.0,
                  count: int = 1, nat_pods: Iterable[Pod] = (),
                  reply_timeout: float | None = None) -> Outcome | list[Outcome]:
    """Connect from ``src_pod`` as uid/gid to dst; an :class:`Outcome` (a list if count > 1).

    ``timeout`` bounds the TCP handshake (a dropped SYN is the outcome "timeout": not scaled).
    ``reply_timeout`` bounds the wait for the listener's answer (TCP once connected, UDP after
    the datagram), which depends on the probe server getting the CPU: default ``scaled(10)``.

    When a listener saw another peer than the client's own address, the conntrack tables of
    ``src_pod`` and ``nat_pods`` (where NAT rules may have translated it) tell whether NAT moved
    the source port: that goes into :attr:`Outcome.nat_peer`.
    """
    reply = scaled(10) if reply_timeout is None else reply_timeout
    argv = [PYTHON, "-S", staged(CLIENT_SCRIPT), "--dst", dst_ip, "--port", str(dst_port),
            "--timeout", str(timeout), "--reply-timeout", str(reply), "--count", str(count)]
    if bind:
        host = f"[{bind[0]}]" if ":" in bind[0] else bind[0]
        argv += ["--bind", f"{host}:{bind[1]}"]
    if proto == "udp":
        argv.append("--udp")
    elif proto != "tcp":
        raise ValueError(f"proto must be tcp or udp, not {proto!r}")
    started = time.monotonic()
    proc = src_pod.run(argv, uid=uid, gid=gid, timeout=(timeout + reply) * count + scaled(15))
    if proc.returncode != 0:
        raise KernelError(f"probe client in pod {src_pod.name} failed ({proc.returncode}): "
                          f"{proc.stderr.strip()[-500:]}")
    outcomes = [Outcome.from_record(json.loads(line)) for line in proc.stdout.splitlines() if line.strip()]
    if len(outcomes) != count:
        raise KernelError(f"probe client printed {len(outcomes)} results for {count} attempts "
                          f"after {time.monotonic() - started:.1f}s")
    if proto == "tcp":
        pods = [src_pod, *(p for p in nat_pods if p is not src_pod)]
        outcomes = [_with_nat_peer(out, pods) for out in outcomes]
    return outcomes[0] if count == 1 else outcomes


def _with_nat_peer(out: Outcome, pods: list[Pod]) -> Outcome:
    """Ask conntrack only when the listener's peer is not the client socket's own address: the
    flow (kept two minutes in TIME_WAIT) is still there right after the probe."""
    if out.seen_peer is None or out.client_local is None or out.client_peer is None:
        return out
    seen = (conntrack.plain(out.seen_peer[0]), out.seen_peer[1])
    if seen == (conntrack.plain(out.client_local[0]), out.client_local[1]):
        return out
    try:
        return replace(out, nat_peer=conntrack.translated_source(pods, out.client_local, out.client_peer))
    except KernelError as exc:   # the peer stays unexplained: the comparison reports it, with why
        return replace(out, raw={**out.raw, "nat_error": str(exc)})
