"""The differential capture table: the same connection cases against any capture mechanism.

Topology (:class:`CaptureLab`): four pods on one :class:`~.node.Node`:

* ``a``: captured pod, the source of outbound cases (app = UID/GID 1000, proxy = 1337);
* ``b``: captured pod with the same configuration, the destination of inbound cases;
* ``c``: plain pod (never captured): an outside client for inbound cases and an
  uncaptured destination for outbound cases;
* ``u``: captured pod in its own user namespace (``hostUsers: false``: its IDs are other IDs
  on the host), source and destination of the user-namespace family (``userns-*``: the
  identity-dependent cases of a and b, repeated from it).

Every pod runs :mod:`.probe_server` as UID/GID 1337: sidecar listeners 15001/15006/15053
and "direct" targets on :data:`TARGET_PORTS` (TCP) and 53 (UDP). A case names a
configuration (:data:`CONFIGS`), the source pod and credentials, a symbolic destination
(``b4`` = pod b's IPv4, ``a6`` = pod a's own IPv6, ``lo4`` = 127.0.0.1, ``pt4`` = 127.0.0.6,
``pt6`` = ::6, ``c4m`` = pod c's IPv4 as IPv4-mapped IPv6, ...) and the expected outcome derived
from Istio's rules (``cni-plugin/*.txt.golden``; the rule that decides is quoted in each case's
``why``). What is compared per connection is a :class:`View`: listener or errno, strict
SO_ORIGINAL_DST, the app's getpeername/getsockname, the listener's local address and peer, the
UDP reply's source. :data:`KNOWN_DIFFERENCES` lists, per mode, the fields eBPF may differ in.

Usage against Istio's iptables (tests/test_harness_iptables.py) and, unchanged, against the
eBPF datapath::

    lab = CaptureLab(node)
    results = lab.run(CASES, install=lambda pod, cfg: pod.apply_istio_iptables(cfg),
                      uninstall=lambda pod, handle: pod.flush_iptables())
    # eBPF: install=ebpf_installer(dp)  (the proxy IDs made host IDs, as the agent does),
    #       uninstall=lambda pod, handle: dp.remove_pod(handle)
    assert not failures(results), report(results)
"""

from __future__ import annotations

import errno
import ipaddress
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Iterable, NamedTuple, Sequence

from ..datapath import userns
from ..datapath.podconfig import PodConfig
from ..datapath.selftest.topology import POD_SYSCTLS
from .conntrack import plain
from .probe import Outcome, ProbeServer, start_probe_server

if TYPE_CHECKING:  # pragma: no cover
    from .node import Node, Pod

APP = (1000, 1000)
PROXY = (1337, 1337)
PROXY_UID_ONLY = (1337, 1000)
PROXY_GID_ONLY = (1000, 1337)
#: A pod whose proxy runs as another identity (``-u 2000 -g 2000``, sidecar.istio.io/proxyUID).
CUSTOM = (2000, 2000)
CUSTOM_UID_ONLY = (2000, 1000)
CUSTOM_GID_ONLY = (1000, 2000)

#: The pods' ephemeral port range (harness/node.py POD_SYSCTLS): where the kernel picks source ports.
EPHEMERAL = tuple(int(x) for x in POD_SYSCTLS["net.ipv4.ip_local_port_range"].split())

TARGET_PORTS = (53, 7070, 8080, 8081, 9090, 15008, 15020, 15021, 15090)
UDP_TARGET_PORTS = (53,)

_net = ipaddress.ip_network


def _ips(pod: "Pod") -> tuple:
    return (ipaddress.ip_address(pod.ipv4), ipaddress.ip_address(pod.ipv6))


def _host_nets(pod: "Pod") -> tuple:
    return (_net(f"{pod.ipv4}/32"), _net(f"{pod.ipv6}/128"))


