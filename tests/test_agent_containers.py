"""``istio-ebpf.io/init-containers: bypass``: which containers the agent lists (agent/containers.py).

No kernel here: a pod's cgroup is a directory tree like kubelet's (container cgroups named
after their container ids), the pod object is Istio's injected fixture with an app init
container added, and the datapath records what it is told (the kernel side:
tests/test_agent_init_containers.py).
"""

from __future__ import annotations

import copy
import secrets
from pathlib import Path

import pytest

from istio_ebpf_plugin.agent import containers
from istio_ebpf_plugin.agent.pod_spec import pod_config
from istio_ebpf_plugin.errors import UsageError
from support.fake_kube import FakeKube, fixture_pod
from support.polling import wait_for
from test_agent_loop import NODE, OPT_IN, FakeProc, Running, make_agent

INJECTED = "v1.14.0/inject/hello.yaml.injected"     # no native sidecar: istio-init, then Envoy
BYPASS = {**OPT_IN, containers.ANNOTATION: containers.BYPASS}


def _id() -> str:
    return secrets.token_hex(32)


def _with_init_containers(pod: dict, *names: str, native: tuple[str, ...] = ()) -> dict:
    pod = copy.deepcopy(pod)
    inits = pod["spec"].setdefault("initContainers", [])
    for n in names:
        inits.append({"name": n, "image": "app"})
    for n in native:
        inits.append({"name": n, "image": "app", "restartPolicy": "Always"})
    return pod


def _status(**ids: str) -> dict:
    return {"initContainerStatuses": [{"name": n, "containerID": f"containerd://{cid}",
                                       "state": {"running": {}}} for n, cid in ids.items()]}


def test_annotation_values():
    assert containers.wants_bypass({containers.ANNOTATION: "bypass"}) is True
    assert containers.wants_bypass({containers.ANNOTATION: "capture"}) is False
    assert containers.wants_bypass({}) is False
    for bad in ("Bypass", "true", "", "bypass "):
        with pytest.raises(UsageError, match="init-containers"):
            containers.wants_bypass({containers.ANNOTATION: bad})
    pod = fixture_pod(INJECTED, "p", NODE, ["10.0.0.5"], annotations=BYPASS)
    assert pod_config(pod).init_bypass is True
    assert pod_config(fixture_pod(INJECTED, "p", NODE, ["10.0.0.5"], annotations=OPT_IN)).init_bypass is False


def test_app_init_containers_exclude_istios_and_native_sidecars():
    pod = _with_init_containers(fixture_pod("master/inject/hello.yaml.injected", "p", NODE, ["10.0.0.5"]),
                                "wait-for-db", "migrate", native=("log-shipper",))
    names = [c["name"] for c in pod["spec"]["initContainers"]]
    assert "istio-init" in names and "istio-proxy" in names     # master: istio-proxy is a native sidecar
    assert containers.app_init_containers(pod) == {"wait-for-db", "migrate"}
    for istio in ("istio-validation", "istio-ebpf-validation", "enable-core-dump"):
        assert containers.app_init_containers(_with_init_containers(pod, istio)) == {"wait-for-db", "migrate"}


