"""``istio-ebpf bench --scale 1,100,500``: the capture's cost and the agent with many pods on one node.

Two measurements per pod count, both against stand-in sandboxes (:mod:`.sandboxes`: per pod a
cgroup in kubelet's layout, a network namespace and three processes):

* **Kernel cost per connection.** One benchmark node per count, each with its own datapath
  holding the benchmark's two pods (client and server, capture-only path, churn workload) plus
  the entries of ``count - 2`` more pods, written by ``Datapath.add_pod`` as the agent writes
  them (2 addresses, 7 ports, 3 CIDRs each). Paired rounds: in every round each count runs once,
  back to back, in a rotated order; the per-round ratio of the programs' run time per connection
  (``BPF_ENABLE_STATS``) to the smallest count's is summarised as a median with a bootstrap
  interval (:mod:`.stats`). The smallest count is the benchmark's own two pods.
* **The agent.** A real ``istio-ebpf agent`` process against a real kube-apiserver
  (:mod:`..harness.control_plane`) holding ``count`` opted-in Pod objects bound to a node of their
  own, with running status and addresses, shaped like Istio 1.14's injection. Per count: a first
  start (no pins: every entry written, an sk_lookup link per pod), a restart over the pins (what an
  upgrade or a crash costs) and a periodic relist; the full resync's duration is the agent's own
  ``istio_ebpf_resync_seconds``, the RSS its ``VmRSS`` (and ``VmHWM``, the peak).

JSON (``meta.scale``)::

    {"counts": [1, 100, 500], "processes_per_pod": 3, "path": "capture-only", "workload": "conn-1k-c16",
     "rounds": N, "rounds_flagged": k, "loadavg": [start, end],
     "kernel": {"<count>": {"ns_per_connection", "ns_per_connection_ci", "ratio", "ratio_ci",
                            "ratio_spread", "entries": {map: n}}},
     "agent": {"<count>": {"resync_s": {"first_start", "restart", "relist"}, "resync_s_max",
                           "rss_mib": {"first_start", "restart", "relist"}, "rss_mib_max", "hwm_mib",
                           "pods_managed"}}}
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from .. import OPT_IN_ANNOTATION, OPT_IN_VALUE, PROJECT_ROOT
from ..agent.pod_spec import pod_config
from ..datapath.loader import cleanup_pins
from ..errors import KernelError
from ..timeouts import scaled
from ..harness import control_plane, names
from ..harness.ports import free_port
from ..harness.node import Node
from . import bpf_cost, forwarder, stats, topology, wrk
from .sandboxes import Sandboxes, pod_ips

DEFAULT_COUNTS = (1, 100, 500)
PATH = "capture-only"
WORKLOAD = "conn-1k-c16"
NAMESPACE = "scale"
AGENT_TIMEOUT_S = 300.0
RELIST_SECONDS = 5.0       # the restarted agent's relist period: one periodic relist measured

Progress = Callable[[str], None]


# ---------------------------------------------------------------------- the pods' API objects
def pod_object(index: int, node: str) -> dict[str, Any]:
    """An opted-in pod the way Istio 1.14's injector writes it (init args, proxy env, volumes),
    with excluded ports and CIDRs: 2 addresses, 7 ports, 3 CIDRs in the maps."""
    proxy_env = [{"name": k, "value": v} for k, v in (
        ("JWT_POLICY", "third-party-jwt"), ("PILOT_CERT_PROVIDER", "istiod"),
        ("CA_ADDR", "istiod.istio-system.svc:15012"), ("PROXY_CONFIG", "{}\n"),
        ("ISTIO_META_POD_PORTS", '[{"containerPort":8080,"protocol":"TCP"}]'),
        ("ISTIO_META_APP_CONTAINERS", "app"), ("ISTIO_META_CLUSTER_ID", "Kubernetes"),
        ("ISTIO_META_INTERCEPTION_MODE", "REDIRECT"), ("ISTIO_META_MESH_ID", "cluster.local"),
        ("TRUST_DOMAIN", "cluster.local"))]
    proxy_env += [{"name": k, "valueFrom": {"fieldRef": {"fieldPath": f}}} for k, f in (
        ("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace"),
        ("INSTANCE_IP", "status.podIP"), ("SERVICE_ACCOUNT", "spec.serviceAccountName"),
        ("HOST_IP", "status.hostIP"))]
    mounts = [("istiod-ca-cert", "/var/run/secrets/istio"), ("istio-data", "/var/lib/istio/data"),
              ("istio-envoy", "/etc/istio/proxy"), ("istio-token", "/var/run/secrets/tokens"),
              ("istio-podinfo", "/etc/istio/pod")]
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"p{index}", "namespace": NAMESPACE, "labels": {"app": "scale"},
                     "annotations": {
                         OPT_IN_ANNOTATION: OPT_IN_VALUE,
                         "sidecar.istio.io/status": json.dumps({
                             "initContainers": ["istio-init"], "containers": ["istio-proxy"],
                             "volumes": [m[0] for m in mounts], "imagePullSecrets": None}),
                         "traffic.sidecar.istio.io/excludeOutboundPorts": "7,8,9",
                         "traffic.sidecar.istio.io/excludeInboundPorts": "10,11",
                         "traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.96.0.0/12,192.168.0.0/16",
                         "traffic.sidecar.istio.io/includeOutboundIPRanges": "*",
                         "prometheus.io/path": "/stats/prometheus", "prometheus.io/port": "15020",
                         "prometheus.io/scrape": "true"}},
        "spec": {
            "nodeName": node, "automountServiceAccountToken": False, "terminationGracePeriodSeconds": 1,
            "initContainers": [{
                "name": "istio-init", "image": "docker.io/istio/proxyv2:1.14.0",
                "args": ["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT",
                         "-i", "*", "-x", "10.96.0.0/12,192.168.0.0/16", "-b", "*", "-d", "15090,15021,15020,10,11",
                         "-o", "7,8,9"],
                "securityContext": {"capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
                                    "runAsUser": 0, "runAsNonRoot": False}}],
            "containers": [
                {"name": "app", "image": "docker.io/library/app:1", "ports": [{"containerPort": 8080}]},
                {"name": "istio-proxy", "image": "docker.io/istio/proxyv2:1.14.0",
                 "args": ["proxy", "sidecar", "--domain", "$(POD_NAMESPACE).svc.cluster.local",
                          "--proxyLogLevel=warning", "--proxyComponentLogLevel=misc:error",
                          "--log_output_level=default:info", "--concurrency", "2"],
                 "env": proxy_env,
                 "ports": [{"containerPort": 15090, "name": "http-envoy-prom", "protocol": "TCP"}],
                 "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": 15021},
                                    "initialDelaySeconds": 1, "periodSeconds": 2, "failureThreshold": 30},
                 "securityContext": {"runAsUser": 1337, "runAsGroup": 1337, "runAsNonRoot": True,
                                     "readOnlyRootFilesystem": True, "privileged": False},
                 "volumeMounts": [{"name": n, "mountPath": p} for n, p in mounts]}],
            "volumes": [{"name": "istiod-ca-cert", "configMap": {"name": "istio-ca-root-cert"}},
                        {"name": "istio-data", "emptyDir": {}},
                        {"name": "istio-envoy", "emptyDir": {"medium": "Memory"}},
                        {"name": "istio-token", "projected": {"sources": [{"serviceAccountToken": {
                            "audience": "istio-ca", "expirationSeconds": 43200, "path": "istio-token"}}]}},
                        {"name": "istio-podinfo", "downwardAPI": {"items": [
                            {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
                            {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}]}}]},
        "status": {"phase": "Running", "podIP": pod_ips(index)[0], "podIPs": [{"ip": ip} for ip in pod_ips(index)]},
    }


# ---------------------------------------------------------------------- kernel cost
def _sample(nodes: list[Node]) -> stats.CpuSample:
    return stats.sample([n.parent_cgroup for n in nodes])


def kernel_cost(counts: tuple[int, ...], fleet: Sandboxes, *, rounds: int, duration: float, mode: str,
                progress: Progress) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Per count: run time of the capture programs per connection, and its ratio to counts[0]."""
    from .runner import PAYLOADS, WORKLOADS, _measure, _rotated

    workload = next(w for w in WORKLOADS if w.name == WORKLOAD)
    nodes: dict[int, Node] = {}
    pods: dict[int, topology.VariantPods] = {}
    built: list[dict[tuple[str, str], topology.VariantPods]] = []
    per_round: dict[int, list[float | None]] = {c: [] for c in counts}
    cond_rows: list[dict[str, Any]] = []
    try:
        with bpf_cost.StatsSwitch() as switch:
            if switch.fd is None:
                raise KernelError(switch.error or "BPF_ENABLE_STATS refused")
            for c in counts:
                node = nodes[c] = Node().start()
                vps = topology.build(node, ("ebpf",), PAYLOADS, mode=mode, paths=(PATH,),
                                     pin_prefix=f"{names.BPFFS_ROOT}/{names.BPF_PIN_PREFIX}-scale-{node.token}")
                built.append(vps)
                vp = pods[c] = vps[(PATH, "ebpf")]
                if vp.error is not None:
                    raise KernelError(vp.error)
                start = time.monotonic()
                for s in fleet.pods[:max(0, c - 2)]:
                    vp.datapath.add_pod(s.netns_path, pod_config(pod_object(s.index, "scale")), str(s.cgroup))
                progress(f"scale: node with {c} pods' entries ready ({time.monotonic() - start:.1f} s of add_pod)")
            script = wrk.write_script(nodes[counts[0]].workdir)
            for c in counts:       # warm-up
                wrk.run(pods[c].client, pods[c].url(PAYLOADS.index(1024)), connections=4, duration_s=1.0,
                        script=script)
            for rnd in range(rounds):
                before = _sample(list(nodes.values()))
                for c in _rotated(list(counts), rnd):
                    dp = pods[c].datapath
                    snap = bpf_cost.snapshot(dp)
                    m = _measure(pods[c], workload, duration, script)
                    cost = bpf_cost.Cost.between(snap, bpf_cost.snapshot(dp)).per_connection(m["requests"])
                    per_round[c].append(cost["capture_ns"] if cost and not m["errors"] else None)
                    progress(f"scale: round {rnd + 1}/{rounds} {c:4d} pods {m['rps']:8.0f} rps "
                             f"{per_round[c][-1] or 0:8.0f} ns/conn")
                cond = stats.conditions(before, _sample(list(nodes.values())))
                cond_rows.append({"round": rnd, "conditions": cond})
                if cond["flagged"]:
                    progress(f"  round flagged: {cond['why']}")
            entries = {c: pods[c].datapath.occupancy() for c in counts}
    finally:
        for vps in built:
            topology.teardown(vps)
        for node in nodes.values():
            node.close()
    base = per_round[counts[0]]
    out: dict[str, Any] = {}
    for c in counts:
        vals = [v for v in per_round[c] if v is not None]
        ratios = [v / b for v, b in zip(per_round[c], base, strict=True) if v is not None and b]
        summary = stats.summarize(ratios)
        ci = stats.bootstrap_ci(vals)
        out[str(c)] = {"ns_per_connection": round(statistics.median(vals), 1) if vals else None,
                       "ns_per_connection_ci": [round(x, 1) for x in ci] if ci else None,
                       "ratio": round(summary.median, 3) if summary else None,
                       "ratio_ci": [round(x, 3) for x in summary.ci] if summary and summary.ci else None,
                       "ratio_spread": [round(summary.lo, 3), round(summary.hi, 3)] if summary else None,
                       "rounds_used": len(vals),
                       "entries": {k: v for k, v in entries[c].items() if k.startswith("pod_")}}
    return out, cond_rows


