"""Building blocks of the node e2e (tests/test_node_e2e.py): API calls, pods, kernel queries.

Everything here asks the real components: the apiserver (through the control plane's own
HTTP client, not the product's), containerd's log files, and the kernel (``bpftool``,
``iptables-save`` in the pod's network namespace).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

from . import strategic_merge
from .install_gorender import GoRenderer, go_binary
from .polling import wait_for
from ruamel.yaml import YAML

from istio_ebpf_plugin import OPT_IN_ANNOTATION, OPT_IN_VALUE, PROJECT_ROOT
from istio_ebpf_plugin.harness import control_plane, istio_iptables, names, node_images, node_lab
from istio_ebpf_plugin.install import injector_config

ISTIO = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "istio"
ISTIO_VERSION = "v1.14.0"
APP_PORT = 8080
AGENT_IMAGE = "ghcr.io/istio-ebpf/agent:0.1.0"
AGENT_NS, AGENT_DS = "istio-ebpf-system", "istio-ebpf-agent"
AGENT_SELECTOR = "app.kubernetes.io/name%3Distio-ebpf-agent"
HEALTH = "http://127.0.0.1:15099"       # the agent's health and metrics port (host network)


def step(name: str) -> "Step":
    return Step(name)


class Step:
    """Prints ``[e2e] name ... ok (1.2 s) details`` (or FAILED) around a block."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.details: list[str] = []

    def note(self, text: str) -> None:
        self.details.append(text)

    def __enter__(self) -> "Step":
        self.start = time.monotonic()
        print(f"\n[e2e] {self.name} ...", flush=True)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        took = time.monotonic() - self.start
        result = "ok" if exc_type is None else f"FAILED: {str(exc).splitlines()[0][:300] if exc else exc_type}"
        print(f"[e2e] {self.name}: {result} ({took:.1f} s)", flush=True)
        for d in self.details:
            print(f"[e2e]     {d}", flush=True)