def test_cgroups_are_matched_by_the_container_id_the_status_gives(tmp_path):
    init, other, app, pause = _id(), _id(), _id(), _id()
    pod_cg = tmp_path / "kubepods" / "besteffort" / "pod1"
    for name in (f"cri-containerd-{init}.scope", other, f"crio-{app}.scope", pause, "not-a-container"):
        (pod_cg / name).mkdir(parents=True)
    pod = _with_init_containers(fixture_pod(INJECTED, "p", NODE, ["10.0.0.5"]), "fetch", "migrate")
    pod["status"].update(_status(**{"istio-init": pause, "fetch": init}))
    pod["status"]["containerStatuses"] = [{"name": "hello", "containerID": f"containerd://{app}"}]
    got = containers.bypass_cgroups(pod, str(pod_cg))
    assert got == {(pod_cg / f"cri-containerd-{init}.scope").stat().st_ino}
    # migrate has no id in the status yet: not listed (captured); istio-init's id is never listed;
    # the app container's id is in containerStatuses, never an init container's.
    pod["status"].update(_status(**{"fetch": init, "migrate": other}))
    assert containers.bypass_cgroups(pod, str(pod_cg)) == {(pod_cg / f"cri-containerd-{init}.scope").stat().st_ino,
                                                         (pod_cg / other).stat().st_ino}
    # A status that names an app container's id for an init container's name: still only what
    # exists below this pod's cgroup is listed, and never for a name that is not an init container.
    pod["status"].update(_status(hello=app))
    assert containers.bypass_cgroups(pod, str(pod_cg)) == frozenset()
    assert containers.bypass_cgroups(pod, str(tmp_path / "gone")) == frozenset()


@pytest.fixture
def pod_cgroups(tmp_path, monkeypatch):
    """Pod cgroup directories with a process (FakeProc) each: the agent's locator reads them."""
    FakeProc.in_our_userns(monkeypatch)
    proc = FakeProc(tmp_path / "proc")
    made: dict[str, str] = {}

    def make(uid: str) -> str:
        d = tmp_path / "cg" / f"pod{uid}"
        d.mkdir(parents=True)
        pid = proc.start(uid)
        (d / "cgroup.procs").write_text(f"{pid}\n")
        made[uid] = str(d)
        return str(d)
    return proc, made, make


def test_agent_lists_init_containers_as_the_status_names_them(pod_cgroups):
    proc, _, make = pod_cgroups
    kube = FakeKube(NODE)
    with pytest.MonkeyPatch.context() as mp:
        kube.install(mp)
        bypass = kube.add(_with_init_containers(fixture_pod(INJECTED, "byp", NODE, ["10.0.3.1"], annotations=BYPASS),
                                                "fetch"))
        plain = kube.add(_with_init_containers(fixture_pod(INJECTED, "cap", NODE, ["10.0.3.2"], annotations=OPT_IN),
                                               "fetch"))
        cg = {p["metadata"]["uid"]: make(p["metadata"]["uid"]) for p in (bypass, plain)}
        agent = make_agent(proc, {})
        agent.config.cgroup_for_uid = cg.get
        run = Running(agent)
        try:
            dp = agent._made[0]
            uid = bypass["metadata"]["uid"]
            wait_for(lambda: uid in agent.reconciler.records and plain["metadata"]["uid"] in agent.reconciler.records,
                     what="both pods captured")
            handle = agent.reconciler.records[uid].handle
            # Nothing named yet: nothing listed (the init container, should it run, is captured).
            assert dp.bypass.get(handle, set()) == set()
            fetch, gate = _id(), _id()
            for name in (f"cri-containerd-{fetch}.scope", f"cri-containerd-{gate}.scope"):
                for d in cg.values():
                    Path(d, name).mkdir()
            want = {Path(cg[uid], f"cri-containerd-{fetch}.scope").stat().st_ino}
            for p in (bypass, plain):
                kube.modify(p["metadata"]["uid"], status=_status(**{"istio-init": gate, "fetch": fetch}))
            wait_for(lambda: dp.bypass.get(handle) == want, what="fetch listed")
            # Opted in without the annotation: never listed, exactly Istio's capture.
            assert agent.reconciler.records[plain["metadata"]["uid"]].handle not in dp.bypass
            # The init container exited and its cgroup went: the list empties.
            Path(cg[uid], f"cri-containerd-{fetch}.scope").rmdir()
            kube.modify(uid, status={"initContainerStatuses": [
                {"name": "fetch", "containerID": f"containerd://{fetch}", "state": {"terminated": {"exitCode": 0}}}]})
            wait_for(lambda: dp.bypass.get(handle) == set(), what="fetch unlisted")
        finally:
            run.close()
