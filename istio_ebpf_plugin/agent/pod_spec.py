"""Pod object -> :class:`PodConfig`: the same decisions Istio's injector makes.

The injector renders istio-init's ``istio-iptables`` arguments from, per knob,
the pod annotation when it is set, otherwise the install value
(``global.proxy.*``). Install values are not visible on a pod, but they are
frozen into the istio-init (or, with the CNI, istio-validation) container
arguments, so the precedence here is:

    pod annotation  >  istio-init / istio-validation argument  >  chart default

Annotations win because they are what changes on a running pod (the agent
must follow such a change), while container arguments are immutable.

``-d`` is derived, not copied: the injector writes
``15090,15021,<excludeInboundPort(statusPort, excludeInboundPorts)>`` where
``excludeInboundPort`` appends the status port unless it is ``0`` or already
listed. :func:`exclude_inbound_port` is that function.

Every malformed value raises :class:`UsageError` naming the annotation; the
agent turns it into an Event on the pod and leaves the pod uncaptured rather
than guessing.
"""

from __future__ import annotations

import functools
import ipaddress
import json
# collections.abc, not typing: isinstance() against typing.Mapping costs 4x more, and a resync asks it
# ~150 times per pod (a no-op relist of 500 pods spent half its second in these checks).
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from .. import OPT_IN_ANNOTATION, OPT_IN_VALUE
from ..datapath.podconfig import (
    ALWAYS_EXCLUDED_INBOUND,
    DEFAULT_STATUS_PORT,
    PROXY_GID,
    PROXY_UID,
    IPAddress,
    IPNetwork,
    PodConfig,
)
from ..errors import UsageError
from . import containers

A_INCLUDE_CIDRS = "traffic.sidecar.istio.io/includeOutboundIPRanges"
A_EXCLUDE_CIDRS = "traffic.sidecar.istio.io/excludeOutboundIPRanges"
A_INCLUDE_IN_PORTS = "traffic.sidecar.istio.io/includeInboundPorts"
A_EXCLUDE_IN_PORTS = "traffic.sidecar.istio.io/excludeInboundPorts"
A_INCLUDE_OUT_PORTS = "traffic.sidecar.istio.io/includeOutboundPorts"
A_EXCLUDE_OUT_PORTS = "traffic.sidecar.istio.io/excludeOutboundPorts"
A_STATUS_PORT = "status.sidecar.istio.io/port"
A_INTERCEPTION = "sidecar.istio.io/interceptionMode"
A_PROXY_CONFIG = "proxy.istio.io/config"
A_TEMPLATES = "inject.istio.io/templates"
DNS_CAPTURE_KEY = "ISTIO_META_DNS_CAPTURE"

#: Names of the injected init container that carries istio-iptables' arguments.
INIT_CONTAINERS = ("istio-init", "istio-validation")
PROXY_CONTAINER = "istio-proxy"
INTERCEPTION_MODES = ("REDIRECT", "TPROXY", "NONE")
#: Chart defaults (``global.proxy.*`` in istio-discovery values.yaml).
_DEFAULTS = {"-i": "*", "-x": "", "-b": "*", "-q": "", "-o": "", "-m": "REDIRECT"}
_ALL = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
_MAX_LEN = 64 * 1024  # far above what the API server accepts for one annotation value


# --------------------------------------------------------------------------- lists
def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise UsageError(f"{what}: expected a string, got {type(value).__name__}")
    if len(value) > _MAX_LEN:
        raise UsageError(f"{what}: value longer than {_MAX_LEN} characters")
    return value