# ---------------------------------------------------------------------- the agent
class AgentProcess:
    """``istio-ebpf agent`` as a process of its own, its health port on loopback."""

    def __init__(self, *, node: str, pin_root: str, cgroup_root: Path, kubeconfig: Path, log: Path,
                 resync_seconds: float) -> None:
        self.port = free_port()
        argv = [str(PROJECT_ROOT / ".venv" / "bin" / "istio-ebpf"), "agent", "--node-name", node,
                "--pin-root", pin_root, "--cgroup-root", str(cgroup_root), "--health-host", "127.0.0.1",
                "--health-port", str(self.port), "--resync-seconds", str(resync_seconds)]
        self._log = open(log, "a")
        self.log_path = log
        self.proc = subprocess.Popen(argv, env={**os.environ, "KUBECONFIG": str(kubeconfig)},
                                     stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def metrics(self) -> dict[str, float]:
        """Unlabelled samples of /metrics (name -> value); empty while it does not answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except (OSError, urllib.error.URLError):
            return {}
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, _, value = line.partition(" ")
                out[name] = float(value)
        return out

    def wait(self, cond: Callable[[dict[str, float]], bool], what: str) -> dict[str, float]:
        deadline = time.monotonic() + scaled(AGENT_TIMEOUT_S)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise KernelError(f"agent exited ({self.proc.returncode}): {self.log_path.read_text()[-400:]}")
            m = self.metrics()
            if m and cond(m):
                return m
            time.sleep(0.1)
        raise KernelError(f"agent: no {what} after {AGENT_TIMEOUT_S:.0f} s; see {self.log_path}")

    def memory_mib(self) -> tuple[float, float]:
        """(VmRSS, VmHWM) in MiB."""
        vals = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                vals[key] = int(rest.split()[0]) / 1024
        return round(vals["VmRSS"], 1), round(vals["VmHWM"], 1)

    def stop(self) -> None:
        """SIGTERM: the agent leaves its pins in place."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


def _resync(m: dict[str, float]) -> tuple[int, float]:
    return int(m.get("istio_ebpf_resync_seconds_count", 0)), m.get("istio_ebpf_resync_seconds_sum", 0.0)


def _create_pods(cp: control_plane.ControlPlane, node: str, indexes: range) -> list[str]:
    """POST the pods, then their running status with addresses (no kubelet here); their UIDs."""
    def one(index: int) -> str:
        pod = pod_object(index, node)
        name = pod["metadata"]["name"]
        status, out = cp.request("POST", f"/api/v1/namespaces/{NAMESPACE}/pods",
                                 {k: v for k, v in pod.items() if k != "status"})
        if status != 201:
            raise KernelError(f"creating pod {name}: HTTP {status} {out.get('message')}")
        uid = out["metadata"]["uid"]
        status, out = cp.request("PATCH", f"/api/v1/namespaces/{NAMESPACE}/pods/{name}/status",
                                 {"status": pod["status"]}, content_type="application/merge-patch+json")
        if status != 200:
            raise KernelError(f"pod {name} status: HTTP {status} {out.get('message')}")
        return uid

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, indexes))