#: Configuration name -> PodConfig for a captured pod (given the lab, for addresses).
CONFIGS: dict[str, Callable[["CaptureLab", "Pod"], PodConfig]] = {
    # A stock injected pod: -i '*' -b '*' -d 15090,15021,15020 (+ status port 15020 outbound).
    "default": lambda lab, pod: PodConfig(pod_ips=_ips(pod)),
    "excl-ports": lambda lab, pod: PodConfig(
        pod_ips=_ips(pod), exclude_outbound_ports=(9090,),
        exclude_inbound_ports=(15090, 15021, 15020, 7070)),
    "excl-cidr": lambda lab, pod: PodConfig(pod_ips=_ips(pod), exclude_outbound_cidrs=_host_nets(lab.c)),
    "incl-cidr": lambda lab, pod: PodConfig(
        pod_ips=_ips(pod), include_outbound_cidrs=_host_nets(lab.b), include_outbound_ports=(8081,)),
    "incl-port-excl-cidr": lambda lab, pod: PodConfig(
        pod_ips=_ips(pod), include_outbound_cidrs=(), include_outbound_ports=(8081,),
        exclude_outbound_cidrs=_host_nets(lab.c)),
    "incl-inbound": lambda lab, pod: PodConfig(pod_ips=_ips(pod), include_inbound_ports=(8080,)),
    "no-inbound": lambda lab, pod: PodConfig(pod_ips=_ips(pod), include_inbound_ports=()),
    "dns": lambda lab, pod: PodConfig(pod_ips=_ips(pod), dns_capture=True),
    "proxy-uid": lambda lab, pod: PodConfig(pod_ips=_ips(pod), proxy_uid=CUSTOM[0], proxy_gid=CUSTOM[1]),
    # -b 7070,9090: only the listed inbound ports.
    "incl-inbound-multi": lambda lab, pod: PodConfig(pod_ips=_ips(pod), include_inbound_ports=(7070, 9090)),
    # -i <b and c's /24, /64> -x <c> -q 9090 -o 8081: every list at once, ports and CIDRs interleaved.
    "lists-mix": lambda lab, pod: PodConfig(
        pod_ips=_ips(pod), include_outbound_cidrs=(_net(f"{lab.b.ipv4}/24", strict=False),
                                                  _net(f"{lab.b.ipv6}/64", strict=False)),
        exclude_outbound_cidrs=_host_nets(lab.c), include_outbound_ports=(9090,), exclude_outbound_ports=(8081,)),
}


@dataclass(frozen=True)
class Case:
    """One connection and the outcome Istio's rules give it.

    ``expect``: listener name; ``expect_pod``: pod whose listener answers;
    ``expect_orig``: ``"<dst symbol>:<port>"`` the listener must see as original
    destination (outbound/inbound only); for UDP ``expect_reply_from`` is the source
    the client must see on the reply (the address it sent to, i.e. NAT undone).
    """

    id: str
    config: str
    src: str
    creds: tuple[int, int]
    dst: str
    port: int
    expect: str
    expect_pod: str | None
    why: str
    proto: str = "tcp"
    expect_orig: str | None = None
    bind: str | None = None   # source symbol to bind (port 0) or None
    #: the rules that decide it (O_*/I_* below): ``explain`` must name them, the counters count them
    rules: tuple[str, ...] = ()

    @property
    def uid(self) -> int:
        return self.creds[0]

    @property
    def gid(self) -> int:
        return self.creds[1]


def _c(id: str, config: str, src: str, creds: tuple[int, int], dst: str, port: int, expect: str,
       pod: str | None, why: str, *, proto: str = "tcp", orig: bool | None = None,
       rules: tuple[str, ...] = ()) -> Case:
    if orig is None:
        orig = expect in ("outbound", "inbound")
    return Case(id=id, config=config, src=src, creds=creds, dst=dst, port=port, expect=expect,
                expect_pod=pod, why=why, proto=proto, expect_orig=f"{dst}:{port}" if orig else None, rules=rules)


#: The rules that decide a case, as ``explain`` and the per-pod counters name them
#: (datapath/maps.POD_COUNTERS): the outbound rule at the source pod (when it is captured and a
#: hook decides), then the inbound rule at the destination pod (a connection that reaches another
#: captured pod's address).
O_CIDR = "out_captured_cidr"
O_PORT = "out_captured_port"
O_XPORT = "out_pass_excluded_port"
O_LO = "out_pass_local_uid"
O_PUID = "out_pass_proxy_uid"
O_PGID = "out_pass_proxy_gid"
O_SELF = "out_captured_proxy_uid_local"
O_XCIDR = "out_pass_excluded_cidr"
O_NOTIN = "out_pass_not_included"
O_DNS = "out_dns"
I_ALL = "in_captured_all_ports"
I_PORT = "in_captured_port"
I_XPORT = "in_pass_excluded_port"
I_HBONE = "in_pass_hbone"
I_NOTIN = "in_pass_not_included"

R_OUT = "ISTIO_OUTPUT -j ISTIO_REDIRECT (app traffic leaving the pod)"
R_LO_APP = "-o lo -m owner ! --uid-owner 1337 -j RETURN (app over lo is not captured)"
R_LO_DST = "-d 127.0.0.1/32 -j RETURN / -o lo RETURN"
R_PROXY_SELF = "-o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT"
R_PROXY_OUT = "-m owner --uid-owner 1337 -j RETURN (proxy traffic is never captured outbound)"
R_PROXY_GID = "-m owner --gid-owner 1337 -j RETURN"
R_IN = "PREROUTING -p tcp -j ISTIO_INBOUND ... -j ISTIO_IN_REDIRECT (inbound to 15006)"
R_IN_EXCL = "ISTIO_INBOUND -p tcp --dport <port> -j RETURN (excluded inbound port)"
R_HBONE = "ISTIO_INBOUND -p tcp --dport 15008 -j RETURN"
R_STATUS_OUT = "ISTIO_OUTPUT -p tcp --dport 15020 -j RETURN (status port, CNI)"


