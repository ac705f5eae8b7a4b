"""Which pods istio-cni's CNI plugin leaves alone, transcribed per release from its Go source.

The plugin (``cni/pkg/plugin/plugin.go``, ``CmdAdd``/``doAddRun``) programs iptables into
every new pod's network namespace unless one of its skip rules matches. The fixtures hold
``plugin.go`` and ``kubernetes.go`` of 1.14.0, 1.22.0, 1.26.0 and master
(``../shared/fixtures/istio/cni-plugin/<release>/``). Each rule below names the line of
``plugin.go`` (or ``kubernetes.go``) it comes from and a fragment of that line's code, and
:func:`check_references` verifies both against the fixture, so a transcription that drifts from
the source fails.

Left out, because they do not depend on the pod spec: the namespace exclusion list
(``exclude_namespaces``), the ambient branch (a pod with a sidecar status annotation is never an
ambient pod) and the "not a Kubernetes pod" case.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from .istio_fixtures import FIXTURES

CNI_PLUGIN = FIXTURES / "cni-plugin"
RELEASES = ("1.14.0", "1.22.0", "1.26.0", "master")
ISTIO_INIT = "istio-init"
ISTIO_PROXY = "istio-proxy"
INJECT = "sidecar.istio.io/inject"
STATUS = "sidecar.istio.io/status"
#: options.ProxyConfigEnv in 1.14's pilot-agent options: reading the proxy env stops there.
PROXY_CONFIG_ENV = "PROXY_CONFIG"


@dataclass(frozen=True)
class Ref:
    file: str   # plugin.go / kubernetes.go
    line: int
    code: str   # a fragment of that line


def _parse_bool(value: str) -> bool | None:
    """Go's strconv.ParseBool; None where it returns an error."""
    if value in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if value in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    return None


@dataclass(frozen=True)
class PodInfo:
    """The fields of the plugin's PodInfo the skip rules read (kubernetes.go)."""
    containers: frozenset[str]
    init_containers: frozenset[str]
    proxy_env: Mapping[str, str]
    proxy_type: str
    annotations: Mapping[str, str]
    labels: Mapping[str, str]