def _obj(value: Any, what: str) -> Mapping[str, Any]:
    """``None`` -> ``{}``; a mapping as is; anything else is malformed input."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise UsageError(f"{what}: expected an object, got {type(value).__name__}")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise UsageError(f"{what}: expected a list, got {type(value).__name__}")
    return value


def _items(value: str) -> list[str]:
    # Istio splits on ","; surrounding spaces and empty items (trailing commas) are tolerated.
    return [p.strip() for p in value.split(",") if p.strip()]


def parse_ports(value: Any, what: str) -> tuple[int, ...]:
    """``"80, 443"`` -> ``(80, 443)``; order kept, duplicates dropped."""
    out: dict[int, None] = {}
    for item in _items(_text(value, what)):
        if not item.isascii() or not item.isdigit() or len(item) > 5:
            raise UsageError(f"{what}: {item[:40]!r} is not a port number")
        port = int(item)
        if not 0 < port < 65536:
            raise UsageError(f"{what}: port {port} out of range 1-65535")
        out[port] = None
    return tuple(out)


def parse_port_or_all(value: Any, what: str) -> tuple[int, ...] | None:
    """``"*"`` -> ``None`` (every port), otherwise a port list."""
    if _text(value, what).strip() == "*":
        return None
    return parse_ports(value, what)


def parse_cidrs(value: Any, what: str) -> tuple[IPNetwork, ...]:
    """``"*"`` -> all of IPv4 and IPv6; otherwise CIDRs (host bits allowed, as Istio's ParsePrefix)."""
    text = _text(value, what)
    if text.strip() == "*":
        return _ALL
    out: dict[IPNetwork, None] = {}
    for item in _items(text):
        if item == "*":
            return _ALL
        if "/" not in item:  # Istio parses with netip.ParsePrefix: a prefix length is required
            raise UsageError(f"{what}: {item[:60]!r} is not a CIDR (missing /prefix)")
        try:
            out[ipaddress.ip_network(item, strict=False)] = None
        except ValueError:
            raise UsageError(f"{what}: {item[:60]!r} is not a CIDR") from None
    return tuple(out)


def exclude_inbound_port(status_port: str, excluded: str) -> str:
    """Istio's ``excludeInboundPort`` template function (pkg/kube/inject)."""
    port = status_port.strip()
    if not port or port == "0":
        return excluded
    parts = excluded.split(",")
    if port in parts:
        return excluded
    kept = [p.strip() for p in parts if p.strip()]
    return ",".join(kept + [port])


# --------------------------------------------------------------------------- pod parts
def _containers(spec: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    out: list[Mapping[str, Any]] = []
    for key in ("initContainers", "containers"):
        out.extend(_obj(c, f"spec.{key}[]") for c in _list(spec.get(key), f"spec.{key}"))
    return out


def _container(spec: Mapping[str, Any], names: Iterable[str]) -> Mapping[str, Any] | None:
    wanted = tuple(names)
    for c in _containers(spec):
        if c.get("name") in wanted:
            return c
    return None


def init_args(spec: Mapping[str, Any]) -> dict[str, str]:
    """The ``istio-iptables`` flags of istio-init / istio-validation, ``{}`` without one."""
    c = _container(spec, INIT_CONTAINERS)
    if c is None:
        return {}
    args = _list(c.get("args"), f"{c.get('name')} args")
    if "istio-iptables" not in args[:1]:
        return {}
    flags: dict[str, str] = {}
    i = 1
    while i < len(args):
        a = str(args[i])
        if a.startswith("-") and not a.startswith("--") and i + 1 < len(args):
            flags[a] = str(args[i + 1])
            i += 2
        else:
            i += 1
    return flags


def _env(container: Mapping[str, Any] | None) -> dict[str, str]:
    if container is None:
        return {}
    out = {}
    for e in _list(container.get("env"), "istio-proxy env"):
        if isinstance(e, Mapping) and "value" in e and isinstance(e.get("name"), str):
            out[e["name"]] = str(e["value"])
    return out


def _prestop_status_port(proxy: Mapping[str, Any] | None) -> str | None:
    """The status port the injector rendered into ``pilot-agent request --debug-port=N``."""
    try:
        cmd = proxy["lifecycle"]["preStop"]["exec"]["command"]  # type: ignore[index]
    except (KeyError, TypeError):
        return None
    for a in cmd if isinstance(cmd, list) else []:
        if isinstance(a, str) and a.startswith("--debug-port="):
            return a.split("=", 1)[1]
    return None


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes", "on")


#: libyaml's parser where PyYAML has it: the pure-Python one took 2 ms per pod, a full resync
#: of 500 pods spent a second in it.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@functools.lru_cache(maxsize=512)
def _proxy_config_dns(text: str) -> bool | None:
    """ISTIO_META_DNS_CAPTURE of one ``proxy.istio.io/config`` text (None: not set there).

    Cached by text: a node's pods share a handful of proxy configs, and a resync reads all of them.
    """
    try:
        cfg = yaml.load(text, Loader=_YAML_LOADER)
    except yaml.YAMLError as exc:
        raise UsageError(f"{A_PROXY_CONFIG}: not YAML ({str(exc).splitlines()[0]})") from None
    if cfg is not None and not isinstance(cfg, Mapping):
        raise UsageError(f"{A_PROXY_CONFIG}: expected a mapping")
    meta = (cfg or {}).get("proxyMetadata")
    if isinstance(meta, Mapping) and DNS_CAPTURE_KEY in meta:
        return _truthy(meta[DNS_CAPTURE_KEY])
    return None


def dns_capture(annotations: Mapping[str, str], proxy: Mapping[str, Any] | None) -> bool:
    """ISTIO_META_DNS_CAPTURE from ``proxy.istio.io/config`` (runtime) or the proxy env (injection time)."""
    raw = annotations.get(A_PROXY_CONFIG)
    if raw is not None:
        configured = _proxy_config_dns(_text(raw, A_PROXY_CONFIG))
        if configured is not None:
            return configured
    env = _env(proxy)
    if DNS_CAPTURE_KEY in env:
        return _truthy(env[DNS_CAPTURE_KEY])
    # PROXY_CONFIG env holds the merged mesh default config as JSON.
    try:
        merged = json.loads(env.get("PROXY_CONFIG", "{}") or "{}")
    except ValueError:
        merged = {}
    meta = merged.get("proxyMetadata") if isinstance(merged, dict) else None
    return isinstance(meta, dict) and _truthy(meta.get(DNS_CAPTURE_KEY, "false"))


def pod_ips(status: Mapping[str, Any]) -> tuple[IPAddress, ...]:
    raw = [_obj(p, "status.podIPs[]").get("ip") for p in _list(status.get("podIPs"), "status.podIPs")]
    if not raw and status.get("podIP"):
        raw = [status["podIP"]]
    out: dict[IPAddress, None] = {}
    for ip in raw:
        try:
            out[ipaddress.ip_address(str(ip))] = None
        except ValueError:
            raise UsageError(f"status.podIPs: {str(ip)[:60]!r} is not an IP address") from None
    return tuple(out)


def _uid(value: Any, default: int, what: str) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).isdigit():
        raise UsageError(f"{what}: {str(value)[:40]!r} is not a numeric id")
    n = int(value)
    if n >= 2**32:
        raise UsageError(f"{what}: {n} out of range")
    return n


# --------------------------------------------------------------------------- the decision
def _annotations(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    if not isinstance(pod, Mapping):
        raise UsageError("pod: expected an object")
    return _obj(_obj(pod.get("metadata"), "metadata").get("annotations"), "metadata.annotations")


def is_opted_in(pod: Mapping[str, Any]) -> bool:
    try:
        ann = _annotations(pod)
    except UsageError:
        return False
    if ann.get(OPT_IN_ANNOTATION) == OPT_IN_VALUE:
        return True
    templates = ann.get(A_TEMPLATES, "")
    if not isinstance(templates, str):
        return False
    return any(t.strip() == OPT_IN_VALUE or t.strip().startswith(OPT_IN_VALUE + "-")
               for t in templates.split(","))


A_INJECT = "sidecar.istio.io/inject"
A_SIDECAR_STATUS = "sidecar.istio.io/status"


@dataclass(frozen=True)
class Ignored:
    """Why an opted-in pod is left alone; ``warning`` when the opt-in looks like a mistake."""

    reason: str
    warning: bool


def _parse_bool(value: Any) -> bool | None:
    """Go's strconv.ParseBool, which Istio uses for ``sidecar.istio.io/inject``; None if not a bool."""
    text = str(value)
    if text in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if text in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    return None


def ignored(pod: Mapping[str, Any]) -> Ignored | None:
    """Why the opt-in of ``pod`` is ignored, ``None`` when the pod is to be captured.

    The sidecar checks are istio-cni's own (``CmdAdd``: the pods it programs redirection for):
    an ``istio-proxy`` container running as a sidecar, Envoy not disabled, injection not turned
    off (label first, then annotation), and the injector's ``sidecar.istio.io/status``. Without
    a sidecar, capture would send the pod's connections to a 15001/15006 nobody listens on.
    TPROXY and NONE keep Istio's own behaviour (istio-init's TPROXY rules; no capture at all),
    exactly as the ``ebpf`` injection template leaves such pods to the stock ``sidecar`` one.
    Malformed objects raise :class:`UsageError`.
    """
    ann = _annotations(pod)
    meta = _obj(pod.get("metadata"), "metadata")
    spec = _obj(pod.get("spec"), "spec")
    if spec.get("hostNetwork"):
        return Ignored("hostNetwork pod: Istio injects no sidecar into it", True)
    labels = _obj(meta.get("labels"), "metadata.labels")
    inject = labels[A_INJECT] if A_INJECT in labels else ann.get(A_INJECT)
    if inject is not None and _parse_bool(inject) is False:
        return Ignored(f"{A_INJECT} is {inject!r}: the pod has no sidecar", True)
    proxy = _container(spec, (PROXY_CONTAINER,))
    if proxy is None:
        return Ignored(f"no {PROXY_CONTAINER} container: the pod has no sidecar", True)
    args = _list(proxy.get("args"), f"{PROXY_CONTAINER} args")
    if len(args) >= 2 and args[0] == "proxy" and args[1] != "sidecar":
        return Ignored(f"{PROXY_CONTAINER} runs as {str(args[1])[:40]!r}, not as a sidecar", True)
    if _parse_bool(_env(proxy).get("DISABLE_ENVOY", "")) is True:
        return Ignored(f"DISABLE_ENVOY is set on {PROXY_CONTAINER}: there is no Envoy", True)
    if A_SIDECAR_STATUS not in ann:
        return Ignored(f"no {A_SIDECAR_STATUS} annotation: the sidecar was not injected by Istio", True)
    mode = interception_mode(pod)
    if mode == "TPROXY":
        return Ignored("interceptionMode TPROXY: the pod keeps istio-init's iptables rules", False)
    if mode == "NONE":
        return Ignored("interceptionMode NONE: Istio captures nothing for this pod", False)
    return None


def interception_mode(pod: Mapping[str, Any]) -> str:
    ann = _annotations(pod)
    spec = _obj(pod.get("spec"), "spec")
    mode = ann.get(A_INTERCEPTION) or init_args(spec).get("-m") or _DEFAULTS["-m"]
    mode = _text(mode, A_INTERCEPTION).strip()
    if mode not in INTERCEPTION_MODES:
        raise UsageError(f"{A_INTERCEPTION}: {mode[:40]!r} is not one of {', '.join(INTERCEPTION_MODES)}")
    return mode


def pod_config(pod: Mapping[str, Any]) -> PodConfig:
    """Build the capture configuration of one pod object (a dict as the API returns it)."""
    ann = _annotations(pod)
    spec = _obj(pod.get("spec"), "spec")
    status = _obj(pod.get("status"), "status")
    args = init_args(spec)
    proxy = _container(spec, (PROXY_CONTAINER,))

    def knob(annotation: str, flag: str) -> tuple[str, str]:
        if annotation in ann:
            return ann[annotation], annotation
        return args.get(flag, _DEFAULTS[flag]), f"istio-init {flag}"

    inc_cidrs, w = knob(A_INCLUDE_CIDRS, "-i")
    include_cidrs = parse_cidrs(inc_cidrs, w)
    exc_cidrs, w = knob(A_EXCLUDE_CIDRS, "-x")
    exclude_cidrs = parse_cidrs(exc_cidrs, w)
    inc_in, w = knob(A_INCLUDE_IN_PORTS, "-b")
    include_in = parse_port_or_all(inc_in, w)
    inc_out, w = knob(A_INCLUDE_OUT_PORTS, "-q")
    include_out = parse_ports(inc_out, w)
    exc_out, w = knob(A_EXCLUDE_OUT_PORTS, "-o")
    exclude_out = parse_ports(exc_out, w)

    # Status port: annotation > what the injector rendered into preStop > chart default.
    base_status = _prestop_status_port(proxy)
    if A_STATUS_PORT in ann:
        status_raw = _text(ann[A_STATUS_PORT], A_STATUS_PORT)
    else:
        status_raw = base_status if base_status is not None else str(DEFAULT_STATUS_PORT)
    status_port = parse_ports(status_raw, A_STATUS_PORT)[0] if status_raw.strip() not in ("", "0") else 0

    # -d: recompute from the knobs when either input is an annotation, else take istio-init's.
    if A_EXCLUDE_IN_PORTS in ann or A_STATUS_PORT in ann or "-d" not in args:
        if A_EXCLUDE_IN_PORTS in ann:
            excl = _text(ann[A_EXCLUDE_IN_PORTS], A_EXCLUDE_IN_PORTS)
        else:
            # the install value is istio-init's -d minus the fixed head and the old status port
            old = args.get("-d", "").split(",")[2:]
            drop = base_status or str(DEFAULT_STATUS_PORT)
            excl = ",".join(p for p in old if p.strip() != drop)
        rendered = exclude_inbound_port(str(status_port), excl)
        exclude_in = parse_ports(",".join(map(str, ALWAYS_EXCLUDED_INBOUND)) + "," + rendered,
                                 A_EXCLUDE_IN_PORTS)
    else:
        exclude_in = parse_ports(args["-d"], "istio-init -d")

    mode = interception_mode(pod)
    # Envoy's identity: istio-init's -u when there is one (the injector's own answer, e.g. -u 1234
    # for a TPROXY pod whose Envoy runs as root), else istio-proxy's runAsUser, else 1337.
    # istio-iptables defaults -g to the -u value.
    sc = _obj((proxy or {}).get("securityContext"), "istio-proxy securityContext")
    if "-u" in args:
        uid = _uid(args["-u"], PROXY_UID, "istio-init -u")
        gid = _uid(args.get("-g"), uid, "istio-init -g")
    elif mode == "TPROXY":  # Envoy runs as root there; the template hard-codes 1337
        uid, gid = PROXY_UID, PROXY_GID
    else:
        uid = _uid(sc.get("runAsUser"), PROXY_UID, "istio-proxy securityContext.runAsUser")
        gid = _uid(sc.get("runAsGroup"), uid, "istio-proxy securityContext.runAsGroup")

    return PodConfig(
        pod_ips=pod_ips(status),
        include_outbound_cidrs=include_cidrs,
        exclude_outbound_cidrs=exclude_cidrs,
        include_inbound_ports=include_in,
        exclude_inbound_ports=exclude_in,
        include_outbound_ports=include_out,
        exclude_outbound_ports=exclude_out,
        proxy_uid=uid,
        proxy_gid=gid,
        dns_capture=dns_capture(ann, proxy),
        status_port=status_port,
        init_bypass=containers.wants_bypass(ann),
    )


def pod_from_manifest(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A Pod from a Pod or a workload (Deployment/Job/...) manifest: its pod template."""
    if obj.get("kind") == "Pod":
        return dict(obj)
    spec = obj.get("spec") or {}
    template = spec.get("template") or (spec.get("jobTemplate") or {}).get("spec", {}).get("template")
    if not isinstance(template, Mapping):
        raise UsageError(f"{obj.get('kind')}: no pod template")
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": dict(template.get("metadata") or {}),
            "spec": dict(template.get("spec") or {}), "status": {}}