def _default_cases() -> list[Case]:
    cs: list[Case] = []
    d = "default"
    for f in ("4", "6"):
        cs += [
            _c(f"out-app-b{f}-8080", d, "a", APP, f"b{f}", 8080, "outbound", "a", R_OUT, rules=(O_CIDR,)),
            _c(f"out-app-c{f}-8080", d, "a", APP, f"c{f}", 8080, "outbound", "a", R_OUT, rules=(O_CIDR,)),
            _c(f"out-app-b{f}-15008", d, "a", APP, f"b{f}", 15008, "outbound", "a",
               "app traffic to 15008 of another pod is captured like any port: " + R_OUT, rules=(O_CIDR,)),
            _c(f"out-app-c{f}-15020", d, "a", APP, f"c{f}", 15020, "direct", "c", R_STATUS_OUT, rules=(O_XPORT,)),
            _c(f"out-app-lo{f}-8080", d, "a", APP, f"lo{f}", 8080, "direct", "a", R_LO_DST, rules=(O_LO,)),
            _c(f"out-app-self{f}-8080", d, "a", APP, f"a{f}", 8080, "direct", "a", R_LO_APP, rules=(O_LO,)),
            _c(f"out-app-pt{f}-8080", d, "a", APP, f"pt{f}", 8080, "direct", "a", "-o lo -s 127.0.0.6 / " + R_LO_APP,
               rules=(O_LO,)),
            _c(f"out-proxy-c{f}-8080", d, "a", PROXY, f"c{f}", 8080, "direct", "c", R_PROXY_OUT, rules=(O_PUID,)),
            _c(f"out-proxy-b{f}-8080", d, "a", PROXY, f"b{f}", 8080, "inbound", "b",
               R_PROXY_OUT + "; then b's " + R_IN, rules=(O_PUID, I_ALL)),
            _c(f"out-proxyuid-c{f}-8080", d, "a", PROXY_UID_ONLY, f"c{f}", 8080, "direct", "c", R_PROXY_OUT,
               rules=(O_PUID,)),
            _c(f"out-proxygid-c{f}-8080", d, "a", PROXY_GID_ONLY, f"c{f}", 8080, "direct", "c", R_PROXY_GID,
               rules=(O_PGID,)),
            _c(f"proxy-self{f}-8080", d, "a", PROXY, f"a{f}", 8080, "inbound", "a", R_PROXY_SELF, rules=(O_SELF,)),
            _c(f"proxyuid-self{f}-8080", d, "a", PROXY_UID_ONLY, f"a{f}", 8080, "inbound", "a", R_PROXY_SELF,
               rules=(O_SELF,)),
            _c(f"proxy-self{f}-15008", d, "a", PROXY, f"a{f}", 15008, "direct", "a",
               R_PROXY_SELF + " does not match 15008; " + R_PROXY_OUT, rules=(O_PUID,)),
            _c(f"proxy-lo{f}-8080", d, "a", PROXY, f"lo{f}", 8080, "direct", "a", R_PROXY_SELF + " excludes loopback",
               rules=(O_PUID,)),
            _c(f"proxygid-self{f}-8080", d, "a", PROXY_GID_ONLY, f"a{f}", 8080, "direct", "a",
               "uid rules first: " + R_LO_APP, rules=(O_LO,)),
            _c(f"in-c-b{f}-8080", d, "c", APP, f"b{f}", 8080, "inbound", "b", R_IN, rules=(I_ALL,)),
            _c(f"in-c-b{f}-9090", d, "c", APP, f"b{f}", 9090, "inbound", "b", R_IN, rules=(I_ALL,)),
            _c(f"in-c-b{f}-15008", d, "c", APP, f"b{f}", 15008, "direct", "b", R_HBONE, rules=(I_HBONE,)),
            _c(f"in-c-b{f}-15020", d, "c", APP, f"b{f}", 15020, "direct", "b", R_IN_EXCL, rules=(I_XPORT,)),
            _c(f"in-c-b{f}-15021", d, "c", APP, f"b{f}", 15021, "direct", "b", R_IN_EXCL, rules=(I_XPORT,)),
            _c(f"in-c-b{f}-15090", d, "c", APP, f"b{f}", 15090, "direct", "b", R_IN_EXCL, rules=(I_XPORT,)),
            _c(f"udp-app-c{f}-53-nodns", d, "a", APP, f"c{f}", 53, "direct", "c",
               "no DNS capture: UDP is never redirected", proto="udp", rules=()),
            _c(f"tcp-app-c{f}-53-nodns", d, "a", APP, f"c{f}", 53, "outbound", "a",
               "no DNS capture: TCP 53 is ordinary outbound: " + R_OUT, rules=(O_CIDR,)),
        ]
    # istio-validation: listeners on 127.0.0.1:15001/15006, a proxy-owned connection to
    # 127.0.0.6:15002 must report original destination port 15002.
    cs.append(_c("validation-pt4-15002", d, "a", PROXY, "pt4", 15002, "inbound", "a",
                 "istio-validation check: " + R_PROXY_SELF, rules=(O_SELF,)))
    # The same from the app identity is not captured (lo RETURN), so nothing listens there.
    cs.append(_c("out-app-pt4-15002", d, "a", APP, "pt4", 15002, "refused", None, R_LO_APP, rules=(O_LO,)))
    # An app that binds (wildcard, port 0: the port is taken at bind time) before connecting.
    for f in ("4", "6"):
        cs.append(replace(_c(f"out-app-bound-c{f}-8080", d, "a", APP, f"c{f}", 8080, "outbound", "a",
                             "bind() first changes nothing for iptables: " + R_OUT, rules=(O_CIDR,)), bind=f"any{f}"))
    return cs


