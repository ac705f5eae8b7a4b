"""Pod start-up on a real node, opted-in (eBPF) pods against stock Istio pods: ``make bench-pods``.

Brings up the node e2e's cluster (control plane, kubelet + containerd node, the agent installed
with ``istio-ebpf install``), then runs :mod:`istio_ebpf_plugin.bench.pod_startup` with the two
pods of the node e2e: the opted-in pod (Istio's injection plus the ``ebpf`` template, executed by Go's
text/template) and the same pod as stock Istio injects it, its istio-init loading Istio's rules.
Prints the figures with their 95% intervals and writes ``{"pod_ready_ms": ...}`` for
``istio-ebpf bench --merge-meta``.

    cd tests && ../.venv/bin/python -m support.node_bench --rounds 20 --json ../out/pod-startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from istio_ebpf_plugin.bench import pod_startup, report

from .node_scenario import (HEALTH, agent_pod, app_namespace, cli, cluster, injected_client_pod, injector_configmap,
                            iptables_rules, pod_pid, pod_ready, stock_istio_pod, wait)


def run(env: dict[str, Any], *, rounds: int, warmup_rounds: int = 1,
        progress: Callable[[str], None] = print) -> dict[str, Any]:
    """The measurement on a cluster whose agent is installed and whose namespace ``env["ns"]`` is ready."""
    api, lab, images, ns = env["api"], env["lab"], env["images"], env["ns"]
    cm = api.get("/api/v1/namespaces/istio-system/configmaps/istio-sidecar-injector")
    specs = {"ebpf": lambda name: injected_client_pod(ns, name, images, cm, env["render"]),
             "iptables": lambda name: stock_istio_pod(ns, name, images)}
    rules: dict[str, int] = {}
    inits = {v: [c["name"] for c in spec("x")["spec"].get("initContainers") or []] for v, spec in specs.items()}

    def on_ready(variant: str, pod: dict) -> dict:
        # Evidence, once per variant (after the pod's time is taken): the rules in its network namespace.
        if variant not in rules:
            rules[variant] = iptables_rules(pod_pid(lab, ns, pod["metadata"]["name"], "hello"))
        return {}

    doc = pod_startup.measure(pod_startup.Api(env["cp"]), ns, specs, rounds=rounds, warmup_rounds=warmup_rounds,
                              metrics_url=f"{HEALTH}/metrics", on_ready=on_ready, progress=progress)
    node = (api.node(lab.node_name) or {}).get("status", {}).get("nodeInfo", {})
    doc.update(iptables_rules=rules, init_containers=inits,
               node={"kubelet": node.get("kubeletVersion"), "runtime": node.get("containerRuntimeVersion"),
                     "kernel": platform.release(), "cpus": os.cpu_count()})
    return doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20, help="paired rounds (one pod of each variant each)")
    ap.add_argument("--warmup", type=int, default=1, help="rounds not counted")
    ap.add_argument("--json", metavar="FILE", help="write {\"pod_ready_ms\": ...} here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="istio-ebpf-node-bench-") as tmp, cluster(Path(tmp)) as env:
        api = env["api"]
        injector_configmap(api)
        out = cli(env["kubeconfig"], "install", "--timeout", "300")
        if out.returncode != 0:
            print(out.stderr[-2000:], file=sys.stderr)
            return 1
        wait(lambda: (p := agent_pod(api)) and pod_ready(p), 240, "agent pod Ready")
        app_namespace(api, env["ns"])
        doc = run(env, rounds=args.rounds, warmup_rounds=args.warmup,
                  progress=lambda s: print(s, file=sys.stderr, flush=True))
    doc["command"] = " ".join(["python -m support.node_bench", *(argv if argv is not None else sys.argv[1:])])
    print("\n".join(report.pod_startup_lines(doc)))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"pod_ready_ms": doc}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
