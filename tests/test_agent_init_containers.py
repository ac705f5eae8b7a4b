"""App init containers on the real kernel: which connections each container makes, what each sees.

The real agent (FakeKube for the API) captures a lab pod whose containers have cgroups of
their own below the pod's, named as containerd names them (``cri-containerd-<id>.scope``):
Istio's gate (istio-validation), an app init container (``fetch``) and an app container
(``hello``). A plain pod ``srv`` answers on 8080 and on UDP 53 (a nameserver's port).

With ``istio-ebpf.io/init-containers: bypass``, once the pod's status names ``fetch``'s
container id, the agent lists its cgroup and:

=================  =====================  ===============================================
container          connection             what it sees
=================  =====================  ===============================================
fetch (init)       TCP srv:8080, IPv4/6   srv itself (direct, as if the pod were not meshed)
fetch (init)       UDP srv:53 (DNS)       srv's reply (DNS capture does not take it)
fetch, unnamed     TCP srv:8080           the pod's 15001 (captured: not identified yet)
below fetch        TCP srv:8080           the pod's 15001 (a cgroup of its own: captured)
hello (app)        TCP srv:8080           the pod's 15001, original destination srv:8080
hello (app)        UDP srv:53             the pod's 15053 (Istio's DNS capture)
istio-validation   127.0.0.6:15002, 1337  the pod's 15006 with original port 15002 (the gate)
=================  =====================  ===============================================

Without the annotation every container is captured, ``fetch`` as ``hello``: exactly Istio's.
"""

from __future__ import annotations

import dataclasses
import secrets
from pathlib import Path

import pytest

from istio_ebpf_plugin.agent import containers
from istio_ebpf_plugin.harness.probe import probe_connect, start_probe_server
from support.fake_kube import FakeKube, fixture_pod
from support.lab_agent import NODE, lab_agent
from support.polling import wait_for

pytestmark = pytest.mark.kernel

INJECTED = "v1.14.0/inject/hello.yaml.injected"
OPT_IN = {"istio-ebpf.io/redirect": "ebpf",
          "proxy.istio.io/config": 'proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: "true"\n'}
APP = (1000, 1000)


def _container(pod, cid: str, below: str | None = None):
    """A view of ``pod`` whose processes start in the cgroup of container ``cid``."""
    path = pod.cgroup_path / f"cri-containerd-{cid}.scope"
    if below:
        path = path / below
    path.mkdir(parents=True, exist_ok=True)
    return dataclasses.replace(pod, cgroup_path=path, processes=[])


def _status(**ids: str) -> dict:
    return {"initContainerStatuses": [{"name": n, "containerID": f"containerd://{cid}", "state": {"running": {}}}
                                      for n, cid in ids.items()]}


def _seen(out) -> tuple:
    return out.listener, out.pod, out.orig_dst if out.listener in ("outbound", "inbound", "dns") else None


@pytest.mark.parametrize("mode", ["cookie", "podip"])
def test_init_containers_bypass_and_everything_else_is_captured(node, pin_root, monkeypatch, mode):
    ini, cap, srv = node.add_pod("ini"), node.add_pod("cap"), node.add_pod("srv")
    for p in (ini, cap):
        start_probe_server(p, targets=(8080,), udp_targets=(53,))
    start_probe_server(srv, targets=(8080,), udp_targets=(53,))
    kube = FakeKube(NODE).install(monkeypatch)
    objs = {}
    for lab_pod, extra in ((ini, {containers.ANNOTATION: containers.BYPASS}), (cap, {})):
        obj = fixture_pod(INJECTED, lab_pod.name, NODE, list(lab_pod.pod_ips), annotations={**OPT_IN, **extra})
        obj["spec"]["initContainers"].append({"name": "fetch", "image": "app"})
        objs[lab_pod.name] = kube.add(obj)
    cgroups = {objs[p.name]["metadata"]["uid"]: str(p.cgroup_path) for p in (ini, cap)}
    with lab_agent(node, pin_root, mode, cgroups) as agent:
        uids = {name: o["metadata"]["uid"] for name, o in objs.items()}
        wait_for(lambda: all(u in agent.reconciler.records for u in uids.values()), what="both pods captured")
        gate, fetch, hello = secrets.token_hex(32), secrets.token_hex(32), secrets.token_hex(32)
        views = {(p.name, c): _container(p, cid) for p in (ini, cap)
                 for c, cid in (("gate", gate), ("fetch", fetch), ("hello", hello))}
        out = "outbound"
        # fetch runs before kubelet has published its id: captured (fail closed, never open).
        assert _seen(probe_connect(views["ini", "fetch"], *APP, srv.ipv4, 8080)) == (out, "ini", (srv.ipv4, 8080))

        for uid in uids.values():
            kube.modify(uid, status=_status(**{"istio-init": gate, "fetch": fetch}))
        handle = agent.reconciler.records[uids["ini"]].handle
        fetch_cg = (ini.cgroup_path / f"cri-containerd-{fetch}.scope").stat().st_ino
        wait_for(lambda: agent.datapath.init_bypass(handle) == {fetch_cg}, what="fetch listed in the kernel")
        before = agent.datapath.counters()["init_bypass"]

        f, h, g = views["ini", "fetch"], views["ini", "hello"], views["ini", "gate"]
        assert _seen(probe_connect(f, *APP, srv.ipv4, 8080)) == ("direct", "srv", None)
        assert _seen(probe_connect(f, *APP, srv.ipv6, 8080)) == ("direct", "srv", None)
        dns = probe_connect(f, *APP, srv.ipv4, 53, proto="udp")
        assert (dns.listener, dns.pod, dns.reply_from) == ("direct", "srv", (srv.ipv4, 53))
        assert agent.datapath.counters()["init_bypass"] - before == 3
        assert _seen(probe_connect(h, *APP, srv.ipv4, 8080)) == (out, "ini", (srv.ipv4, 8080))
        assert probe_connect(h, *APP, srv.ipv4, 53, proto="udp").listener == "dns"
        assert _seen(probe_connect(g, 1337, 1337, "127.0.0.6", 15002)) == ("inbound", "ini", ("127.0.0.6", 15002))
        unknown = _container(ini, secrets.token_hex(32))
        below = _container(ini, fetch, below="child")
        for view in (unknown, below):
            assert _seen(probe_connect(view, *APP, srv.ipv4, 8080)) == (out, "ini", (srv.ipv4, 8080))
        # Opted in without the annotation: fetch is captured like the app, exactly Istio's.
        assert agent.datapath.init_bypass(agent.reconciler.records[uids["cap"]].handle) == set()
        for c in ("fetch", "hello"):
            assert _seen(probe_connect(views["cap", c], *APP, srv.ipv4, 8080)) == (out, "cap", (srv.ipv4, 8080))
        # fetch exits: its cgroup goes, kubelet says so, and nothing is listed any more.
        (ini.cgroup_path / f"cri-containerd-{fetch}.scope" / "child").rmdir()
        Path(f.cgroup_path).rmdir()
        kube.modify(uids["ini"], status={"initContainerStatuses": [
            {"name": "fetch", "containerID": f"containerd://{fetch}", "state": {"terminated": {"exitCode": 0}}}]})
        wait_for(lambda: agent.datapath.init_bypass(handle) == set(), what="fetch unlisted")
        assert agent.datapath.occupancy()["init_bypass"] == 0