def _config_cases() -> list[Case]:
    cs: list[Case] = []
    for f in ("4", "6"):
        e = "excl-ports"
        cs += [
            _c(f"exclport-app-c{f}-9090", e, "a", APP, f"c{f}", 9090, "direct", "c",
               "-o 9090: ISTIO_OUTPUT --dport 9090 -j RETURN", rules=(O_XPORT,)),
            _c(f"exclport-app-c{f}-8080", e, "a", APP, f"c{f}", 8080, "outbound", "a", R_OUT, rules=(O_CIDR,)),
            _c(f"exclport-in-b{f}-7070", e, "c", APP, f"b{f}", 7070, "direct", "b", R_IN_EXCL, rules=(I_XPORT,)),
            _c(f"exclport-in-b{f}-9090", e, "c", APP, f"b{f}", 9090, "inbound", "b",
               "-o only affects outbound; " + R_IN, rules=(I_ALL,)),
        ]
        e = "excl-cidr"
        cs += [
            _c(f"exclcidr-app-c{f}-8080", e, "a", APP, f"c{f}", 8080, "direct", "c",
               "-x: ISTIO_OUTPUT -d <cidr> -j RETURN", rules=(O_XCIDR,)),
            _c(f"exclcidr-app-b{f}-8080", e, "a", APP, f"b{f}", 8080, "outbound", "a", R_OUT, rules=(O_CIDR,)),
        ]
        e = "incl-cidr"
        cs += [
            _c(f"inclcidr-app-b{f}-8080", e, "a", APP, f"b{f}", 8080, "outbound", "a",
               "-i: ISTIO_OUTPUT -d <cidr> -j ISTIO_REDIRECT", rules=(O_CIDR,)),
            _c(f"inclcidr-app-c{f}-8080", e, "a", APP, f"c{f}", 8080, "direct", "c",
               "not in -i: falls off ISTIO_OUTPUT", rules=(O_NOTIN,)),
            _c(f"inclcidr-app-c{f}-8081", e, "a", APP, f"c{f}", 8081, "outbound", "a",
               "-q 8081: ISTIO_OUTPUT -p tcp --dport 8081 -j ISTIO_REDIRECT", rules=(O_PORT,)),
            _c(f"inclcidr-app-self{f}-8080", e, "a", APP, f"a{f}", 8080, "direct", "a", R_LO_APP, rules=(O_LO,)),
        ]
        e = "incl-port-excl-cidr"
        cs += [
            _c(f"inclport-exclcidr-app-c{f}-8081", e, "a", APP, f"c{f}", 8081, "direct", "c",
               "-x RETURN comes before the -q rules: excluded CIDRs win", rules=(O_XCIDR,)),
            _c(f"inclport-exclcidr-app-b{f}-8081", e, "a", APP, f"b{f}", 8081, "outbound", "a", "-q 8081",
               rules=(O_PORT,)),
            _c(f"inclport-exclcidr-app-b{f}-8080", e, "a", APP, f"b{f}", 8080, "inbound", "b",
               "empty -i: not captured in a; b's " + R_IN, rules=(O_NOTIN, I_ALL)),
        ]
        e = "incl-inbound"
        cs += [
            _c(f"inclin-in-b{f}-8080", e, "c", APP, f"b{f}", 8080, "inbound", "b",
               "-b 8080: --dport 8080 -j ISTIO_IN_REDIRECT", rules=(I_PORT,)),
            _c(f"inclin-in-b{f}-8081", e, "c", APP, f"b{f}", 8081, "direct", "b", "port not in -b", rules=(I_NOTIN,)),
        ]
        e = "no-inbound"
        cs += [
            _c(f"noin-in-b{f}-8080", e, "c", APP, f"b{f}", 8080, "direct", "b", "empty -b: no PREROUTING jump",
               rules=(I_NOTIN,)),
            _c(f"noin-app-b{f}-8080", e, "a", APP, f"b{f}", 8080, "outbound", "a", R_OUT, rules=(O_CIDR,)),
        ]
        e = "dns"
        cs += [
            _c(f"dns-udp-app-c{f}-53", e, "a", APP, f"c{f}", 53, "dns", "a",
               "ISTIO_OUTPUT_DNS -p udp --dport 53 -j REDIRECT --to-port 15053", proto="udp", rules=(O_DNS,)),
            _c(f"dns-tcp-app-c{f}-53", e, "a", APP, f"c{f}", 53, "dns", "a",
               "ISTIO_OUTPUT_DNS -p tcp --dport 53 -j REDIRECT --to-ports 15053", orig=True, rules=(O_DNS,)),
            _c(f"dns-udp-proxy-c{f}-53", e, "a", PROXY, f"c{f}", 53, "direct", "c",
               "the agent's own queries: -m owner --uid-owner 1337 -j RETURN", proto="udp", rules=(O_PUID,)),
            _c(f"dns-udp-app-lo{f}-53", e, "a", APP, f"lo{f}", 53, "dns", "a",
               "capture-all DNS also catches a resolver on localhost", proto="udp", rules=(O_DNS,)),
            _c(f"dns-tcp-app-c{f}-8080", e, "a", APP, f"c{f}", 8080, "outbound", "a", R_OUT, rules=(O_CIDR,)),
        ]
        e = "proxy-uid"
        cs += [
            _c(f"puid-1337-c{f}-8080", e, "a", PROXY, f"c{f}", 8080, "outbound", "a",
               "-u 2000 -g 2000: UID 1337 is an ordinary app; " + R_OUT, rules=(O_CIDR,)),
            _c(f"puid-custom-c{f}-8080", e, "a", CUSTOM, f"c{f}", 8080, "direct", "c", "--uid-owner 2000 -j RETURN",
               rules=(O_PUID,)),
            _c(f"puid-custom-self{f}-8080", e, "a", CUSTOM, f"a{f}", 8080, "inbound", "a",
               "-o lo ! -d 127.0.0.1 --uid-owner 2000 -j ISTIO_IN_REDIRECT", rules=(O_SELF,)),
            _c(f"puid-customuid-self{f}-8080", e, "a", CUSTOM_UID_ONLY, f"a{f}", 8080, "inbound", "a",
               "--uid-owner 2000 -j ISTIO_IN_REDIRECT", rules=(O_SELF,)),
            _c(f"puid-customgid-c{f}-8080", e, "a", CUSTOM_GID_ONLY, f"c{f}", 8080, "direct", "c",
               "--gid-owner 2000 -j RETURN", rules=(O_PGID,)),
            _c(f"puid-customgid-self{f}-8080", e, "a", CUSTOM_GID_ONLY, f"a{f}", 8080, "direct", "a",
               "uid rules first: " + R_LO_APP, rules=(O_LO,)),
            _c(f"puid-1337-self{f}-8080", e, "a", PROXY, f"a{f}", 8080, "direct", "a",
               "UID 1337 is an app here: " + R_LO_APP, rules=(O_LO,)),
            _c(f"puid-custom-b{f}-8080", e, "a", CUSTOM, f"b{f}", 8080, "inbound", "b",
               "--uid-owner 2000 -j RETURN; then b's " + R_IN, rules=(O_PUID, I_ALL)),
        ]
        e = "incl-inbound-multi"
        cs += [
            _c(f"inclin2-in-b{f}-7070", e, "c", APP, f"b{f}", 7070, "inbound", "b", "-b 7070,9090", rules=(I_PORT,)),
            _c(f"inclin2-in-b{f}-9090", e, "c", APP, f"b{f}", 9090, "inbound", "b", "-b 7070,9090", rules=(I_PORT,)),
            _c(f"inclin2-in-b{f}-8080", e, "c", APP, f"b{f}", 8080, "direct", "b", "port not in -b", rules=(I_NOTIN,)),
            _c(f"inclin2-in-b{f}-15020", e, "c", APP, f"b{f}", 15020, "direct", "b", "port not in -b",
               rules=(I_NOTIN,)),
        ]
        e = "lists-mix"
        cs += [
            _c(f"mix-app-b{f}-8080", e, "a", APP, f"b{f}", 8080, "outbound", "a", "-i <b's subnet>", rules=(O_CIDR,)),
            _c(f"mix-app-b{f}-8081", e, "a", APP, f"b{f}", 8081, "inbound", "b",
               "-o 8081 RETURN comes first; then b's " + R_IN, rules=(O_XPORT, I_ALL)),
            _c(f"mix-app-c{f}-8080", e, "a", APP, f"c{f}", 8080, "direct", "c", "-x <c> RETURN", rules=(O_XCIDR,)),
            _c(f"mix-app-c{f}-9090", e, "a", APP, f"c{f}", 9090, "direct", "c", "-x RETURN comes before -q 9090",
               rules=(O_XCIDR,)),
            _c(f"mix-app-b{f}-9090", e, "a", APP, f"b{f}", 9090, "outbound", "a", "-q 9090", rules=(O_PORT,)),
            _c(f"mix-proxy-c{f}-8080", e, "a", PROXY, f"c{f}", 8080, "direct", "c", R_PROXY_OUT, rules=(O_PUID,)),
        ]
    return cs


