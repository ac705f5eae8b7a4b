"""``istio-ebpf agent``: the DaemonSet's entry point."""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import socket
import sys
import threading

from .. import kernel
from ..datapath.host import DEFAULT_PIN_ROOT
from ..errors import UsageError


def _port(value: str) -> int:
    if not value.isdigit() or not 0 <= int(value) < 65536:
        raise UsageError(f"invalid port {value!r}")
    return int(value)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("agent", help="run the node agent (DaemonSet)")
    p.add_argument("--node-name", default=os.environ.get("NODE_NAME"),
                   help="this node's name (default: $NODE_NAME, else the hostname)")
    p.add_argument("--mode", default=os.environ.get("ISTIO_EBPF_MODE", "auto"),
                   help="auto|cookie|podip|unsupported: operator override of the mode (default auto)")
    p.add_argument("--pin-root", default=DEFAULT_PIN_ROOT,
                   help="bpffs directory for pins (versioned subdirectories below it)")
    p.add_argument("--cgroup-root", default=os.environ.get("ISTIO_EBPF_CGROUP_ROOT"),
                   help="cgroup v2 directory the programs attach to (default: kubepods under the v2 mount)")
    p.add_argument("--proc-root", default=os.environ.get("ISTIO_EBPF_PROC_ROOT", "/proc"),
                   help="the host's /proc (/host/proc in the DaemonSet)")
    p.add_argument("--health-host", default="0.0.0.0")
    p.add_argument("--health-port", type=_port, default=15099, help="/healthz, /readyz, /metrics port")
    p.add_argument("--resync-seconds", type=float, default=300.0)
    p.add_argument("--sockmap", action="store_true", help="enable sockmap acceleration where it passes its self-test")
    p.add_argument("--cleanup", action="store_true", help="detach and unpin everything, remove the node label, exit")
    p.add_argument("--if-uninstalled", action="store_true",
                   help="with --cleanup (the preStop hook): only when the owning DaemonSet is gone or being "
                        "deleted, so a rolling update keeps capture up")
    p.add_argument("--prepare", action="store_true",
                   help="compile and pin this version's datapath beside the running one, attach nothing, exit "
                        "(the DaemonSet's init container: the agent that follows adopts it, so an upgrade's "
                        "switch does not wait for the compile)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=run)


def _kubepods(cgroup2: str) -> str:
    for name in ("kubepods.slice", "kubepods"):
        if os.path.isdir(os.path.join(cgroup2, name)):
            return os.path.join(cgroup2, name)
    raise UsageError(f"no kubepods cgroup under {cgroup2}: pass --cgroup-root")


def _uninstalling() -> bool:
    from .. import kube_api
    from ..errors import IstioEbpfError

    ns, name = os.environ.get("POD_NAMESPACE"), os.environ.get("DAEMONSET_NAME")
    if not ns or not name:
        raise UsageError("--if-uninstalled needs $POD_NAMESPACE and $DAEMONSET_NAME")
    try:
        ds = kube_api.get_daemonset(ns, name)
    except IstioEbpfError as exc:
        # Cannot tell: keep capturing (fail closed); a later uninstall step can still run --cleanup.
        print(f"istio-ebpf agent: cannot read DaemonSet {ns}/{name} ({exc}); keeping pins", file=sys.stderr)
        return False
    return ds is None or bool((ds.get("metadata") or {}).get("deletionTimestamp"))


def _large_allocations_unmapped() -> None:
    """glibc: allocations above 128 KiB stay in mappings of their own and go back on free. Its default
    raises that threshold after the first such free, and a node's pod list (MBs of JSON, every relist)
    then stays on the heap: 4 MiB more RSS with 500 pods."""
    try:
        ctypes.CDLL(None).mallopt(-3, 128 * 1024)     # M_MMAP_THRESHOLD
    except (OSError, AttributeError):                 # not glibc
        pass


def run(args: argparse.Namespace) -> int:
    from .mode import find_cgroup2
    from .node_agent import AgentConfig, NodeAgent, cleanup_node

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    mode = kernel.validate_mode(args.mode)
    node = args.node_name or socket.gethostname()
    if args.prepare and args.cleanup:
        raise UsageError("--prepare and --cleanup exclude each other")
    if args.cleanup:
        if args.if_uninstalled and not _uninstalling():
            print("istio-ebpf agent: DaemonSet still installed (rolling update?): pins kept")
            return 0
        print(f"istio-ebpf agent: {cleanup_node(node, args.pin_root)}")
        return 0
    if args.if_uninstalled:
        raise UsageError("--if-uninstalled only goes with --cleanup")
    cgroup_root = args.cgroup_root
    unsupported_reason = None
    if cgroup_root is None and args.prepare:
        cgroup_root = "/sys/fs/cgroup"    # nothing is attached: the kubepods cgroup is not needed
    if cgroup_root is None:
        cg2 = find_cgroup2()
        if cg2 is None:
            # Publish unsupported (label, reason annotation, Event) and stay up, so the label
            # install wrote from the kernel version is corrected and kept (issue 21 item 3).
            unsupported_reason = "cgroup_v2: no cgroup v2 mount on this node (cgroup v1 only)"
            cgroup_root = "/sys/fs/cgroup"
        else:
            cgroup_root = _kubepods(cg2)
    _large_allocations_unmapped()
    config = AgentConfig(node_name=node, mode_override=None if mode == "auto" else mode, pin_root=args.pin_root,
                         cgroup_root=cgroup_root, proc_root=args.proc_root, host=args.health_host,
                         port=args.health_port, resync_seconds=args.resync_seconds, sockmap=args.sockmap,
                         agent_namespace=os.environ.get("POD_NAMESPACE") or None,
                         unsupported_reason=unsupported_reason)
    if args.prepare:
        done = NodeAgent(config).prepare()
        what = "compiled and pinned" if done["compiled"] else "already pinned"
        print(f"istio-ebpf agent: mode {done['mode']}" + (f", datapath {done['version']} {what}" if done["version"]
              else ", nothing to prepare") + f" in {done['seconds']:.2f} s; nothing attached", flush=True)
        return 0
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    NodeAgent(config).run(stop)
    return 0
