"""A real Kubernetes 1.20.2 control plane on loopback: etcd + kube-apiserver + controller-manager + scheduler.

Lab only (tests and ``make cluster-up``), never imported by the product. The binaries come
from ``scripts/build-kubernetes.sh`` (cached under /var/cache/istio-ebpf), etcd is Debian's
``etcd-server`` started as a plain process. Everything listens on 127.0.0.1 on free ports,
keeps its state in one ``/tmp/istio-ebpf-test-kube-*`` directory, and is stopped by PID.

Credentials: a static admin token (``system:masters``) in a kubeconfig; the apiserver makes
its own self-signed serving certificate in ``--cert-dir`` (the kubeconfig trusts that file),
and service-account tokens are signed with a key made here, so TokenRequest works and the
agent can run with its own ServiceAccount's token (real RBAC).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ..timeouts import scaled
from . import names, processes
from .ports import free_port

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = PROJECT_ROOT / "scripts" / "build-kubernetes.sh"
KUBERNETES_VERSION = "1.20.2"
SERVICE_CIDR = "10.96.0.0/16"
STATE_FILE = "control-plane.json"


class ControlPlaneError(RuntimeError):
    """The control plane could not be built or started (message names the log to read)."""


def binaries() -> Path:
    """The directory with kube-apiserver, kube-controller-manager, kube-scheduler and kubelet.

    Builds them on first use (cold: about 15 minutes here); later calls return the cache.
    """
    env_dir = os.environ.get("ISTIO_EBPF_KUBE_BIN")
    if env_dir:
        return Path(env_dir)
    out = subprocess.run(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        raise ControlPlaneError(f"{BUILD_SCRIPT.name} failed (exit {out.returncode}); see its stderr above")
    return Path(out.stdout.strip().splitlines()[-1])


def _write_private(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o600)


@dataclass
class ControlPlane:
    """One control plane. ``start()``/``stop()``; also a context manager."""

    workdir: Path
    bin_dir: Path
    etcd_port: int = field(default_factory=free_port)
    etcd_peer_port: int = field(default_factory=free_port)
    apiserver_port: int = field(default_factory=free_port)
    admin_token: str = field(default_factory=lambda: secrets.token_hex(16))
    watch_cache: bool = True          # False: watches go to etcd, so an etcd compaction gives 410
    #: Controllers off by default: no node runs (nodelifecycle), no volumes. A cluster with a real
    #: node (tests/test_node_e2e.py) turns nodelifecycle on: it lifts the node's not-ready taint.
    controllers: str = "*,-nodeipam,-nodelifecycle,-attachdetach,-persistentvolume-binder"
    pids: dict[str, int] = field(default_factory=dict)
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict, repr=False)

    @classmethod
    def create(cls, bin_dir: Path | None = None, watch_cache: bool = True,
               prefix: str = names.TMP_PREFIX) -> "ControlPlane":
        bin_dir = bin_dir or binaries()
        while True:   # <prefix><token>, like a harness Node's directory, so harness-cleanup knows it
            token = names.new_token()
            workdir = names.TMP_ROOT / f"{prefix}{token}"
            try:
                workdir.mkdir(mode=0o755)
                break
            except FileExistsError:
                continue
        names.created_tokens.add(token)   # the session's leftover check then looks for it too
        # Owner pid: `harness-cleanup` leaves a live session's control plane alone, and kills the
        # processes of a dead one (their command lines name this directory) before removing it.
        (workdir / "owner.pid").write_text(f"{os.getpid()}\n")
        return cls(workdir=workdir, bin_dir=bin_dir, watch_cache=watch_cache)

    # ------------------------------------------------------------------ paths
    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    @property
    def ca_file(self) -> Path:
        # Written by kube-apiserver itself (self-signed serving certificate + its CA).
        return self.workdir / "certs" / "apiserver.crt"

    def log(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    # ------------------------------------------------------------------ start / stop
    def __enter__(self) -> "ControlPlane":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 180.0) -> None:
        self._prepare()
        self._spawn("etcd", self._etcd_args())
        self._wait_etcd(timeout)
        self.start_apiserver(timeout)
        self.write_kubeconfig(self.kubeconfig, token=self.admin_token)
        self._spawn("kube-controller-manager", self._controller_manager_args())
        self._spawn("kube-scheduler", self._scheduler_args())
        self.save_state()

    def _prepare(self) -> None:
        (self.workdir / "certs").mkdir(exist_ok=True)
        key = self.workdir / "sa.key"
        if not key.exists():
            subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            subprocess.run(["openssl", "rsa", "-in", str(key), "-pubout", "-out", str(self.workdir / "sa.pub")],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # token,user,uid,"group1,group2"
        _write_private(self.workdir / "tokens.csv", f'{self.admin_token},admin,admin,"system:masters"\n')
        # Every write, with who made it and the answer's code (tests count refused calls with it).
        policy = {"apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["RequestReceived"],
                  "rules": [{"level": "Metadata", "verbs": ["create", "update", "patch", "delete"]},
                            {"level": "None"}]}
        (self.workdir / "audit-policy.json").write_text(json.dumps(policy))

    def _spawn(self, name: str, args: list[str]) -> None:
        logf = open(self.log(name), "ab")
        try:
            # Own session: a Ctrl-C in `make cluster-up`'s terminal does not reach it; we stop it by PID.
            proc = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        finally:
            logf.close()
        self._procs[name] = proc
        self.pids[name] = proc.pid

    def _etcd_args(self) -> list[str]:
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        client = f"http://127.0.0.1:{self.etcd_port}"
        return [shutil.which("etcd") or "/usr/bin/etcd", "--name", "default",
                "--data-dir", str(self.workdir / "etcd"),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"default={peer}", "--log-level", "warn",
                "--quota-backend-bytes", str(512 * 1024 * 1024)]

    def _apiserver_args(self) -> list[str]:
        w = self.workdir
        args = [str(self.bin_dir / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
                "--bind-address=127.0.0.1", f"--secure-port={self.apiserver_port}",
                "--insecure-port=0", "--advertise-address=127.0.0.1",
                # The "kubernetes" Service's Endpoints may not hold a loopback address: no reconciler.
                "--endpoint-reconciler-type=none",
                f"--cert-dir={w / 'certs'}",
                f"--service-account-key-file={w / 'sa.pub'}",
                f"--service-account-signing-key-file={w / 'sa.key'}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--token-auth-file={w / 'tokens.csv'}",
                "--authorization-mode=Node,RBAC",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=true",
                "--enable-priority-and-fairness=false",
                "--profiling=false",
                f"--audit-policy-file={w / 'audit-policy.json'}", f"--audit-log-path={w / 'audit.log'}",
                "--audit-log-mode=blocking"]
        if not self.watch_cache:
            args.append("--watch-cache=false")
        return args

    def _controller_manager_args(self) -> list[str]:
        w = self.workdir
        return [str(self.bin_dir / "kube-controller-manager"),
                f"--kubeconfig={self.kubeconfig}", "--leader-elect=false",
                "--port=0", "--secure-port=0",   # no serving: nothing else to collide with
                f"--service-account-private-key-file={w / 'sa.key'}",
                f"--root-ca-file={self.ca_file}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--use-service-account-credentials=false",
                f"--controllers={self.controllers}"]

    def _scheduler_args(self) -> list[str]:
        return [str(self.bin_dir / "kube-scheduler"), f"--kubeconfig={self.kubeconfig}",
                "--leader-elect=false", "--port=0", "--secure-port=0"]

    def _wait_etcd(self, timeout: float) -> None:
        self._wait(lambda: self._http_ok(f"http://127.0.0.1:{self.etcd_port}/health"), "etcd", timeout)

    def start_apiserver(self, timeout: float = 180.0) -> None:
        """(Re)start kube-apiserver on the same port and etcd, and wait for ``/readyz``."""
        self._spawn("kube-apiserver", self._apiserver_args())
        self._wait(self.ready, "kube-apiserver", timeout)

    def kill_apiserver(self) -> None:
        """``kill -9`` the apiserver (the tests then call :meth:`start_apiserver`)."""
        self._kill("kube-apiserver", signal.SIGKILL)

    def ready(self) -> bool:
        if not self.ca_file.exists():
            return False
        return self._http_ok(f"{self.url}/readyz", token=self.admin_token)

    def _http_ok(self, url: str, token: str | None = None) -> bool:
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
        ctx = ssl.create_default_context(cafile=str(self.ca_file)) if url.startswith("https") else None
        try:
            with urllib.request.urlopen(req, timeout=3, context=ctx) as resp:
                return resp.status == 200
        except (OSError, ssl.SSLError, urllib.error.URLError):
            return False

    def _wait(self, check: "object", what: str, timeout: float) -> None:
        deadline = time.monotonic() + scaled(timeout)
        proc = self._procs.get(what)
        while time.monotonic() < deadline:
            if check():  # type: ignore[operator]
                return
            if proc is not None and proc.poll() is not None:
                raise ControlPlaneError(f"{what} exited with {proc.returncode}; see {self.log(what)}")
            time.sleep(0.5)
        raise ControlPlaneError(f"{what} not ready after {scaled(timeout):.0f}s; see {self.log(what)}")

    def _kill(self, name: str, sig: int = signal.SIGTERM, wait: float = 15.0) -> None:
        pid = self.pids.pop(name, None)
        self._procs.pop(name, None)
        if pid is not None:
            processes.stop(pid, sig, wait)

    def stop(self, remove: bool = True) -> None:
        """Stop every process (by PID, reverse start order) and remove the work directory."""
        for name in ("kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
            self._kill(name)
        if remove:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # ------------------------------------------------------------------ etcd operations for tests
    def etcd_revision(self) -> int:
        """etcd's current revision (through etcd's JSON gateway: no etcdctl needed)."""
        out = self._etcd_call("/v3/kv/range", {"key": base64.b64encode(b"/").decode(), "limit": 1})
        return int(out["header"]["revision"])

    def compact_etcd(self) -> int:
        """Compact etcd up to now: watches from an older resourceVersion then get 410 Gone."""
        rev = self.etcd_revision()
        self._etcd_call("/v3/kv/compaction", {"revision": rev, "physical": True})
        return rev

    def _etcd_call(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{self.etcd_port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def audit_events(self) -> list[dict]:
        """The audit log so far: one dict per write (verb, user, objectRef, responseStatus)."""
        path = self.workdir / "audit.log"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    # ------------------------------------------------------------------ credentials
    def write_kubeconfig(self, path: Path, token: str, user: str = "admin") -> Path:
        ca = base64.b64encode(self.ca_file.read_bytes()).decode()
        cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "istio-ebpf-test",
               "clusters": [{"name": "local", "cluster": {"server": self.url, "certificate-authority-data": ca}}],
               "users": [{"name": user, "user": {"token": token}}],
               "contexts": [{"name": "istio-ebpf-test", "context": {"cluster": "local", "user": user}}]}
        _write_private(path, json.dumps(cfg, indent=1))   # JSON is YAML: any client reads it
        return path

    def request(self, method: str, path: str, body: object = None, token: str | None = None,
                content_type: str = "application/json") -> tuple[int, dict]:
        """One API call as admin (or with ``token``), independent of the product's client: (status, JSON)."""
        req = urllib.request.Request(
            f"{self.url}{path}", data=None if body is None else json.dumps(body).encode(), method=method,
            headers={"Authorization": f"Bearer {token or self.admin_token}", "Content-Type": content_type})
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        try:
            with urllib.request.urlopen(req, timeout=30, context=ctx) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return status, json.loads(raw) if raw else {}
        except ValueError:
            return status, {"raw": raw.decode("utf-8", "replace")}

    def default_service_account_ready(self, namespace: str) -> bool:
        """True once pods can be created in ``namespace``: 1.20's ServiceAccount admission refuses
        them (500, "No API token found") until the token controller has given ``default`` its secret."""
        status, sa = self.request("GET", f"/api/v1/namespaces/{namespace}/serviceaccounts/default")
        return status == 200 and bool(sa.get("secrets"))

    def service_account_token(self, namespace: str, name: str, seconds: int = 3600) -> str:
        """A TokenRequest token of ``namespace/name`` (what a pod's projected token holds)."""
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"expirationSeconds": seconds}}
        status, out = self.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token", body)
        if status != 201:
            raise ControlPlaneError(f"TokenRequest for {namespace}/{name}: HTTP {status} {out.get('message', '')}")
        return out["status"]["token"]

    # ------------------------------------------------------------------ state (make cluster-up/down)
    def save_state(self) -> None:
        state = {"workdir": str(self.workdir), "bin_dir": str(self.bin_dir), "pids": self.pids,
                 "etcd_port": self.etcd_port, "etcd_peer_port": self.etcd_peer_port,
                 "apiserver_port": self.apiserver_port, "admin_token": self.admin_token,
                 "watch_cache": self.watch_cache}
        _write_private(self.workdir / STATE_FILE, json.dumps(state, indent=1))

    @classmethod
    def load_state(cls, workdir: Path) -> "ControlPlane":
        s = json.loads((workdir / STATE_FILE).read_text())
        return cls(workdir=Path(s["workdir"]), bin_dir=Path(s["bin_dir"]), etcd_port=s["etcd_port"],
                   etcd_peer_port=s["etcd_peer_port"], apiserver_port=s["apiserver_port"],
                   admin_token=s["admin_token"], watch_cache=s["watch_cache"], pids=dict(s["pids"]))