def _v4mapped_cases() -> list[Case]:
    """IPv4 traffic on an IPv6 socket (``::ffff:a.b.c.d``): iptables (not ip6tables) decides it."""
    d = "default"
    return [
        _c("v4m-app-c-8080", d, "a", APP, "c4m", 8080, "outbound", "a", "IPv4 " + R_OUT, rules=(O_CIDR,)),
        _c("v4m-app-b-15008", d, "a", APP, "b4m", 15008, "outbound", "a", "IPv4 " + R_OUT, rules=(O_CIDR,)),
        _c("v4m-app-c-15020", d, "a", APP, "c4m", 15020, "direct", "c", R_STATUS_OUT, rules=(O_XPORT,)),
        _c("v4m-app-lo-8080", d, "a", APP, "lo4m", 8080, "direct", "a", R_LO_DST, rules=(O_LO,)),
        _c("v4m-app-self-8080", d, "a", APP, "a4m", 8080, "direct", "a", R_LO_APP, rules=(O_LO,)),
        _c("v4m-proxy-self-8080", d, "a", PROXY, "a4m", 8080, "inbound", "a", R_PROXY_SELF, rules=(O_SELF,)),
        _c("v4m-proxy-c-8080", d, "a", PROXY, "c4m", 8080, "direct", "c", R_PROXY_OUT, rules=(O_PUID,)),
        _c("v4m-in-c-b-8080", d, "c", APP, "b4m", 8080, "inbound", "b", "IPv4 " + R_IN, rules=(I_ALL,)),
        _c("v4m-in-c-b-15021", d, "c", APP, "b4m", 15021, "direct", "b", R_IN_EXCL, rules=(I_XPORT,)),
        _c("v4m-dns-tcp-app-c-53", "dns", "a", APP, "c4m", 53, "dns", "a",
           "ISTIO_OUTPUT_DNS -p tcp --dport 53", orig=True, rules=(O_DNS,)),
    ]


