"""One node agent process on lab pods: the upgrade lab's agent (``harness/upgrade_lab.py``).

``python -m istio_ebpf_plugin.harness.lab_agent ARGS_JSON``. ARGS_JSON holds ``pods`` (the lab
pods' API objects, served by :class:`.static_pods.StaticPods`), ``cgroups`` (pod uid -> the lab
pod's cgroup directory), ``config`` (AgentConfig fields) and ``prepare`` (run ``agent --prepare``
instead: compile and pin beside the running version, attach nothing, exit). The datapath version
is the process's own: ``ISTIO_EBPF_DATAPATH_VARIANT`` in its environment; ``ISTIO_EBPF_FAILPOINT``
kills it at one step of the switch.

Prints one line: ``PREPARED {...}`` (prepare), else ``READY {"switch", "version", "programs",
"compiled", "pod_counters", "retired_at"}`` once the agent is ready (``retired_at``:
CLOCK_MONOTONIC, the clock of every process here, when the old version was retired), then runs
until killed, as a DaemonSet pod does.
"""

from __future__ import annotations

import json
import logging
import sys


def main() -> None:
    args = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    from .. import kube_api
    from ..agent.node_agent import AgentConfig, NodeAgent
    from .static_pods import StaticPods

    config = AgentConfig(cgroup_for_uid=args["cgroups"].get, **args["config"])
    kube_api.use_backend(StaticPods(config.node_name, args["pods"]))
    agent = NodeAgent(config)
    if args.get("prepare"):
        print("PREPARED " + json.dumps(agent.prepare()), flush=True)
        return
    agent.start(serve=False)
    told = False
    while True:
        agent.step(0.05)
        if not told and agent.ready()[0]:
            dp = agent.datapath
            retired = agent.switch.get("retired")
            print("READY " + json.dumps({
                "switch": agent.switch, "version": getattr(dp, "version", None),
                "programs": dp.program_ids() if hasattr(dp, "program_ids") else {},
                "compiled": not getattr(dp, "adopted", True),
                "pod_counters": {str(h): c for h, c in dp.pod_counters().items()} if hasattr(dp, "pod_counters")
                else {},
                "retired_at": agent.started_at + retired if retired is not None else None}), flush=True)
            told = True


if __name__ == "__main__":
    main()