def wait(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    return wait_for(cond, timeout, what, interval)   # conditions that ask the apiserver or a node


# ---------------------------------------------------------------------- API
class Api:
    def __init__(self, cp: Any) -> None:
        self.cp = cp

    def call(self, method: str, path: str, body: Any = None, ok: tuple[int, ...] = (200, 201, 202),
             content_type: str = "application/json") -> dict:
        status, out = self.cp.request(method, path, body, content_type=content_type)
        if status not in ok:
            raise AssertionError(f"{method} {path}: HTTP {status} {out.get('message', out)}")
        return out

    def get(self, path: str) -> dict | None:
        status, out = self.cp.request("GET", path)
        return out if status == 200 else None

    def apply_namespace(self, name: str) -> None:
        self.call("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                  "metadata": {"name": name}}, ok=(201, 409))

    def pod(self, ns: str, name: str) -> dict | None:
        return self.get(f"/api/v1/namespaces/{ns}/pods/{name}")

    def pods(self, ns: str, selector: str = "") -> list[dict]:
        q = f"?labelSelector={selector}" if selector else ""
        return (self.get(f"/api/v1/namespaces/{ns}/pods{q}") or {}).get("items", [])

    def node(self, name: str) -> dict | None:
        return self.get(f"/api/v1/nodes/{name}")

    def delete_pod(self, ns: str, name: str, grace: int | None = None) -> None:
        body = {"gracePeriodSeconds": grace} if grace is not None else None
        self.call("DELETE", f"/api/v1/namespaces/{ns}/pods/{name}", body, ok=(200, 202, 404))


def pod_ready(pod: dict | None) -> bool:
    for c in ((pod or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return c.get("status") == "True"
    return False


def container_status(pod: dict, name: str, init: bool = False) -> dict:
    key = "initContainerStatuses" if init else "containerStatuses"
    return next((s for s in (pod.get("status") or {}).get(key) or [] if s["name"] == name), {})


# ---------------------------------------------------------------------- the cluster
def agent_archive(variant: int = 0) -> Path:
    """The agent image (docker-archive) that scripts/build-image.sh builds from the Containerfile
    ($ISTIO_EBPF_AGENT_ARCHIVE: an archive built before, e.g. while iterating on the test). With
    ``variant`` > 0: image B of the upgrade test, the build argument DATAPATH_VARIANT=variant (another
    datapath version from the same tree), tagged ``AGENT_IMAGE-variant<N>``."""
    if not variant and os.environ.get("ISTIO_EBPF_AGENT_ARCHIVE"):
        return Path(os.environ["ISTIO_EBPF_AGENT_ARCHIVE"])
    out = subprocess.run(["bash", str(PROJECT_ROOT / "scripts" / "build-image.sh")], stdout=subprocess.PIPE,
                         text=True, check=True, env=dict(os.environ, DATAPATH_VARIANT=str(variant)))
    return Path(out.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def cluster(workdir: Path) -> Iterator[dict[str, Any]]:
    """A control plane and a real node (kubelet + containerd, the lab's and the agent's images
    imported), everything removed on exit; the state the node e2e steps and the node benchmark share."""
    state: dict[str, Any] = {}
    with step("prerequisites (Kubernetes 1.20.2 binaries, agent image, lab images, containerd)") as s:
        subprocess.run(["bash", str(PROJECT_ROOT / "scripts" / "setup-node.sh")], check=True)
        bin_dir = control_plane.binaries()
        images = node_images.build()
        archive = agent_archive()
        assert go_binary(), "Debian golang-go is needed to run Istio's templates"
        render = GoRenderer(workdir / "gorender").render
        s.note(f"kubernetes {bin_dir}; agent image {archive} ({archive.stat().st_size >> 20} MiB)")
    lab = node_lab.NodeLab.create(bin_dir / "kubelet", images.pause_ref, bpffs=False)
    # Named after the node's token and claimed: a concurrent harness-cleanup leaves it alone.
    cp = control_plane.ControlPlane.create(bin_dir=bin_dir, prefix=f"{names.TMP_PREFIX}{lab.token}-kube-")
    node_lab.claim_workdir(cp.workdir)
    cp.controllers = node_lab.CONTROLLERS
    try:
        with step("control plane (etcd, kube-apiserver, controller-manager, scheduler)") as s:
            cp.start()
            s.note(f"apiserver {cp.url}")
        with step("node: containerd + bridge CNI + kubelet, images imported with ctr") as s:
            lab.start(cp.kubeconfig, cp.apiserver_port)
            start = time.monotonic()
            refs = [r for a in [*images.archives(), archive] for r in lab.import_image(a)]
            s.note(f"imported {', '.join(refs)} in {time.monotonic() - start:.1f} s")
            assert AGENT_IMAGE in lab.images()
            node = lab.wait_ready(Api(cp).node)
            info = node["status"]["nodeInfo"]
            s.note(f"node {lab.node_name} Ready: kubelet {info['kubeletVersion']}, "
                   f"{info['containerRuntimeVersion']}, bridge {lab.bridge} {lab.subnet}")
        state.update(cp=cp, lab=lab, api=Api(cp), images=images, render=render,
                     ns=f"ie-e2e-{lab.token}", kubeconfig=str(cp.kubeconfig))
        yield state
    finally:
        with step("teardown (kubelet, containers, containerd, mount namespace, cgroups, bridge, control plane)"):
            lab.stop()
            cp.stop()
            leftovers = [p for p in Path("/sys/fs/cgroup").glob("*/kubepods")] + \
                        [p for p in (Path("/sys/fs/cgroup/unified/kubepods"),) if p.exists()]
            assert not leftovers, leftovers
            assert not lab.workdir.exists()


#: ``istio-ebpf`` with the lab plugin (tests/support/node_lab_plugin.py) registered beside the built-in ones.
CLI_WITH_LAB_PLUGIN = """
import sys
from support import node_lab_plugin
from istio_ebpf_plugin.cli import main
from istio_ebpf_plugin.install import manager
manager.get().register(node_lab_plugin, name="node-lab")
sys.exit(main(sys.argv[1:]))
"""


def _cli_env(kubeconfig: str) -> dict[str, str]:
    return dict(os.environ, KUBECONFIG=kubeconfig, PYTHONPATH=f"{PROJECT_ROOT}:{Path(__file__).parents[1]}")


def cli(kubeconfig: str, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    """``istio-ebpf ARGS`` against the lab cluster, with the lab plugin."""
    return subprocess.run([sys.executable, "-c", CLI_WITH_LAB_PLUGIN, *args], capture_output=True, text=True,
                          timeout=timeout, env=_cli_env(kubeconfig), cwd=PROJECT_ROOT)


def cli_process(kubeconfig: str, *args: str) -> subprocess.Popen:
    """``istio-ebpf ARGS`` started in the background (``communicate()`` for its output)."""
    return subprocess.Popen([sys.executable, "-c", CLI_WITH_LAB_PLUGIN, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_cli_env(kubeconfig), cwd=PROJECT_ROOT)


def agent_pod(api: Api) -> dict | None:
    """The agent's DaemonSet pod on the node (None while there is not exactly one)."""
    pods = [p for p in api.pods(AGENT_NS, AGENT_SELECTOR) if not p["metadata"].get("deletionTimestamp")]
    return pods[0] if len(pods) == 1 else None


def injector_configmap(api: Api) -> dict:
    """The Istio stand-in: istio-system and Istio 1.14's own istio-sidecar-injector ConfigMap."""
    api.apply_namespace("istio-system")
    cm = YAML(typ="safe", pure=True).load(
        (ISTIO / ISTIO_VERSION / "rendered" / "istio-sidecar-injector.configmap.yaml").read_text())
    cm["metadata"].pop("resourceVersion", None)
    api.call("POST", "/api/v1/namespaces/istio-system/configmaps", cm, ok=(201, 409))
    return cm


def app_namespace(api: Api, ns: str) -> None:
    """A namespace injected pods can start in (the root certificate ConfigMap istiod would publish)."""
    api.apply_namespace(ns)
    api.call("POST", f"/api/v1/namespaces/{ns}/configmaps",
             {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "istio-ca-root-cert"},
              "data": {"root-cert.pem": "no istiod in this lab\n"}}, ok=(201, 409))
    wait(lambda: (api.get(f"/api/v1/namespaces/{ns}/serviceaccounts/default") or {}).get("secrets"), 60,
         "default ServiceAccount and its token secret")


# ---------------------------------------------------------------------- pods
def server_pod(ns: str, name: str, app_image: str) -> dict:
    """A plain pod (no sidecar, not opted in): the app answering with its view of the connection."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
            "spec": {"terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "app", "image": app_image, "args": ["front", name, str(APP_PORT)],
                                     "ports": [{"containerPort": APP_PORT}]}]}}


def dns_server_pod(ns: str, name: str, app_image: str, host: str) -> dict:
    """A plain pod answering HTTP on APP_PORT (as ``server_pod``) and DNS on UDP 53: ``host``'s A record
    is the pod's own IP. Root in its container, for port 53."""
    pod = server_pod(ns, name, app_image)
    c = pod["spec"]["containers"][0]
    c.update(args=["dns", name, str(APP_PORT), host], securityContext={"runAsUser": 0, "runAsGroup": 0},
             env=[{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}])
    return pod


def with_fetch_init_container(pod: dict, app_image: str, nameserver: str, host: str, seconds: int) -> dict:
    """``pod`` with an app init container ``fetch`` after Istio's (it resolves ``host`` with ``nameserver``
    as the pod's only DNS server, GETs http://<address>:APP_PORT/ and retries for ``seconds``: the lab
    app's ``fetch`` mode), and ``restartPolicy: Never``: a failed init container fails the pod."""
    spec = pod["spec"]
    spec.update(restartPolicy="Never", dnsPolicy="None",
                dnsConfig={"nameservers": [nameserver],
                           "options": [{"name": "timeout", "value": "1"}, {"name": "attempts", "value": "1"}]})
    spec.setdefault("initContainers", []).append(
        {"name": "fetch", "image": app_image, "args": ["fetch", host, str(APP_PORT), str(seconds)]})
    return pod


def _injected_fixture() -> dict:
    """Istio's own injector output for its ``hello`` Deployment (pkg/kube/inject/testdata)."""
    docs = [d for d in YAML(typ="safe", pure=True).load_all((ISTIO / ISTIO_VERSION / "inject" /
                                                              "hello.yaml.injected").read_text()) if d]
    return docs[0]["spec"]["template"]


def ebpf_template_data(pod: dict, values: dict, proxy_image: str) -> dict:
    """Template data with the field names of Istio's SidecarTemplateData, as istiod fills them."""
    meta = pod["metadata"]
    values = copy.deepcopy(values)
    values.setdefault("istio_cni", {"enabled": False})
    return {"ObjectMeta": {"Name": meta["name"], "Namespace": meta.get("namespace", ""),
                           "Annotations": meta.get("annotations") or {}, "Labels": meta.get("labels") or {}},
            "Spec": pod["spec"], "Values": values,
            "ProxyConfig": {"InterceptionMode": "REDIRECT", "ProxyMetadata": {}}, "MeshConfig": {},
            "ProxyImage": proxy_image, "ProxyInitImage": proxy_image, "ProxyUID": 1337, "ProxyGID": 1337,
            "Revision": ""}


def _hello_pod(ns: str, name: str, images: Any) -> dict:
    """Istio 1.14's sidecar injection of ``hello`` (istio-init, istio-proxy) with the lab's images."""
    tpl = copy.deepcopy(_injected_fixture())
    meta = tpl["metadata"]
    meta["name"], meta["namespace"] = name, ns
    meta.pop("creationTimestamp", None)
    spec = tpl["spec"]
    spec["terminationGracePeriodSeconds"] = 2
    for c in spec["containers"] + spec.get("initContainers", []):
        if c["name"] == "hello":
            # The user's container: our app on 8080 (istio-proxy's ISTIO_META_POD_PORTS follows).
            c.update(image=images.app_ref, args=["front", name, str(APP_PORT)], ports=[{"containerPort": APP_PORT,
                                                                                         "name": "http"}])
        else:
            c["image"] = images.proxy_ref
        for e in c.get("env") or []:
            if e["name"] == "ISTIO_META_POD_PORTS":
                e["value"] = json.dumps([{"name": "http", "containerPort": APP_PORT}])
    for v in spec["volumes"]:
        if len(v) == 1:     # the golden drops empty emptyDir sources
            v["emptyDir"] = {}
    return tpl


def injected_client_pod(ns: str, name: str, images: Any, injector_cm: dict, render: Callable) -> dict:
    """The opted-in pod: Istio's sidecar injection of ``hello`` with our images, then the ``ebpf``
    template from the live (patched) injector ConfigMap, executed by Go's text/template and
    strategic-merged onto the pod exactly as istiod applies its templates."""
    tpl = _hello_pod(ns, name, images)
    tpl["metadata"]["annotations"][OPT_IN_ANNOTATION] = OPT_IN_VALUE
    config = injector_config.parse(injector_cm["data"]["config"])
    values = json.loads(injector_cm["data"]["values"])
    template = config["templates"]["ebpf"]
    (out,) = render(template, [ebpf_template_data(tpl, values, images.proxy_ref)])
    assert not out["error"], out["error"]
    patch = YAML(typ="safe", pure=True).load(out["rendered"]) or {}
    pod = strategic_merge.merge(tpl, patch)
    return {"apiVersion": "v1", "kind": "Pod", **pod}


def stock_istio_pod(ns: str, name: str, images: Any) -> dict:
    """The same pod as stock Istio injects it: istio-init loads Istio's rules in the pod's network
    namespace before anything else starts. The proxy stand-in's ``istio-iptables`` loads the rules
    the lab renders from istio-init's own arguments (harness/istio_iptables.py, checked against
    Istio's goldens) with ``iptables-restore``, as NET_ADMIN/NET_RAW root, like Istio's."""
    tpl = _hello_pod(ns, name, images)
    init = next(c for c in tpl["spec"]["initContainers"] if c["name"] == "istio-init")
    v4, v6 = istio_iptables.render(istio_iptables.flags_from_args(init["args"]))
    for env, rules in (("ISTIO_LAB_IPTABLES_RULES", v4), ("ISTIO_LAB_IP6TABLES_RULES", v6)):
        if rules:
            init.setdefault("env", []).append({"name": env, "value": istio_iptables.to_restore_format(rules)})
    return {"apiVersion": "v1", "kind": "Pod", **tpl}


# ---------------------------------------------------------------------- kernel and node queries
def pod_pid(lab: Any, ns: str, pod_name: str, container: str) -> int:
    """The PID of a container's process, from containerd (the CRI's container labels)."""
    out = lab.ctr("containers", "ls", "-q").stdout.split()
    for cid in out:
        info = json.loads(lab.ctr("containers", "info", cid).stdout)
        labels = info.get("Labels") or {}
        if (labels.get("io.kubernetes.pod.namespace") == ns and labels.get("io.kubernetes.pod.name") == pod_name
                and labels.get("io.kubernetes.container.name") == container):
            task = lab.ctr("tasks", "ls", check=False).stdout
            for line in task.splitlines():
                parts = line.split()
                if parts and parts[0] == cid and parts[2] == "RUNNING":
                    return int(parts[1])
    raise AssertionError(f"no running container {container} of {ns}/{pod_name}")


def iptables_rules(pid: int) -> int:
    """Rules (``-A`` lines) in every iptables table of the process's network namespace."""
    n = 0
    for tool in ("iptables-save", "ip6tables-save"):
        out = subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", tool], capture_output=True, text=True)
        n += sum(1 for line in out.stdout.splitlines() if line.startswith("-A"))
    return n


def cgroup_programs(cgroup: Path) -> list[dict]:
    """Programs attached to a cgroup, as the kernel reports them (bpftool cgroup show)."""
    if not cgroup.exists():
        return []
    out = subprocess.run(["bpftool", "-j", "cgroup", "show", str(cgroup)], capture_output=True, text=True)
    return json.loads(out.stdout.strip() or "[]") if out.returncode == 0 else []


def netns_links(pid: int) -> list[dict]:
    """BPF links attached to the process's network namespace (sk_lookup), from the kernel."""
    ino = os.stat(f"/proc/{pid}/ns/net").st_ino
    out = subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True, text=True, check=True)
    return [link for link in json.loads(out.stdout.strip() or "[]")
            if link.get("type") == "netns" and link.get("netns_ino") == ino]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    req = urllib.request.Request(url)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def container_log(lab: Any, pod: dict, container: str) -> list[str]:
    """The container's stdout/stderr lines from kubelet's log files (inside the node)."""
    return [text for _, text in container_log_timed(lab, pod, container)]


def container_log_timed(lab: Any, pod: dict, container: str) -> list[tuple[float | None, str]]:
    """The container's log lines with the time containerd read each (epoch seconds, ns precision)."""
    meta = pod["metadata"]
    d = lab.in_node(f"/var/log/pods/{meta['namespace']}_{meta['name']}_{meta['uid']}/{container}")
    lines: list[tuple[float | None, str]] = []
    for f in sorted(d.glob("*.log")) if d.exists() else []:
        for raw in f.read_text(errors="replace").splitlines():
            parts = raw.split(" ", 3)   # CRI format: <time> <stream> <P|F> <text>
            lines.append((rfc3339(parts[0]), parts[3]) if len(parts) == 4 else (None, raw))
    return lines


def container_exec(lab: Any, ns: str, pod_name: str, container: str, argv: list[str],
                   timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``argv`` in a running container (what ``kubectl exec`` does, through containerd)."""
    for cid in lab.ctr("containers", "ls", "-q").stdout.split():
        labels = json.loads(lab.ctr("containers", "info", cid).stdout).get("Labels") or {}
        if (labels.get("io.kubernetes.pod.namespace"), labels.get("io.kubernetes.pod.name"),
                labels.get("io.kubernetes.container.name")) == (ns, pod_name, container):
            running = [ln.split() for ln in lab.ctr("tasks", "ls", check=False).stdout.splitlines()]
            if any(p and p[0] == cid and p[2] == "RUNNING" for p in running):
                return lab.ctr("tasks", "exec", "--exec-id", f"e2e-{os.urandom(4).hex()}", cid, *argv,
                               check=False, timeout=timeout)
    raise AssertionError(f"no running container {container} of {ns}/{pod_name}")


def pod_cgroup(kubepods: Path, uid: str) -> Path:
    """The pod's cgroup v2 directory (kubepods/<qos>/pod<uid>, cgroupfs driver)."""
    found = [p for p in kubepods.rglob(f"pod{uid}") if p.is_dir()]
    assert len(found) == 1, (uid, found)
    return found[0]


def pod_process(cgroup: Path) -> tuple[int, Path]:
    """A process of the pod (its pause container, while nothing else runs) and its leaf cgroup."""
    for d in [cgroup, *sorted(p for p in cgroup.rglob("*") if p.is_dir())]:
        pids = (d / "cgroup.procs").read_text().split()
        if pids:
            return int(pids[0]), d
    raise AssertionError(f"no process in {cgroup}")


#: Joins the pod's cgroup (argv[1], a leaf directory), then connects (its netns is entered by nsenter)
CONNECT_FROM_POD = r"""
import errno, os, socket, sys
open(os.path.join(sys.argv[1], "cgroup.procs"), "w").write(str(os.getpid()))
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[2] else socket.AF_INET)
s.settimeout(5)
try:
    s.connect((sys.argv[2], int(sys.argv[3])))
    print("CONNECTED")
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e.errno)))
"""

#: Listens in the pod's netns (entered by nsenter) on argv[1] until stdin closes
LISTEN_IN_POD = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(8)
print("LISTENING", flush=True)
sys.stdin.read()
"""


def rfc3339(text: str) -> float | None:
    """Epoch seconds of an RFC 3339 time (Kubernetes' seconds, CRI logs' nanoseconds); None if unreadable."""
    import datetime

    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", text.strip())
    if not m:
        return None
    zone = "+00:00" if m.group(3) == "Z" else m.group(3)
    base = datetime.datetime.fromisoformat(m.group(1) + zone).timestamp()
    return base + (int(m.group(2)) / 10 ** len(m.group(2)) if m.group(2) else 0.0)
