"""Pod object -> PodConfig, checked against what Istio's injector rendered into istio-init."""

from __future__ import annotations

import copy
import ipaddress
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support.istio_fixtures import FIXTURES
from istio_ebpf_plugin.agent import pod_spec
from istio_ebpf_plugin.agent.pod_spec import (
    A_EXCLUDE_CIDRS, A_EXCLUDE_IN_PORTS, A_EXCLUDE_OUT_PORTS, A_INCLUDE_CIDRS, A_INCLUDE_IN_PORTS,
    A_INCLUDE_OUT_PORTS, A_PROXY_CONFIG, A_STATUS_PORT, init_args, pod_config, pod_from_manifest)
from istio_ebpf_plugin.errors import UsageError

INJECTED = sorted(FIXTURES.glob("*/inject/*.injected"))


def load(path: Path) -> dict:
    doc = next(d for d in yaml.safe_load_all(path.read_text()) if d)
    pod = pod_from_manifest(doc)
    pod["status"] = {"podIPs": [{"ip": "10.1.2.3"}, {"ip": "fd00::3"}]}
    return pod


def config_from_args(args: dict[str, str]) -> dict:
    """Independent reading of istio-iptables flags, as istio-iptables itself reads them."""
    def cidrs(v: str):
        if v.strip() == "*":
            return {ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")}
        return {ipaddress.ip_network(c, strict=False) for c in v.split(",") if c}

    def ports(v: str):
        return [int(p) for p in v.split(",") if p]

    return {
        "include_outbound_cidrs": cidrs(args["-i"]),
        "exclude_outbound_cidrs": cidrs(args["-x"]),
        "include_inbound_ports": None if args["-b"] == "*" else tuple(ports(args["-b"])),
        "exclude_inbound_ports": tuple(ports(args["-d"])),
        "include_outbound_ports": tuple(ports(args.get("-q", ""))),
        "exclude_outbound_ports": tuple(ports(args.get("-o", ""))),
        "proxy_uid": int(args["-u"]),
    }


def as_dict(cfg) -> dict:
    return {
        "include_outbound_cidrs": set(cfg.include_outbound_cidrs),
        "exclude_outbound_cidrs": set(cfg.exclude_outbound_cidrs),
        "include_inbound_ports": cfg.include_inbound_ports,
        "exclude_inbound_ports": cfg.exclude_inbound_ports,
        "include_outbound_ports": cfg.include_outbound_ports,
        "exclude_outbound_ports": cfg.exclude_outbound_ports,
        "proxy_uid": cfg.proxy_uid,
    }


WITH_INIT = [p for p in INJECTED if init_args(load(p)["spec"])]


def test_fixture_set_is_the_real_one():
    assert len(INJECTED) >= 30 and len(WITH_INIT) >= 20


@pytest.mark.parametrize("path", WITH_INIT, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_matches_istio_init_args_of_every_injected_pod(path):
    pod = load(path)
    assert as_dict(pod_config(pod)) == config_from_args(init_args(pod["spec"]))


def _without_init(pod: dict) -> dict:
    pod = copy.deepcopy(pod)
    for key in ("initContainers", "containers"):
        pod["spec"][key] = [c for c in pod["spec"].get(key) or []
                            if c.get("name") not in ("istio-init", "istio-validation")]
    return pod


@pytest.mark.parametrize("name", ["traffic-annotations.yaml.injected", "hello.yaml.cni.injected",
                                  "status_annotations.yaml.injected"])
def test_annotations_alone_give_what_the_injector_rendered(name):
    """The derivation (-d = 15090,15021 + excludeInboundPort(status, excluded)) from annotations only
    reproduces istio-init's arguments: the ebpf template has no istio-init to read."""
    pod = load(FIXTURES / "master" / "inject" / name)
    expected = config_from_args(init_args(pod["spec"]))
    assert as_dict(pod_config(_without_init(pod))) == expected


def test_traffic_annotations_values():
    cfg = pod_config(load(FIXTURES / "master/inject/traffic-annotations.yaml.injected"))
    assert cfg.include_inbound_ports == (1, 2, 3)
    assert cfg.exclude_inbound_ports == (15090, 15021, 4, 5, 6, 15020)
    assert cfg.exclude_outbound_ports == (7, 8, 9)
    assert cfg.include_outbound_cidrs == (ipaddress.ip_network("127.0.0.0/24"), ipaddress.ip_network("10.96.0.0/24"))
    assert cfg.exclude_outbound_cidrs == (ipaddress.ip_network("10.96.0.0/24"),)  # .2/24 and .3/24: one net
    assert cfg.pod_ips == (ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("fd00::3"))
    assert cfg.status_port == 15020 and cfg.dns_capture is False


def test_install_values_come_from_istio_init_when_no_annotation():
    # traffic-params: values (statusPort=0, excludeInboundPorts=4,5,6) exist only in istio-init's args
    cfg = pod_config(load(FIXTURES / "master/inject/traffic-params.yaml.injected"))
    assert cfg.status_port == 0
    assert cfg.exclude_inbound_ports == (15090, 15021, 4, 5, 6)


def test_runtime_annotation_beats_istio_init():
    pod = load(FIXTURES / "master/inject/hello.yaml.injected")
    pod["metadata"]["annotations"].update({A_EXCLUDE_OUT_PORTS: "5432, 6379", A_STATUS_PORT: "15999",
                                           A_INCLUDE_IN_PORTS: "8080"})
    cfg = pod_config(pod)
    assert cfg.exclude_outbound_ports == (5432, 6379)
    assert cfg.include_inbound_ports == (8080,)
    assert cfg.status_port == 15999
    assert cfg.exclude_inbound_ports == (15090, 15021, 15999)  # old status port 15020 replaced


def test_proxy_uid_from_istio_proxy_security_context():
    assert pod_config(load(FIXTURES / "master/inject/proxy-override-runas.yaml.injected")).proxy_uid == 1234
    assert pod_config(load(FIXTURES / "master/inject/proxy-override-runas.yaml.cni.injected")).proxy_uid == 1234
    # TPROXY: Envoy runs as root (runAsUser 0) but istio-init still exempts -u 1234
    assert pod_config(load(FIXTURES / "master/inject/proxy-override-runas.yaml.tproxy.injected")).proxy_uid == 1234
    # no istio-init (the ebpf template): runAsUser/runAsGroup of istio-proxy
    cfg = pod_config(_without_init(load(FIXTURES / "master/inject/proxy-override-runas.yaml.injected")))
    assert (cfg.proxy_uid, cfg.proxy_gid) == (1234, 4321)


def test_interception_mode():
    assert pod_spec.interception_mode(load(FIXTURES / "master/inject/hello-tproxy.yaml.injected")) == "TPROXY"
    assert pod_spec.interception_mode(
        load(FIXTURES / "master/inject/init-no-intercept-no-native-sidecar.yaml.injected")) == "NONE"
    pod = load(FIXTURES / "master/inject/hello.yaml.injected")
    pod["metadata"]["annotations"]["sidecar.istio.io/interceptionMode"] = "EBPF!"
    with pytest.raises(UsageError, match="interceptionMode"):
        pod_spec.interception_mode(pod)


def test_dns_capture_from_annotation_and_proxy_env():
    pod = load(FIXTURES / "master/inject/hello.yaml.injected")
    assert pod_config(pod).dns_capture is False
    pod["metadata"]["annotations"][A_PROXY_CONFIG] = "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n"
    assert pod_config(pod).dns_capture is True
    # env frozen at injection (meshConfig defaultConfig.proxyMetadata); the annotation (runtime) wins
    hello = load(FIXTURES / "master/inject/hello.yaml.injected")
    sidecar = next(c for c in hello["spec"]["initContainers"] if c["name"] == "istio-proxy")
    sidecar["env"].append({"name": "ISTIO_META_DNS_CAPTURE", "value": "true"})
    assert pod_config(hello).dns_capture is True
    hello["metadata"]["annotations"][A_PROXY_CONFIG] = "proxyMetadata: {ISTIO_META_DNS_CAPTURE: 'false'}"
    assert pod_config(hello).dns_capture is False
    hello["metadata"]["annotations"][A_PROXY_CONFIG] = "proxyMetadata: [unclosed"
    with pytest.raises(UsageError, match="proxy.istio.io/config"):
        pod_config(hello)


def test_opt_in():
    pod = load(FIXTURES / "master/inject/hello.yaml.injected")
    assert not pod_spec.is_opted_in(pod)
    pod["metadata"]["annotations"]["istio-ebpf.io/redirect"] = "ebpf"
    assert pod_spec.is_opted_in(pod)
    pod = load(FIXTURES / "master/inject/multiple-templates.yaml.injected")
    assert not pod_spec.is_opted_in(pod)
    pod["metadata"]["annotations"]["inject.istio.io/templates"] = "sidecar, ebpf"
    assert pod_spec.is_opted_in(pod)
    pod["metadata"]["annotations"]["inject.istio.io/templates"] = "sidecar,notebpf"
    assert not pod_spec.is_opted_in(pod)


@pytest.mark.parametrize("ann,value,match", [
    (A_INCLUDE_IN_PORTS, "80,http", "not a port"),
    (A_EXCLUDE_OUT_PORTS, "70000", "out of range"),
    (A_EXCLUDE_OUT_PORTS, "0", "out of range"),
    (A_INCLUDE_OUT_PORTS, "-1", "not a port"),
    (A_INCLUDE_CIDRS, "10.0.0.0/33", "not a CIDR"),
    (A_EXCLUDE_CIDRS, "10.0.0.1", "missing /prefix"),
    (A_STATUS_PORT, "abc", "not a port"),
    (A_EXCLUDE_IN_PORTS, "１２３", "not a port"),  # full-width digits are not ASCII digits
])
def test_garbage_is_a_clear_usage_error(ann, value, match):
    pod = load(FIXTURES / "master/inject/hello.yaml.injected")
    pod["metadata"]["annotations"][ann] = value
    with pytest.raises(UsageError, match=match) as exc:
        pod_config(pod)
    assert ann.split("/")[-1] in str(exc.value) or "status" in str(exc.value)
    assert "\n" not in str(exc.value)


# ------------------------------------------------------------------ properties
ports = st.integers(min_value=1, max_value=65535)
v4 = st.builds(lambda a, p: ipaddress.ip_network((a, p), strict=False),
               st.integers(0, 2**32 - 1), st.integers(0, 32))
v6 = st.builds(lambda a, p: ipaddress.ip_network((a, p), strict=False),
               st.integers(0, 2**128 - 1), st.integers(0, 128))
spaces = st.sampled_from(["", " ", "  "])
BASE = load(FIXTURES / "master/inject/hello.yaml.injected")


def _join(items, sp):
    return ",".join(f"{sp}{i}{sp}" for i in items)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inc=st.lists(ports, max_size=50), exc=st.lists(ports, max_size=50), status=st.one_of(st.just(0), ports),
       out_inc=st.lists(ports, max_size=30), out_exc=st.lists(ports, max_size=3000), sp=spaces)
def test_property_ports_like_the_injector(inc, exc, status, out_inc, out_exc, sp):
    pod = copy.deepcopy(BASE)
    pod["metadata"]["annotations"].update({
        A_INCLUDE_IN_PORTS: _join(inc, sp) if inc else "*", A_EXCLUDE_IN_PORTS: _join(exc, sp),
        A_STATUS_PORT: str(status), A_INCLUDE_OUT_PORTS: _join(out_inc, sp),
        A_EXCLUDE_OUT_PORTS: _join(out_exc, sp)})
    cfg = pod_config(pod)
    assert cfg.include_inbound_ports == (tuple(dict.fromkeys(inc)) if inc else None)
    assert cfg.exclude_outbound_ports == tuple(dict.fromkeys(out_exc))  # thousands: no silent cap
    assert cfg.include_outbound_ports == tuple(dict.fromkeys(out_inc))
    # istio-init -d: 15090,15021 first, then the excluded ports, the status port appended unless 0/listed
    expected = [15090, 15021] + exc + ([status] if status and status not in exc else [])
    assert cfg.exclude_inbound_ports == tuple(dict.fromkeys(expected))
    assert cfg.status_port == status


@settings(max_examples=200, deadline=None)
@given(inc=st.lists(st.one_of(v4, v6), max_size=40), exc=st.lists(st.one_of(v4, v6), max_size=40),
       star=st.booleans(), sp=spaces)
def test_property_cidrs_ipv4_ipv6(inc, exc, star, sp):
    pod = copy.deepcopy(BASE)
    pod["metadata"]["annotations"].update({A_INCLUDE_CIDRS: "*" if star else _join(inc, sp),
                                           A_EXCLUDE_CIDRS: _join(exc, sp)})
    cfg = pod_config(pod)
    if star:
        assert set(cfg.include_outbound_cidrs) == {ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")}
    else:
        assert cfg.include_outbound_cidrs == tuple(dict.fromkeys(inc))
    assert cfg.exclude_outbound_cidrs == tuple(dict.fromkeys(exc))


ANNOTATIONS = [A_INCLUDE_CIDRS, A_EXCLUDE_CIDRS, A_INCLUDE_IN_PORTS, A_EXCLUDE_IN_PORTS, A_INCLUDE_OUT_PORTS,
               A_EXCLUDE_OUT_PORTS, A_STATUS_PORT, A_PROXY_CONFIG, "sidecar.istio.io/interceptionMode"]


@settings(max_examples=400, deadline=None)
@given(values=st.dictionaries(st.sampled_from(ANNOTATIONS),
                              st.one_of(st.text(max_size=60), st.text(alphabet="0123456789,*/.: -abcdef", max_size=60),
                                        st.integers(), st.none(), st.lists(st.integers(), max_size=3)),
                              min_size=1))
def test_property_garbage_never_crashes(values):
    pod = copy.deepcopy(BASE)
    pod["metadata"]["annotations"].update(values)
    try:
        cfg = pod_config(pod)
    except UsageError as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        assert all(0 < p < 65536 for p in cfg.exclude_inbound_ports + cfg.exclude_outbound_ports)


@settings(max_examples=100, deadline=None)
@given(garbage=st.recursive(st.one_of(st.none(), st.integers(), st.text(max_size=10)),
                            lambda c: st.one_of(st.lists(c, max_size=3),
                                                      st.dictionaries(st.text(max_size=8), c, max_size=3)),
                            max_leaves=12),
       where=st.sampled_from(["metadata", "spec", "status", "annotations", "containers", "podIPs"]))
def test_property_malformed_pod_objects(garbage, where):
    pod = copy.deepcopy(BASE)
    if where == "annotations":
        pod["metadata"]["annotations"] = garbage
    elif where == "containers":
        pod["spec"]["initContainers"] = garbage
    elif where == "podIPs":
        pod["status"] = {"podIPs": garbage}
    else:
        pod[where] = garbage
    try:
        pod_config(pod)
    except UsageError as exc:
        assert "\n" not in str(exc)


# What istio-cni's CmdAdd would do with each injected fixture (cni-plugin/*/plugin.go): program
# redirection (None here) or leave the pod alone, and why. TPROXY/NONE: Istio's own rules or none.
NOT_CAPTURED = {
    "custom-template.yaml.injected": "no istio-proxy container",
    "gateway.yaml.injected": "runs as 'router', not as a sidecar",
    "grpc-agent.yaml.injected": "DISABLE_ENVOY",
    "hello-host-network.yaml.injected": "hostNetwork",
    "hello-tproxy.yaml.injected": "interceptionMode TPROXY",
    "proxy-override-runas.yaml.tproxy.injected": "interceptionMode TPROXY",
    "init-no-intercept-no-native-sidecar.yaml.injected": "interceptionMode NONE",
}


@pytest.mark.parametrize("path", INJECTED, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_opt_in_applies_only_to_sidecar_pods(path):
    why = pod_spec.ignored(load(path))
    expected = NOT_CAPTURED.get(path.name)
    if expected is None:
        assert why is None, why
    else:
        assert why is not None and expected in why.reason
        assert why.warning is ("interceptionMode" not in expected)   # TPROXY/NONE: as documented


def test_opt_in_ignored_when_injection_is_off_or_the_sidecar_is_missing():
    pod = load(FIXTURES / "master" / "inject" / "hello.yaml.injected")
    assert pod_spec.ignored(pod) is None
    for where in ("labels", "annotations"):
        for value in ("false", "0", "F", "FALSE"):
            off = copy.deepcopy(pod)
            off["metadata"].setdefault(where, {})["sidecar.istio.io/inject"] = value
            assert "sidecar.istio.io/inject" in pod_spec.ignored(off).reason
    # the label wins over the annotation (istio-cni's order); a non-bool value is not "off"
    on = copy.deepcopy(pod)
    on["metadata"]["labels"] = {"sidecar.istio.io/inject": "true"}
    on["metadata"]["annotations"]["sidecar.istio.io/inject"] = "false"
    assert pod_spec.ignored(on) is None
    on["metadata"]["labels"]["sidecar.istio.io/inject"] = "maybe"
    assert pod_spec.ignored(on) is None
    raw = load(FIXTURES / "master" / "inject" / "hello.yaml")
    assert "no istio-proxy container" in pod_spec.ignored(raw).reason
    nostatus = copy.deepcopy(pod)
    del nostatus["metadata"]["annotations"]["sidecar.istio.io/status"]
    assert "sidecar.istio.io/status" in pod_spec.ignored(nostatus).reason