#: The cases the user-namespace family repeats from pod ``u`` (every rule that reads the
#: connecting identity, the app's counterparts, DNS, and inbound), by id without the family.
_USERNS_FROM = {f"{stem}{f}{rest}" for f in ("4", "6") for stem, rest in (
    ("out-app-c", "-8080"), ("out-app-self", "-8080"), ("out-proxy-c", "-8080"), ("out-proxy-b", "-8080"),
    ("out-proxyuid-c", "-8080"), ("out-proxygid-c", "-8080"), ("proxy-self", "-8080"),
    ("proxyuid-self", "-8080"), ("proxy-self", "-15008"), ("proxy-lo", "-8080"), ("proxygid-self", "-8080"),
    ("in-c-b", "-8080"), ("dns-udp-app-c", "-53"), ("dns-udp-proxy-c", "-53"),
    ("puid-1337-c", "-8080"), ("puid-custom-c", "-8080"), ("puid-custom-self", "-8080"),
    ("puid-customuid-self", "-8080"), ("puid-customgid-c", "-8080"), ("puid-customgid-self", "-8080"),
    ("puid-1337-self", "-8080"), ("puid-custom-b", "-8080"))} | {"validation-pt4-15002", "out-app-pt4-15002"}


def _in_userns_pod(case: Case) -> Case:
    """``case`` with pod ``u`` (its own user namespace, IDs shifted on the host) in pod a's place
    (outbound) or pod b's (inbound from c). Istio's rules give the same outcome: the owner match
    reads UIDs through the network namespace's user namespace."""
    was = "a" if case.src == "a" else "b"

    def sub(symbol: str | None) -> str | None:
        return "u" + symbol[1:] if symbol and symbol[0] == was else symbol

    return replace(case, id=f"userns-{case.id}", src=sub(case.src) or case.src, dst=sub(case.dst) or case.dst,
                   expect_pod=sub(case.expect_pod), expect_orig=sub(case.expect_orig),
                   why=f"in a user namespace: {case.why}")


_BASE_CASES = _default_cases() + _config_cases() + _v4mapped_cases()
CASES: tuple[Case, ...] = tuple(_BASE_CASES + [_in_userns_pod(c) for c in _BASE_CASES if c.id in _USERNS_FROM])


#: ``CaptureLab.run``'s hook around one probe: (case, captured pod name -> handle, probe) -> outcome.
Around = Callable[[Case, dict[str, Any], Callable[[], Outcome]], Outcome]


class View(NamedTuple):
    """Everything observable about one connection, as the table compares it.

    ``orig``: SO_ORIGINAL_DST at a redirect listener, strictly (``"errno <NAME>"`` when it has
    no answer; the socket's local address is never used instead). ``app_peer``/``app_local``:
    getpeername()/getsockname() of the client socket; the local port is compared as "in the
    ephemeral range" (its value differs run to run). ``listener_local``: the listener socket's
    local address (without port: sk_lookup keeps the original port, REDIRECT shows 15006).
    ``peer_is_app``: the listener saw the client socket's own address and port as its peer, or
    the port conntrack gave it instead (:attr:`Outcome.nat_peer`): under iptables a REDIRECT
    reply tuple left by an earlier connection from the same source port makes NAT pick another
    one, which Envoy then sees too. Only a translation conntrack records is accepted, so a
    datapath without NAT must show the socket's own port.
    """

    listener: str
    pod: str | None
    orig: Any = None
    reply_from: Any = None
    errno: str | None = None
    app_peer: Any = None
    app_local: Any = None
    listener_local: str | None = None
    peer_is_app: bool | None = None