def _env(container: Mapping[str, Any], stop_at: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for e in container.get("env") or []:
        out[e["name"]] = str(e.get("value", ""))
        if stop_at is not None and e["name"] == stop_at:
            break
    return out


def pod_info(release: str, pod: Mapping[str, Any]) -> PodInfo:
    spec = pod.get("spec") or {}
    meta = pod.get("metadata") or {}
    inits = list(spec.get("initContainers") or [])
    regular = list(spec.get("containers") or [])
    if release == "1.14.0":
        # kubernetes.go:78-83: InitContainers from spec.initContainers, Containers from
        # spec.containers only; the proxy env only from a regular container named istio-proxy
        # (kubernetes.go:85), read up to PROXY_CONFIG (the `break` at kubernetes.go:100).
        proxy = next((c for c in regular if c["name"] == ISTIO_PROXY), None)
        return PodInfo(containers=frozenset(c["name"] for c in regular),
                       init_containers=frozenset(c["name"] for c in inits),
                       proxy_env=_env(proxy, PROXY_CONFIG_ENV) if proxy else {},
                       proxy_type="", annotations=meta.get("annotations") or {},
                       labels=meta.get("labels") or {})
    # 1.22+: containers() is initContainers + containers (kubernetes.go:103-106 / 105-108);
    # the proxy env and type come from the container named istio-proxy in either list.
    both = inits + regular
    env: dict[str, str] = {}
    proxy_type = ""
    for c in both:
        if c["name"] == ISTIO_PROXY:
            env.update(_env(c, None))
            args = c.get("args") or []
            if len(args) >= 2 and args[0] == "proxy":
                proxy_type = args[1]
    return PodInfo(containers=frozenset(c["name"] for c in both), init_containers=frozenset(),
                   proxy_env=env, proxy_type=proxy_type, annotations=meta.get("annotations") or {},
                   labels=meta.get("labels") or {})


@dataclass(frozen=True)
class Rule:
    name: str
    ref: Ref
    skips: Callable[[PodInfo], bool]


def _disable_envoy(pi: PodInfo) -> bool:
    return _parse_bool(pi.proxy_env.get("DISABLE_ENVOY", "")) is True


def _inject_false_114(pi: PodInfo) -> bool:
    return INJECT in pi.annotations and _parse_bool(str(pi.annotations[INJECT])) is False


def _inject_false(pi: PodInfo) -> bool:
    val = str(pi.labels[INJECT]) if INJECT in pi.labels else str(pi.annotations.get(INJECT, ""))
    return val != "" and _parse_bool(val) is False


def _rules_114() -> tuple[Rule, ...]:
    return (
        Rule("istio-init init container", Ref("plugin.go", 236, "pi.InitContainers[ISTIOINIT]"),
             lambda pi: ISTIO_INIT in pi.init_containers),
        Rule("DISABLE_ENVOY", Ref("plugin.go", 241, 'pi.ProxyEnvironments["DISABLE_ENVOY"]'), _disable_envoy),
        # plugin.go:248: the annotation checks run only for pods with more than one container;
        # a pod with one container is excluded (plugin.go:282).
        Rule("one container", Ref("plugin.go", 248, "len(pi.Containers) > 1"), lambda pi: len(pi.containers) <= 1),
        Rule("inject disabled", Ref("plugin.go", 250, "pi.Annotations[injectAnnotationKey]"), _inject_false_114),
        Rule("no sidecar status", Ref("plugin.go", 259, "pi.Annotations[sidecarStatusKey]"),
             lambda pi: STATUS not in pi.annotations),
    )


def _rules_new(lines: Mapping[str, int]) -> tuple[Rule, ...]:
    return (
        Rule("istio-init container", Ref("plugin.go", lines["init"], "pi.Containers.Contains(ISTIOINIT)"),
             lambda pi: ISTIO_INIT in pi.containers),
        Rule("DISABLE_ENVOY", Ref("plugin.go", lines["envoy"], 'pi.ProxyEnvironments["DISABLE_ENVOY"]'),
             _disable_envoy),
        Rule("no istio-proxy", Ref("plugin.go", lines["proxy"], "!pi.Containers.Contains(ISTIOPROXY)"),
             lambda pi: ISTIO_PROXY not in pi.containers),
        Rule("not a sidecar proxy", Ref("plugin.go", lines["type"], 'pi.ProxyType != "sidecar"'),
             lambda pi: pi.proxy_type not in ("", "sidecar")),
        Rule("inject disabled", Ref("plugin.go", lines["inject"], "pi.Annotations[injectAnnotationKey]"),
             _inject_false),
        Rule("no sidecar status", Ref("plugin.go", lines["status"], "pi.Annotations[sidecarStatusKey]"),
             lambda pi: STATUS not in pi.annotations),
    )


RULES: dict[str, tuple[Rule, ...]] = {
    "1.14.0": _rules_114(),
    "1.22.0": _rules_new({"init": 255, "envoy": 260, "proxy": 267, "type": 272, "inject": 277, "status": 292}),
    "1.26.0": _rules_new({"init": 289, "envoy": 294, "proxy": 301, "type": 306, "inject": 311, "status": 326}),
    "master": _rules_new({"init": 324, "envoy": 329, "proxy": 336, "type": 341, "inject": 346, "status": 361}),
}

def _sources_new(insert: int, proxy_type: int, containers: int, const: int) -> tuple[Ref, ...]:
    return (Ref("kubernetes.go", insert, "pi.Containers.Insert(c.Name)"),
            Ref("kubernetes.go", proxy_type, "pi.ProxyType = c.Args[1]"),
            Ref("kubernetes.go", containers, "res = append(res, pod.Spec.InitContainers...)"),
            Ref("plugin.go", const, 'ISTIOINIT  = "istio-init"'))


#: Where each release's PodInfo gets its container names (kubernetes.go), checked like the rules.
CONTAINER_SOURCES: dict[str, tuple[Ref, ...]] = {
    "1.14.0": (Ref("kubernetes.go", 79, "pi.InitContainers[initContainer.Name]"),
               Ref("kubernetes.go", 83, "pi.Containers[containerIdx] = container.Name"),
               Ref("kubernetes.go", 85, 'container.Name == "istio-proxy"'),
               Ref("kubernetes.go", 90, "e.Name == options.ProxyConfigEnv"),
               Ref("plugin.go", 47, 'ISTIOINIT = "istio-init"')),
    "1.22.0": _sources_new(79, 87, 103, 51),
    "1.26.0": _sources_new(81, 89, 105, 55),
    "master": _sources_new(81, 89, 105, 58),
}


def check_references(release: str) -> list[str]:
    """Every reference of ``release`` whose line does not hold its code (empty: all hold)."""
    bad = []
    for ref in [r.ref for r in RULES[release]] + list(CONTAINER_SOURCES[release]):
        lines = (CNI_PLUGIN / release / ref.file).read_text().splitlines()
        if ref.line > len(lines) or ref.code not in lines[ref.line - 1]:
            bad.append(f"{release} {ref.file}:{ref.line} does not contain {ref.code!r}")
    return bad


def skip_reasons(release: str, pod: Mapping[str, Any]) -> list[str]:
    """Every skip rule of ``release`` that matches ``pod``; empty: istio-cni programs iptables."""
    pi = pod_info(release, pod)
    return [f"{rule.name} (plugin.go:{rule.ref.line})" for rule in RULES[release] if rule.skips(pi)]


def source_file(release: str, name: str) -> Path:
    return CNI_PLUGIN / release / name
