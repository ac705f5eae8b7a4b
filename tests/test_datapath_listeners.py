"""Envoy's 15006 listener is found with exactly the agent pod's capabilities (manifests/daemonset.yaml).

Found by the node e2e: the agent pod (capabilities dropped to a list, unlike a root host process)
got EACCES listing Envoy's /proc/<pid>/fd (uid 1337, mode 0500) and silently never registered the
listener, so inbound was refused in pod-IP mode. Here a real process as uid 1337 listens on 15006
in its own network namespace; a child runs the product's find_listeners after capset() to the
manifest's capabilities (with and without DAC_READ_SEARCH).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from support.node_lab_plugin import CAP_NUMBERS
from ruamel.yaml import YAML

from istio_ebpf_plugin import PROJECT_ROOT

pytestmark = pytest.mark.kernel

# The "sidecar": listens on 0.0.0.0:15006 inside its private netns, says so, waits to be killed.
SIDECAR = """
import socket, sys, time
s = socket.socket(); s.bind(("0.0.0.0", 15006)); s.listen(); print("listening", flush=True); time.sleep(600)
"""

# The "agent": drops to the given capabilities (uid stays 0, as in the pod), then asks the product.
AGENT = """
import ctypes, json, logging, sys
caps = json.loads(sys.argv[1]); pid = int(sys.argv[2])
class Hdr(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
class Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]
mask = sum(1 << n for n in caps)
data = (Data * 2)(Data(mask & 0xffffffff, mask & 0xffffffff, 0), Data(mask >> 32, mask >> 32, 0))
libc = ctypes.CDLL(None, use_errno=True)
assert libc.capset(ctypes.byref(Hdr(0x20080522, 0)), data) == 0, ctypes.get_errno()
logging.basicConfig(stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
from istio_ebpf_plugin.datapath.listeners import find_listeners
import os
found = []
for _ in range(3):    # the agent's refresh retries: a failure is logged once, not per try
    for family, fd in find_listeners(f"/proc/{pid}/ns/net", 15006):
        found.append(family)
        os.close(fd)
print(json.dumps(found))
"""


def _manifest_caps() -> list[str]:
    ds = next(d for d in YAML(typ="safe").load_all((PROJECT_ROOT / "manifests" / "daemonset.yaml").read_text())
              if d and d.get("kind") == "DaemonSet")
    (agent,) = ds["spec"]["template"]["spec"]["containers"]
    return agent["securityContext"]["capabilities"]["add"]


def _permitted() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("CapPrm:"):
            return int(line.split()[1], 16)
    return 0


@pytest.fixture
def sidecar():
    proc = subprocess.Popen(["unshare", "--net", "--", "setpriv", "--reuid", "1337", "--regid", "1337",
                             "--clear-groups", sys.executable, "-c", SIDECAR], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "listening"
        # setpriv execs python in place: proc.pid is the listener, in its own netns, as uid 1337
        assert os.stat(f"/proc/{proc.pid}/fd").st_uid == 1337
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def _agent(caps: list[str], pid: int) -> tuple[list[int], list[str]]:
    numbers = [CAP_NUMBERS[c] for c in caps if _permitted() >> CAP_NUMBERS[c] & 1]   # e.g. no SYS_RESOURCE here
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", AGENT, json.dumps(numbers), str(pid)], capture_output=True,
                         text=True, cwd=PROJECT_ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - start < 30
    return json.loads(out.stdout), [line for line in out.stderr.splitlines() if "cannot register" in line]


def test_manifest_capabilities_find_envoys_listener(sidecar):
    caps = _manifest_caps()
    assert "DAC_READ_SEARCH" in caps and "SYS_PTRACE" in caps
    found, warnings = _agent(caps, sidecar)
    assert found == [2, 2, 2]     # AF_INET, once per try
    assert warnings == []


def test_without_dac_read_search_the_failure_is_logged_once(sidecar):
    caps = [c for c in _manifest_caps() if c != "DAC_READ_SEARCH"]
    found, warnings = _agent(caps, sidecar)
    assert found == []
    assert len(warnings) == 1, warnings
    assert f"/proc/{sidecar}/fd" in warnings[0] and "Permission denied" in warnings[0]
