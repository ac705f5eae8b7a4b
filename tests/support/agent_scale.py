"""Measure the agent at scale: N pods' worth of map entries on one node.

Creates N network namespaces (``ie-<token>-<i>``, empty: the datapath keys a
pod by its netns cookie and attaches sk_lookup to it), a cgroup it owns, and
N injected-fixture pods in a FakeKube. A fresh agent process then loads the
datapath, reconciles, and reports: time to the first complete reconcile,
agent RSS, and map occupancy. A second agent (restart) adopts the pins and
reconciles against the same state. Everything is removed at the end.

    cd tests && ../.venv/bin/python -m support.agent_scale --pods 500
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import subprocess
import time
import uuid
from typing import Iterator
from pathlib import Path

from .fake_kube import FakeKube, fixture_pod
from istio_ebpf_plugin.datapath import userns
from istio_ebpf_plugin.agent.locate import PodLocation

NODE = "scale-node"


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class _NetnsLocator:
    def __init__(self, by_uid: dict[str, str]) -> None:
        self.by_uid = by_uid

    def locate(self, uid: str) -> PodLocation | None:
        path = self.by_uid.get(uid)
        return PodLocation("", path, 0, os.stat(path).st_ino) if path else None

    peek = locate     # pods that are not opted in: none here

    def batch(self) -> contextlib.nullcontext:
        return contextlib.nullcontext()

    def sandbox_started(self, where: PodLocation) -> float | None:
        return None

    def pod_pids(self, where: PodLocation) -> Iterator[int]:
        return iter(())    # the stand-in sandboxes' processes are not looked at here

    def addresses(self, where: PodLocation) -> tuple:
        return ()          # the pods' addresses come from their objects here

    def host_config(self, config, where: PodLocation):
        return userns.host_config(config, where.netns_path, [])   # netns of this user namespace


def _agent_run(pods: list[dict], by_uid: dict[str, str], pin_root: str, cgroup: str, mode: str,
               out: "multiprocessing.connection.Connection") -> None:
    from istio_ebpf_plugin import kube_api
    from istio_ebpf_plugin.agent.node_agent import AgentConfig, NodeAgent

    kube = FakeKube(NODE)
    for p in pods:
        kube.add(p)
    kube_api.use_backend(kube)
    rss_start = _rss_kib()
    t0 = time.monotonic()
    agent = NodeAgent(AgentConfig(node_name=NODE, mode_override=mode, pin_root=pin_root, cgroup_root=cgroup,
                                  watch_timeout=5, locator=_NetnsLocator(by_uid)))
    agent.start(serve=False)
    t_loaded = time.monotonic()
    while not agent.synced:
        agent.step(0.01)
    t_synced = time.monotonic()
    retired_at = agent.started_at + agent.switch["retired"] if "retired" in agent.switch else None
    rss_after_sync = _rss_kib()
    for _ in range(20):  # steady state a little while (watch idle, metrics refreshed)
        agent.step(0.05)
    import resource
    out.send({"load_seconds": round(t_loaded - t0, 3), "reconcile_seconds": round(t_synced - t_loaded, 3),
              "pods_managed": len(agent.reconciler.records), "adopted": bool(getattr(agent.datapath, "adopted", False)),
              "occupancy": agent.datapath.occupancy(), "rss_start_mib": round(rss_start / 1024, 1),
              "rss_after_reconcile_mib": round(rss_after_sync / 1024, 1),
              "rss_steady_mib": round(_rss_kib() / 1024, 1),
              "maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              "switch": agent.switch, "version": getattr(agent.datapath, "version", None),
              "retired_at": retired_at, "compiled": not agent.datapath.adopted})
    agent.watcher.stop(0.1)
    agent.datapath.close(cleanup=False)


def _prepare_run(pin_root: str, mode: str, out: "multiprocessing.connection.Connection") -> None:
    """``istio-ebpf agent --prepare`` (the DaemonSet's init container) in its own interpreter."""
    from istio_ebpf_plugin.agent.node_agent import AgentConfig, NodeAgent

    out.send(NodeAgent(AgentConfig(node_name=NODE, mode_override=mode, pin_root=pin_root)).prepare())


def _spawned(target, args: tuple, variant: str, timeout: float = 600) -> tuple[dict, float]:
    """Run ``target(*args, conn)`` in a fresh interpreter of build ``variant`` (read when the datapath
    modules load); its one report and the monotonic time the process was started."""
    from istio_ebpf_plugin.datapath.maps import VARIANT_ENV

    recv, send = multiprocessing.Pipe(duplex=False)
    saved = os.environ.get(VARIANT_ENV)
    os.environ[VARIANT_ENV] = variant
    t_spawn = time.monotonic()
    proc = multiprocessing.get_context("spawn").Process(target=target, args=(*args, send))
    try:
        proc.start()
    finally:
        if saved is None:
            os.environ.pop(VARIANT_ENV, None)
        else:
            os.environ[VARIANT_ENV] = saved
    try:
        if not recv.poll(timeout):
            raise RuntimeError(f"{target.__name__}: no report within {timeout:.0f} s")
        return recv.recv(), t_spawn
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()


def measure(n: int = 500, mode: str = "cookie", upgrade: bool = False, prepare: bool = True) -> dict:
    """Agent start-ups over n pods' entries: ``first_start`` (empty node), ``restart`` (same version,
    adopts the pins) and with ``upgrade`` also ``upgrade`` (another build variant, fresh interpreter:
    loads beside, fills, takes over, retires; its ``switch`` phases are the upgrade's timing) and
    ``rollback`` (the first build again)."""
    from istio_ebpf_plugin.datapath.loader import cleanup_pins
    from istio_ebpf_plugin.datapath.host import require_cgroup_v2_root as cgroup_v2_root

    token = uuid.uuid4().hex[:6]
    names = [f"ie-{token}-{i}" for i in range(n)]
    cgroup = cgroup_v2_root() / f"istio-ebpf-test-{token}"
    pin_root = f"/sys/fs/bpf/istio-ebpf-test-{token}"
    ctx = multiprocessing.get_context("fork")
    result: dict = {"pods": n, "mode": mode}
    try:
        cgroup.mkdir()
        t = time.monotonic()
        subprocess.run(["ip", "-batch", "-"], input="".join(f"netns add {x}\n" for x in names),
                       text=True, check=True)
        result["netns_create_seconds"] = round(time.monotonic() - t, 2)
        pods, by_uid = [], {}
        for i, x in enumerate(names):
            ips = [f"10.{200 + i // 65025}.{(i // 255) % 255}.{i % 255 + 1}", f"fd00:5ca1::{i + 1:x}"]
            p = fixture_pod("master/inject/traffic-annotations.yaml.injected", f"p{i}", NODE, ips,
                            annotations={"istio-ebpf.io/redirect": "ebpf"})
            pods.append(p)
            by_uid[p["metadata"]["uid"]] = f"/run/netns/{x}"
        for label in ("first_start", "restart") + (("upgrade", "rollback") if upgrade else ()):
            variant = "1" if label == "upgrade" else "0"
            if upgrade and prepare and label in ("upgrade", "rollback"):
                # as the DaemonSet's init container does: compile beside the running version first
                result[f"{label}_prepare"], _ = _spawned(_prepare_run, (pin_root, mode), variant)
            if upgrade:
                report, t_spawn = _spawned(_agent_run, (pods, by_uid, pin_root, str(cgroup), mode), variant)
            else:
                recv, send = ctx.Pipe(duplex=False)
                t_spawn = time.monotonic()
                proc = ctx.Process(target=_agent_run, args=(pods, by_uid, pin_root, str(cgroup), mode, send))
                proc.start()
                if not recv.poll(600):
                    proc.kill()
                    raise RuntimeError(f"{label}: agent did not report")
                report = recv.recv()
                proc.join(30)
            report["process_to_report_seconds"] = round(time.monotonic() - t_spawn, 3)
            if report.get("retired_at") is not None:
                # from the spawn of the agent's process (interpreter, imports, FakeKube) to retirement
                report["spawn_to_retired_seconds"] = round(report["retired_at"] - t_spawn, 3)
            result[label] = report
    finally:
        cleanup_pins(pin_root)
        subprocess.run(["ip", "-batch", "-"], input="".join(f"netns del {x}\n" for x in names),
                       text=True, capture_output=True)
        try:
            cgroup.rmdir()
        except OSError:
            pass
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pods", type=int, default=500)
    ap.add_argument("--mode", default="cookie", choices=["cookie", "podip"])
    ap.add_argument("--upgrade", action="store_true", help="also an upgrade to another build variant and back")
    ap.add_argument("--no-prepare", action="store_true",
                    help="upgrade without the init container's compile first (the agent compiles in its switch)")
    args = ap.parse_args()
    print(json.dumps(measure(args.pods, args.mode, args.upgrade, not args.no_prepare), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
