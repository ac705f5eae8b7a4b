"""One node agent in its own process, for the upgrade tests (killed with SIGKILL by them).

``python upgrade_agent.py ARGS_JSON``: ARGS_JSON holds ``pods`` (Pod objects, served by a FakeKube),
``cgroups`` (pod uid -> cgroup directory) and AgentConfig fields. The datapath version is the
process's: ``ISTIO_EBPF_DATAPATH_VARIANT`` in its environment (another pod_cfg layout), and
``ISTIO_EBPF_FAILPOINT`` kills it at one step of the switch. Prints one line
``READY {"switch": {...}, "version": ..., "pod_counters": ...}`` once the agent is ready, then runs until killed.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # tests/: support.fake_kube

from istio_ebpf_plugin import kube_api  # noqa: E402
from istio_ebpf_plugin.agent.node_agent import AgentConfig, NodeAgent  # noqa: E402
from support.fake_kube import FakeKube  # noqa: E402


def main() -> None:
    args = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    kube = FakeKube(args["config"]["node_name"])
    for pod in args["pods"]:
        kube.add(pod)
    kube_api.use_backend(kube)
    cgroups = args["cgroups"]
    agent = NodeAgent(AgentConfig(cgroup_for_uid=cgroups.get, **args["config"]))
    agent.start(serve=False)
    told = False
    while True:
        agent.step(0.05)
        if not told and agent.ready()[0]:
            dp = agent.datapath
            print("READY " + json.dumps({"switch": agent.switch, "version": getattr(dp, "version", None),
                                         "programs": dp.program_ids() if hasattr(dp, "program_ids") else {},
                                         "pod_counters": {str(h): c for h, c in dp.pod_counters().items()}}),
                  flush=True)
            told = True


if __name__ == "__main__":
    main()