def agent_at_scale(counts: tuple[int, ...], fleet: Sandboxes, workdir: Path,
                   progress: Progress) -> dict[str, Any]:
    """Per count: the agent's full resync (first start, restart over pins, relist) and memory."""
    out: dict[str, Any] = {}
    cp = control_plane.ControlPlane.create(prefix=f"{names.TMP_PREFIX}{fleet.token}-kube-")
    try:
        cp.start()
        node = f"ie-scale-{fleet.token}"
        for path, body in (("/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}}),
                           ("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                   "metadata": {"name": NAMESPACE}})):
            status, resp = cp.request("POST", path, body)
            if status != 201:
                raise KernelError(f"POST {path}: HTTP {status} {resp.get('message')}")
        deadline = time.monotonic() + scaled(120)
        while not cp.default_service_account_ready(NAMESPACE):
            if time.monotonic() > deadline:
                raise KernelError("the scale namespace's default ServiceAccount has no token secret")
            time.sleep(0.5)
        pin_root = f"{names.BPFFS_ROOT}/{names.BPF_PIN_PREFIX}-scale-agent-{fleet.token}"
        for c in counts:
            start = time.monotonic()
            fleet.grow(_create_pods(cp, node, range(len(fleet.pods), c)))
            progress(f"scale: {c} pods in the API and their sandboxes ({time.monotonic() - start:.1f} s)")
            row: dict[str, Any] = {"resync_s": {}, "rss_mib": {}, "hwm_mib": 0.0}
            cleanup_pins(pin_root)
            for phase in ("first_start", "restart"):
                agent = AgentProcess(node=node, pin_root=pin_root, cgroup_root=fleet.root,
                                     kubeconfig=cp.kubeconfig, log=workdir / f"agent-{c}.log",
                                     resync_seconds=RELIST_SECONDS if phase == "restart" else 3600)
                try:
                    m = agent.wait(lambda m, c=c: _resync(m)[0] >= 1 and m.get("istio_ebpf_pods_managed") == c,
                                   f"resync of {c} pods")
                    row["resync_s"][phase] = round(_resync(m)[1], 3)
                    row["rss_mib"][phase] = agent.memory_mib()[0]
                    if phase == "restart":
                        count, total = _resync(m)
                        m = agent.wait(lambda m, n=count: _resync(m)[0] > n, "periodic relist")
                        row["resync_s"]["relist"] = round((_resync(m)[1] - total) / (_resync(m)[0] - count), 3)
                        row["rss_mib"]["relist"] = agent.memory_mib()[0]
                    row["hwm_mib"] = max(row["hwm_mib"], agent.memory_mib()[1])
                    row["pods_managed"] = int(m.get("istio_ebpf_pods_managed", 0))
                finally:
                    agent.stop()
            row["resync_s_max"] = max(row["resync_s"].values())
            row["rss_mib_max"] = max(row["rss_mib"].values())
            progress(f"scale: agent with {c} pods: resync {row['resync_s']} s, RSS {row['rss_mib']} MiB "
                     f"(peak {row['hwm_mib']} MiB)")
            out[str(c)] = row
        cleanup_pins(pin_root)
    finally:
        cp.stop()
    return out


# ---------------------------------------------------------------------- both
def measure(counts: tuple[int, ...] = DEFAULT_COUNTS, *, rounds: int = 12, duration: float = 1.0,
            mode: str = "cookie", processes_per_pod: int = 3, progress: Progress = lambda s: None) -> dict[str, Any]:
    counts = tuple(sorted(set(counts)))
    token = names.new_token()
    names.created_tokens.add(token)
    workdir = names.TMP_ROOT / f"{names.TMP_PREFIX}{token}-scale"
    workdir.mkdir(mode=0o755)
    (workdir / "owner.pid").write_text(f"{os.getpid()}\n")    # harness-cleanup spares a live run
    doc: dict[str, Any] = {"counts": list(counts), "processes_per_pod": processes_per_pod, "path": PATH,
                           "workload": WORKLOAD, "rounds": rounds, "mode": mode,
                           "loadavg": [os.getloadavg()[0]]}
    started = time.monotonic()
    try:
        # Each pod's last process listens on 15001/15006 as UID 1337, as Envoy does: the agent
        # registers that listener for sk_lookup when it adds the pod.
        with Sandboxes(token, processes_per_pod, sidecar=[forwarder.binary()]) as fleet:
            # The agent first: the sandboxes are named after the Pod objects' UIDs, made as it goes.
            doc["agent"] = agent_at_scale(counts, fleet, workdir, progress)
            doc["kernel"], rows = kernel_cost(counts, fleet, rounds=rounds, duration=duration, mode=mode,
                                              progress=progress)
            doc["rounds_flagged"] = sum(1 for r in rows if r["conditions"]["flagged"])
            doc["round_conditions"] = rows
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        names.created_tokens.discard(token)
    doc["loadavg"].append(os.getloadavg()[0])
    doc["elapsed_s"] = round(time.monotonic() - started, 1)
    return doc