# ---------------------------------------------------------------------- make cluster-up / cluster-down
# Not under the test prefix: `harness-cleanup` and the test session's leftover check leave it alone.
CLUSTER_PREFIX = "istio-ebpf-cluster-"
CLUSTER_LINK = names.TMP_ROOT / "istio-ebpf-cluster"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m istio_ebpf_plugin.harness.control_plane",
                                description="a real Kubernetes 1.20.2 control plane on loopback")
    p.add_argument("action", choices=["up", "down", "build"])
    args = p.parse_args(argv)
    if args.action == "build":
        print(binaries())
        return 0
    if args.action == "up":
        if CLUSTER_LINK.exists():
            print(f"a control plane is already up: export KUBECONFIG={CLUSTER_LINK / 'admin.kubeconfig'} "
                  "(make cluster-down stops it)", file=sys.stderr)
            return 2
        cp = ControlPlane.create(prefix=CLUSTER_PREFIX)
        try:
            cp.start()
        except BaseException:
            cp.stop()
            raise
        CLUSTER_LINK.symlink_to(cp.workdir)
        print(f"Kubernetes {KUBERNETES_VERSION} control plane up at {cp.url} (pids {cp.pids})", file=sys.stderr)
        print(f"export KUBECONFIG={cp.kubeconfig}")
        return 0
    if not CLUSTER_LINK.exists():
        print("no control plane is up (make cluster-up starts one)", file=sys.stderr)
        CLUSTER_LINK.unlink(missing_ok=True)
        return 0
    cp = ControlPlane.load_state(CLUSTER_LINK.resolve())
    cp.stop()
    CLUSTER_LINK.unlink()
    print(f"control plane stopped, {cp.workdir} removed", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
