"""Soak: pod churn beside steady traffic, on the real kernel (``make soak``; not in the default run).

    ISTIO_EBPF_SOAK_SECONDS=600 .venv/bin/python -m pytest -m soak -s tests/test_soak.py

Two stable pods with real Envoys (client -> client Envoy 15001 -> server Envoy 15006 -> HTTP
server) carry steady HTTP traffic while a churn pod is created, added to the datapath, checked
to be captured, removed and deleted every second. Asserted: zero failed requests on the stable
pods, every churn pod captured while it lived, and afterwards zero map entries beyond the
stable pods' own (``Datapath.occupancy()``), zero connection entries, no sk_lookup link left.
The figures are printed (docs/hardening.md quotes them).
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
import uuid

import pytest

from istio_ebpf_plugin.datapath.loader import Datapath
from istio_ebpf_plugin.datapath.podconfig import PodConfig, ip_list
from istio_ebpf_plugin.harness.apps import http_get, start_http_server, url_for
from istio_ebpf_plugin.harness.probe import PYTHON

from istio_ebpf_plugin.timeouts import scaled
from support.hardening_support import ChurnPod, churn_ips
from support.polling import wait_for

pytestmark = [pytest.mark.soak, pytest.mark.kernel]

SECONDS = float(os.environ.get("ISTIO_EBPF_SOAK_SECONDS", "600"))

# In a churn pod: listen on 15001 (standing in for its Envoy), connect as the app to a pod IP,
# and report the original destination the listener sees.
_CAPTURE_CHECK = r"""
import json, socket, struct, sys
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("0.0.0.0", 15001)); l.listen(4)
c = socket.socket(); c.settimeout(3); c.connect((sys.argv[1], int(sys.argv[2])))
a, _ = l.accept()
raw = a.getsockopt(socket.SOL_IP, 80, 16)
print(json.dumps([socket.inet_ntoa(raw[4:8]), struct.unpack("!H", raw[2:4])[0]]))
"""


POD_MAPS = ("pod_by_netns", "pod_by_ip", "pod_ports", "pod_cidrs")
ORIGIN_MAPS = ("origin_by_tuple", "origin_by_cookie", "dns_origin")


def drained(occ: dict, baseline: dict) -> bool:
    """Pod maps as before the churn; no connection origin left (entries go when sockets close)."""
    return all(occ[m] == baseline[m] for m in POD_MAPS) and not any(occ[m] for m in ORIGIN_MAPS)


def test_soak_pod_churn_with_steady_traffic(node):
    dp = Datapath(mode="cookie", pin_root=f"/sys/fs/bpf/istio-ebpf-test-{uuid.uuid4().hex[:8]}")
    churn: dict[int, tuple[ChurnPod, int]] = {}
    try:
        dp.load()
        dp.attach_cgroup(str(node.parent_cgroup))
        cli, srv = node.add_pod("cli"), node.add_pod("srv")
        start_http_server(srv, 8080)
        for p in (cli, srv):
            dp.add_pod(p.netns_path, PodConfig(pod_ips=ip_list(p.pod_ips)), cgroup_path=str(p.cgroup_path))
        envoys = [cli.start_envoy(), srv.start_envoy()]
        baseline = dp.occupancy()
        url = url_for(srv.ipv4, 8080)

        results = {"ok": 0, "failed": 0, "not_via_envoy": 0}
        failures: list[dict] = []
        stop = threading.Event()

        def traffic() -> None:
            while not stop.is_set():
                for r in http_get(cli, url, count=20, timeout=scaled(5)):
                    if r.get("status") == 200:
                        results["ok"] += 1
                        if r["info"]["peer"][0] != "127.0.0.6":
                            results["not_via_envoy"] += 1
                    else:
                        results["failed"] += 1
                        failures.append(r)

        t = threading.Thread(target=traffic, daemon=True)
        t.start()
        add_ms, remove_ms, uncaptured = [], [], []
        created = 0
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < SECONDS:
                tick = time.monotonic()
                created += 1
                ip4, ip6 = churn_ips(created)
                pod = ChurnPod(node, created, ip4, ip6).create()
                s = time.monotonic()
                handle = dp.add_pod(pod.netns_path, PodConfig(pod_ips=ip_list(pod.pod_ips)),
                                    cgroup_path=str(pod.cgroup_path))
                add_ms.append((time.monotonic() - s) * 1000)
                churn[created] = (pod, handle)
                r = pod.run([PYTHON, "-S", "-c", _CAPTURE_CHECK, srv.ipv4, "8080"])
                if r.returncode != 0 or json.loads(r.stdout) != [srv.ipv4, 8080]:
                    uncaptured.append((pod.name, r.stdout.strip(), r.stderr.strip()[-200:]))
                for n in [k for k in churn if k != created]:
                    old, h = churn.pop(n)
                    s = time.monotonic()
                    dp.remove_pod(h)
                    remove_ms.append((time.monotonic() - s) * 1000)
                    assert not old.delete()
                time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
        finally:
            stop.set()
            t.join(60)
        elapsed = time.monotonic() - t0
        for n in list(churn):
            old, h = churn.pop(n)
            dp.remove_pod(h)
            assert not old.delete()
        for e in envoys:     # their pooled keep-alive connections hold live (legitimate) entries
            e.stop()
        wait_for(lambda: drained(dp.occupancy(), baseline), timeout=30,
                 what=f"the maps back to the baseline {baseline} once Envoy's sockets closed")
        occ = dp.occupancy()
        links = sorted(p.name for p in (dp.links_dir).glob("netns-*"))
        counters = dp.counters()
        total = results["ok"] + results["failed"]
        print(f"\nsoak {elapsed:.0f}s: churn pods created/deleted {created}/{created}; "
              f"stable-pod requests {total} ({total / elapsed:.0f}/s), failed {results['failed']}, "
              f"not through Envoy {results['not_via_envoy']}; churn pods uncaptured {len(uncaptured)}; "
              f"add_pod ms median {statistics.median(add_ms):.2f} max {max(add_ms):.2f}; "
              f"remove_pod ms median {statistics.median(remove_ms or [0]):.2f} max {max(remove_ms or [0]):.2f}; "
              f"occupancy after {occ} (baseline {baseline}); netns links {len(links)}; counters {counters}")
        assert results["failed"] == 0, failures[:5]
        assert results["ok"] > 0 and results["not_via_envoy"] == 0
        assert not uncaptured, uncaptured[:5]
        for name in POD_MAPS:
            assert occ[name] == baseline[name], (name, occ, baseline)
        assert occ["origin_by_tuple"] == occ["origin_by_cookie"] == occ["dns_origin"] == 0, occ
        assert len(links) == 2
    finally:
        for pod, _ in churn.values():
            pod.delete()
        dp.close(cleanup=True)
    assert not dp.pin_dir.exists()