def _norm(ip: str) -> str:
    return str(ipaddress.ip_address(ip))


def _errname(num: int | None) -> str:
    return errno.errorcode.get(num or 0, str(num))


@dataclass(frozen=True)
class CaseResult:
    case: Case
    outcome: Outcome
    expected: View
    got: View

    @property
    def ok(self) -> bool:
        return self.expected == self.got


class CaptureLab:
    """Pods a, b, c with probe servers, ready to run :data:`CASES` under some capture mechanism."""

    def __init__(self, node: "Node") -> None:
        self.node = node
        self.a = node.add_pod("a")
        self.b = node.add_pod("b")
        self.c = node.add_pod("c")
        self.u = node.add_pod("u", userns=True)
        self.servers: list[ProbeServer] = [
            start_probe_server(p, targets=TARGET_PORTS, udp_targets=UDP_TARGET_PORTS) for p in self.pods]

    @property
    def pods(self) -> tuple["Pod", ...]:
        return (self.a, self.b, self.c, self.u)

    @property
    def captured(self) -> tuple["Pod", ...]:
        return (self.a, self.b, self.u)

    def pod(self, name: str) -> "Pod":
        return {"a": self.a, "b": self.b, "c": self.c, "u": self.u}[name]

    def address(self, symbol: str) -> str:
        """``b4``/``b6``: pod b's addresses; ``b4m``: b's IPv4 as ``::ffff:`` on an IPv6 socket."""
        if symbol.endswith("m"):
            return "::ffff:" + self.address(symbol[:-1])
        fixed = {"lo4": "127.0.0.1", "lo6": "::1", "pt4": "127.0.0.6", "pt6": "::6", "any4": "0.0.0.0", "any6": "::"}
        if symbol in fixed:
            return fixed[symbol]
        pod = self.pod(symbol[0])
        return pod.ipv4 if symbol[1:] == "4" else pod.ipv6

    def source_address(self, case: Case) -> str:
        """The address the kernel picks for the client socket with no capture at all (what
        the application sees under iptables, where NAT is invisible): the route's source."""
        dst = case.dst
        mapped = dst.endswith("m")
        base = dst[:-1] if mapped else dst
        if base in ("lo4", "pt4"):
            src = "127.0.0.1"
        elif base in ("lo6", "pt6"):
            src = {"lo6": "::1", "pt6": "::6"}[base]    # ::6 is on lo: it is its own source
        else:
            src = self.address(case.src + base[1:])
        return _norm("::ffff:" + src if mapped else src)

    def podconfig(self, config: str, pod: "Pod") -> PodConfig:
        return CONFIGS[config](self, pod)

    def expected_key(self, case: Case) -> View:
        orig = None
        if case.expect_orig:
            sym, _, port = case.expect_orig.rpartition(":")
            orig = (plain(self.address(sym)), int(port))
        reply_from = None
        if case.proto == "udp" and case.expect in ("dns", "direct"):
            reply_from = (_norm(self.address(case.dst)), case.port)
        connected = case.proto == "tcp" and case.expect in ("outbound", "inbound", "dns", "direct")
        if not connected:
            return View(case.expect, case.expect_pod, orig, reply_from,
                        errno="ECONNREFUSED" if case.expect == "refused" else None)
        # Where the accepting socket sits: REDIRECT in OUTPUT (and the connect hooks) send to
        # loopback; inbound from another pod keeps the pod IP; a direct connection its target.
        family6 = (case.dst.endswith("6") and not case.dst.endswith("m"))
        if case.expect in ("outbound", "dns") or (case.expect == "inbound" and case.src == case.expect_pod):
            listener_local = "::1" if family6 else "127.0.0.1"
        else:
            listener_local = plain(self.address(case.dst))
        return View(case.expect, case.expect_pod, orig, reply_from, errno=None,
                    app_peer=(_norm(self.address(case.dst)), case.port),
                    app_local=(self.source_address(case), "ephemeral"),
                    listener_local=listener_local, peer_is_app=True)

    @staticmethod
    def outcome_key(case: Case, outcome: Outcome) -> View:
        orig = None
        if case.proto == "tcp" and outcome.listener in ("outbound", "inbound", "dns"):
            orig = outcome.orig_dst or f"errno {_errname(outcome.orig_dst_errno)}"
        reply_from = outcome.reply_from if case.proto == "udp" else None
        if case.proto != "tcp" or outcome.client_local is None:
            return View(outcome.listener, outcome.pod, orig, reply_from, errno=outcome.errno)
        lip, lport = outcome.client_local
        in_range = EPHEMERAL[0] <= lport <= EPHEMERAL[1]
        seen = (plain(outcome.seen_peer[0]), outcome.seen_peer[1]) if outcome.seen_peer else None
        peer_is_app = seen is not None and (seen == (plain(lip), lport) or seen == outcome.nat_peer)
        return View(outcome.listener, outcome.pod, orig, reply_from, errno=outcome.errno,
                    app_peer=outcome.client_peer, app_local=(lip, "ephemeral" if in_range else lport),
                    listener_local=plain(outcome.local[0]) if outcome.local else None,
                    peer_is_app=peer_is_app)

    def probe(self, case: Case) -> Outcome:
        bind = (self.address(case.bind), 0) if case.bind else None
        out = self.node.probe_connect(self.pod(case.src), case.uid, case.gid, self.address(case.dst), case.port,
                                      bind=bind, proto=case.proto, timeout=2.0)
        assert isinstance(out, Outcome)
        return out

    def run(self, cases: Iterable[Case], install: Callable[["Pod", PodConfig], Any],
            uninstall: Callable[["Pod", Any], None], around: "Around | None" = None) -> list[CaseResult]:
        """Run cases grouped by configuration; ``install`` is called for the captured pods per config.
        ``around(case, handles, probe)`` (handles: pod name -> what install returned) runs each
        probe itself, to look at the datapath before and after it."""
        cases = list(cases)
        results: list[CaseResult] = []
        for config in dict.fromkeys(c.config for c in cases):
            handles = []
            try:
                for pod in self.captured:
                    handles.append((pod, install(pod, self.podconfig(config, pod))))
                by_name = {pod.name: handle for pod, handle in handles}
                for case in (c for c in cases if c.config == config):
                    if around is None:
                        outcome = self.probe(case)
                    else:
                        outcome = around(case, by_name, lambda case=case: self.probe(case))
                    results.append(CaseResult(case, outcome, self.expected_key(case), self.outcome_key(case, outcome)))
            finally:
                for pod, handle in reversed(handles):
                    uninstall(pod, handle)
        return results


