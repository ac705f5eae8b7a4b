"""BCC compiles in a worker process: the loading process adopts the pins and never maps LLVM."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from istio_ebpf_plugin.datapath import compile_worker
from istio_ebpf_plugin.datapath.loader import cleanup_pins
from istio_ebpf_plugin.errors import KernelError

pytestmark = pytest.mark.kernel

_LOAD = r"""
import json, sys
from istio_ebpf_plugin.datapath.loader import Datapath
dp = Datapath(mode="cookie", sockmap=True, pin_root=sys.argv[1]).load()
maps = open("/proc/self/maps").read()
rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:"))
print(json.dumps({"adopted": dp.adopted, "progs": sorted(dp.prog_fds), "ids": dp.program_ids(),
                  "rss_kib": rss, "llvm": "LLVM" in maps or "libbcc" in maps, "bcc": "bcc" in sys.modules}))
"""


def _load(root: str, **env: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _LOAD, root], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_compile_in_worker_then_adopt(pin_root) -> None:
    fresh = _load(pin_root)
    assert not fresh["adopted"] and {"ie_connect4", "ie_sockops", "ie_accel"} <= set(fresh["progs"])
    assert not fresh["llvm"] and not fresh["bcc"], "the loading process must never map clang/LLVM"
    assert fresh["rss_kib"] < 120 * 1024, fresh["rss_kib"]
    again = _load(pin_root)                      # a restart: same programs, adopted from the pins
    assert again["adopted"] and again["ids"] == fresh["ids"] and again["rss_kib"] < 120 * 1024
    cleanup_pins(pin_root)
    inproc = _load(pin_root, **{compile_worker.IN_PROCESS_ENV: "1"})
    assert not inproc["adopted"] and inproc["llvm"] and inproc["bcc"]
    # What the worker saves: LLVM's resident memory (measured, not assumed).
    assert inproc["rss_kib"] > fresh["rss_kib"] + 50 * 1024, (inproc["rss_kib"], fresh["rss_kib"])


def test_worker_errors_are_one_line_kernel_errors(pin_root) -> None:
    with pytest.raises(KernelError, match=r"bad map size MAX_PODS=0"):
        compile_worker.run("datapath", {"mode": "cookie", "sockmap": False, "pin_root": pin_root,
                                        "map_sizes": {"MAX_PODS": 0}})
    with pytest.raises(KernelError, match=r"exited with 2: usage"):
        compile_worker.run("nope", {})
    assert not os.path.exists(os.path.join(pin_root, "v1"))
