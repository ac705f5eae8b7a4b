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


# Istio's istio-validation beside Envoy: loopback-bound 15006 sockets that never take a pod-IP connection.
LOOPBACK_AND_WILDCARD = """
import socket, time
socks = []
for family, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1"), (socket.AF_INET, "0.0.0.0"),
                     (socket.AF_INET6, "::")):
    s = socket.socket(family)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)   # both at once here; in a pod, one after the other
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((addr, 15006)); s.listen(); socks.append(s)
print("listening", flush=True); time.sleep(600)
"""


@pytest.fixture
def validation_beside_envoy():
    proc = subprocess.Popen(["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$0" -c "$1"',
                             sys.executable, LOOPBACK_AND_WILDCARD], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "listening"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_loopback_bound_listeners_are_not_registered(validation_beside_envoy):
    """Found by the node e2e (pod-IP mode): istio-validation's 127.0.0.1:15006 socket was registered
    as the pod's inbound listener; it closed when the init container exited and the pod, marked as
    registered, waited for the next full refresh: inbound refused up to 5 s after Ready. Only sockets
    that take connections to the pod's IPs (wildcard here) are found, from sock_diag and from /proc."""
    import socket
    from pathlib import Path

    from istio_ebpf_plugin.datapath import listeners

    pid = validation_beside_envoy
    found = []
    for family, fd in listeners.find_listeners(f"/proc/{pid}/ns/net", 15006):
        with socket.socket(fileno=fd) as s:
            found.append((family, s.getsockname()[0]))
    assert sorted(found) == [(socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")]
    diag = listeners._diag_listening_inodes(f"/proc/{pid}/ns/net", 15006)
    assert diag == listeners._listening_inodes(Path(f"/proc/{pid}"), 15006)
    assert sorted(diag.values()) == [socket.AF_INET, socket.AF_INET6]


# A listener as istio-validation's (127.0.0.1) or Envoy's (0.0.0.0) 15006: says READY, waits.
LISTENER = """
import socket, sys, time
s = socket.socket(); s.bind((sys.argv[1], 15006)); s.listen(); print("READY", flush=True); time.sleep(600)
"""


def test_cookie_mode_registers_only_a_listener_reaching_the_pod_ips(node, datapath_factory):
    """Cookie mode registers Envoy's 15006 from sockops (TCP_LISTEN_CB), the same rule as pod-IP mode's
    listener search: istio-validation's 127.0.0.1:15006 socket, listening while the init container runs,
    is not the pod's inbound listener (it registered and took the pod's inbound connections until it
    closed); the wildcard socket after it is."""
    from istio_ebpf_plugin.datapath import libbpf, maps
    from istio_ebpf_plugin.datapath.podconfig import PROXY_UID, PodConfig, ip_list
    from istio_ebpf_plugin.datapath.selftest.topology import PYTHON, stop_process, wait_ready

    dp = datapath_factory("cookie")
    dp.attach_cgroup(str(node.parent_cgroup))
    pod = node.add_pod("v")
    dp.add_pod(pod.netns_path, PodConfig(pod_ips=ip_list(pod.pod_ips)), str(pod.cgroup_path))

    def registered() -> list[str]:
        return sorted(str(k.address()) for k in libbpf.map_keys(dp.map_fds["inbound_listeners"], maps.IpAddr))

    for bind, expected in (("127.0.0.1", []), ("0.0.0.0", [pod.pod_ips[0]])):
        proc = pod.spawn([PYTHON, "-S", "-c", LISTENER, bind], uid=PROXY_UID, gid=PROXY_UID,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_ready(proc, f"listener on {bind}:15006")
            assert registered() == expected, bind
        finally:
            stop_process(proc)