#: Documented differences of a capture mode from Istio's iptables: case id -> fields allowed to
#: differ (README "identical to Istio"). Pod-IP mode binds every captured TCP socket to the pod
#: IP (its tuples must be unique on the node), so for a captured loopback destination (only the
#: proxy's own 127.0.0.6 connections, e.g. istio-validation) the listener sees the pod IP as
#: peer while the app, through getsockname(), sees loopback as under iptables.
#: A socket bound to a port before connect() cannot be bound to the pod IP any more: cookie mode
#: leaves it on loopback (the listener sees 127.0.0.1 as peer; the app's getsockname() still
#: shows the pod IP), pod-IP mode refuses the connection (fail closed, counter podip_bind_fail).
_BOUND = ("out-app-bound-c4-8080", "out-app-bound-c6-8080")
_VALIDATION = ("validation-pt4-15002", "userns-validation-pt4-15002")
KNOWN_DIFFERENCES: dict[str, dict[str, frozenset[str]]] = {
    "cookie": {c: frozenset({"peer_is_app"}) for c in _BOUND},
    "podip": {**{c: frozenset({"peer_is_app"}) for c in _VALIDATION},
              **{c: frozenset(View._fields) for c in _BOUND}},
}


def ebpf_installer(dp: Any) -> Callable[["Pod", PodConfig], Any]:
    """``install`` for :meth:`CaptureLab.run` with a loaded ``Datapath``: the pod's entries, with
    the proxy's IDs made host IDs as the agent makes them (pods in their own user namespace)."""
    def install(pod: "Pod", cfg: PodConfig) -> Any:
        return dp.add_pod(pod.netns_path, userns.host_config(cfg, pod.netns_path, pod.pids()),
                          str(pod.cgroup_path))
    return install


def failures(results: Sequence[CaseResult], allowed: dict[str, frozenset[str]] | None = None) -> list[CaseResult]:
    """Cases whose view differs, except fields ``allowed`` documents for that case id."""
    allowed = allowed or {}
    out = []
    for r in results:
        fields = {f for f, e, g in zip(View._fields, r.expected, r.got, strict=True) if e != g}
        if fields - allowed.get(r.case.id, frozenset()):
            out.append(r)
    return out


def report(results: Sequence[CaseResult], allowed: dict[str, frozenset[str]] | None = None) -> str:
    """Readable table of mismatches (empty string if none)."""
    lines = []
    for r in failures(results, allowed):
        diff = {f: (e, g) for f, e, g in zip(View._fields, r.expected, r.got, strict=True) if e != g}
        lines.append(f"{r.case.id} [{r.case.config}] uid/gid={r.case.uid}/{r.case.gid} "
                     f"{r.case.proto} -> {r.case.dst}:{r.case.port}\n"
                     f"    differs (expected, got): {diff}\n    raw={r.outcome.raw} nat_peer={r.outcome.nat_peer}\n"
                     f"    rule: {r.case.why}")
    return "\n".join(lines)


def subset(ids: Iterable[str]) -> tuple[Case, ...]:
    wanted = set(ids)
    return tuple(c for c in CASES if c.id in wanted)


def with_config(case: Case, config: str) -> Case:
    return replace(case, config=config)
