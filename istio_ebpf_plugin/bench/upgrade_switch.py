"""``istio-ebpf bench --agent``: one lab switch N -> N+1 under load (the lab's upgrade runner).

Two lab pods with real Envoys, HTTP and DNS from the client's app through both sidecars all
along (:mod:`..harness.upgrade_lab`); agent N runs, then the rollout's steps: N is killed (pins
stay), ``agent --prepare`` of N+1 compiles beside it (the DaemonSet's init container), the N+1
agent process starts and takes every hook over. Figures in ``meta``:

* ``upgrade_switch_s``: from the N+1 agent process's start to the old version's retirement;
* ``upgrade_prepare_s``: the prepare step (compile beside the running version; not in the switch);
* ``upgrade_prepare_to_retired_s``: from the prepare step's process start (as from the new pod's
  start, without the sandbox) to the old version's retirement;
* ``upgrade_failed``: failed HTTP requests and DNS queries of the whole run;
* ``upgrade_uncaptured``: SYNs with the app's TOS at the server (they went around Envoy);
* ``upgrade_requests``, ``upgrade_switch_phases`` (seconds from the agent's ``start()``; ``exec``:
  process start -> ``start()``), ``upgrade_problems`` (what the kernel ran otherwise than only N+1).
"""

from __future__ import annotations

from typing import Callable

from ..datapath.loader import cleanup_pins
from ..harness import names
from ..harness.upgrade_lab import Step, UpgradeLab


def measure(mode: str, progress: Callable[[str], None] = lambda _: None) -> dict:
    token = names.new_token()
    pin_root = str(names.BPFFS_ROOT / f"{names.BPF_PIN_PREFIX}-upgrade-{token}")
    log = names.TMP_ROOT / f"{names.TMP_PREFIX}{token}-upgrade.log"
    try:
        with UpgradeLab(mode, pin_root, log) as lab:
            r = lab.run([Step(0), Step(1, prepare=True)], progress=progress)
    finally:
        cleanup_pins(pin_root)
    log.unlink()      # kept when the run failed: it holds the agents' logs
    (switch,) = r["switches"]
    load = r["load"]
    return {"upgrade_switch_s": switch["process_to_retired_s"], "upgrade_failed": r["failed"],
            "upgrade_uncaptured": r["uncaptured"], "upgrade_prepare_s": (switch["prepare"] or {}).get("seconds"),
            "upgrade_prepare_to_retired_s": switch["prepare_to_retired_s"],
            "upgrade_requests": {"http": load.get("requests"), "dns": load.get("dns")},
            "upgrade_switch_phases": switch["switch"], "upgrade_mode": mode, "upgrade_problems": switch["problems"]}
