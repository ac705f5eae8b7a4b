"""ctypes mirrors of bpf/abi.h and the encoding of a PodConfig.

Every struct, flag, kind, counter and default map size here has the name it has in the header
(a struct names its C struct in ``c_name``). Each build checks them against the header by name
and value (:mod:`.abi_check`: the node's compile fails on a mismatch, naming it), and
tests/test_maps_layout.py compares them with the types BCC describes for every map in
:data:`MAP_TYPES`.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import Any

from .podconfig import IPAddress, IPNetwork, PodConfig

POD_INBOUND_ALL = 1 << 0
POD_DNS_CAPTURE = 1 << 1
POD_OUT_PORT_INCL = 1 << 2
POD_INIT_BYPASS = 1 << 3

PORT_IN_INCLUDE, PORT_IN_EXCLUDE, PORT_OUT_INCLUDE, PORT_OUT_EXCLUDE = 1, 2, 3, 4
CIDR_EXCLUDE, CIDR_INCLUDE = 1, 2

#: conn_key.kind: the app end of a connection redirected to a loopback listener, or the client
#: end of an inbound connection sk_lookup handed to 15006.
CONN_REDIRECTED, CONN_INBOUND = 1, 2

#: The getsockopt the programs answer (SOL_IP; IP6T_SO_ORIGINAL_DST on SOL_IPV6 is the same number).
SO_ORIGINAL_DST = 80

#: Map sizes by build flag (bpf/abi.h: DEFAULT_<flag>); sized for real nodes, never silently small.
DEFAULT_MAP_SIZES = {"MAX_PODS": 16384, "MAX_CONNS": 131072, "MAX_PORTS": 262144, "MAX_CIDRS": 262144}

#: The counters array, in enum counter order (C_<NAME>).
COUNTERS = (
    "out_redirect", "in_redirect_local", "inbound_assign", "inbound_no_listener",
    "dns_redirect", "origdst_hit", "origdst_miss", "tuple_stored", "podip_bind_fail",
    "sockmap_insert", "sockmap_msgs", "sockmap_bytes", "raw_socket_denied", "app_view_restored",
    "init_bypass",
)


#: The per-pod counters, in enum pod_counter order (PC_<NAME>): first the rules of Istio's chains
#: (each counted when it decides a connection: outbound_rule(), inbound_rule()), then events.
#: Append only: an upgrade carries a pod's totals to the next version by index.
POD_COUNTERS = (
    # ISTIO_OUTPUT, in chain order
    "out_pass_excluded_port", "out_pass_passthrough_src",
    "out_captured_proxy_uid_local", "out_pass_local_uid", "out_pass_proxy_uid",
    "out_captured_proxy_gid_local", "out_pass_local_gid", "out_pass_proxy_gid",
    "out_dns", "out_pass_not_tcp", "out_pass_loopback", "out_pass_excluded_cidr",
    "out_captured_port", "out_captured_cidr", "out_pass_not_included",
    # ISTIO_INBOUND
    "in_pass_hbone", "in_pass_excluded_port", "in_captured_all_ports", "in_captured_port", "in_pass_not_included",
    # events
    "in_no_listener", "origdst_hit", "origdst_miss", "raw_socket_denied", "podip_bind_fail",
)
#: The rules among them (what ``explain`` names as the deciding rule).
OUTBOUND_RULES = POD_COUNTERS[:POD_COUNTERS.index("in_pass_hbone")]
INBOUND_RULES = POD_COUNTERS[len(OUTBOUND_RULES):POD_COUNTERS.index("in_no_listener")]

#: explain (bpf/explain.c): where the request sits in the test packet, its directions, the statuses.
EXPLAIN_REQ_OFFSET = 14
EXPLAIN_OUTBOUND, EXPLAIN_INBOUND = 1, 2
EXPLAIN_DECIDED, EXPLAIN_NO_POD, EXPLAIN_NO_POD_IP, EXPLAIN_OWN_POD, EXPLAIN_UDP_IGNORED = 1, 2, 3, 4, 5


class IpAddr(ctypes.Structure):
    c_name = "ip_addr"
    _fields_ = [("family", ctypes.c_uint32), ("a", ctypes.c_uint8 * 16)]

    @classmethod
    def of(cls, ip: IPAddress) -> "IpAddr":
        v = cls()
        v.family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        raw = ip.packed
        ctypes.memmove(v.a, raw, len(raw))
        return v

    def address(self) -> IPAddress:
        raw = bytes(self.a)
        return ipaddress.ip_address(raw[:4] if self.family == socket.AF_INET else raw)


#: bpf/abi.h STATE_LAYOUT_VERSION: the connection-state maps' layout (names the shared state directory).
STATE_LAYOUT_VERSION = 1

#: The build variant (bpf/abi.h ISTIO_EBPF_VARIANT): N words appended to pod_cfg. A build setting
#: of the whole process, like the image it ships in (Containerfile ARG DATAPATH_VARIANT): two
#: builds that differ in it differ in a CONFIG map's value layout, which an upgrade must survive.
VARIANT_ENV = "ISTIO_EBPF_DATAPATH_VARIANT"
VARIANT = int(os.environ.get(VARIANT_ENV, "0") or 0)


_POD_CFG_FIELDS: list[Any] = [("pod_id", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                               ("proxy_uid", ctypes.c_uint32), ("proxy_gid", ctypes.c_uint32),
                               ("ip4", ctypes.c_uint8 * 4), ("ip6", ctypes.c_uint8 * 16)]
if VARIANT:
    _POD_CFG_FIELDS.append(("variant", ctypes.c_uint32 * VARIANT))


class PodCfg(ctypes.Structure):
    c_name = "pod_cfg"
    _fields_ = _POD_CFG_FIELDS


class PodIpVal(ctypes.Structure):
    c_name = "pod_ip_val"
    _fields_ = [("pod_id", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("netns_cookie", ctypes.c_uint64)]


class PortKey(ctypes.Structure):
    c_name = "port_key"
    _fields_ = [("pod_id", ctypes.c_uint32), ("kind", ctypes.c_uint16), ("port", ctypes.c_uint16)]


class CidrKey(ctypes.Structure):
    c_name = "cidr_key"
    _fields_ = [("prefixlen", ctypes.c_uint32), ("pod_id", ctypes.c_uint32), ("kind", ctypes.c_uint8),
                ("family", ctypes.c_uint8), ("pad", ctypes.c_uint16), ("addr", ctypes.c_uint8 * 16)]


class Origin(ctypes.Structure):
    c_name = "origin"
    _fields_ = [("ip", IpAddr), ("port", ctypes.c_uint16), ("listener", ctypes.c_uint16)]


class AppView(ctypes.Structure):
    c_name = "app_view"
    _fields_ = [("peer", Origin), ("local", IpAddr)]


class ConnKey(ctypes.Structure):
    c_name = "conn_key"
    _fields_ = [("netns", ctypes.c_uint64), ("ip", IpAddr), ("port", ctypes.c_uint16),
                ("kind", ctypes.c_uint8), ("pad", ctypes.c_uint8)]


class SockKey(ctypes.Structure):
    c_name = "sock_key"
    _fields_ = [("netns", ctypes.c_uint64), ("local", IpAddr), ("remote", IpAddr),
                ("local_port", ctypes.c_uint32), ("remote_port", ctypes.c_uint32)]


class PodCounters(ctypes.Structure):
    c_name = "pod_counters"
    _fields_ = [("c", ctypes.c_uint64 * len(POD_COUNTERS))]

    def named(self) -> dict[str, int]:
        return dict(zip(POD_COUNTERS, (int(v) for v in self.c), strict=True))

    @classmethod
    def of(cls, values: "list[int]") -> "PodCounters":
        """From the first len(POD_COUNTERS) values (another version's may be fewer: the rest 0)."""
        out = cls()
        for i, v in enumerate(values[:len(POD_COUNTERS)]):
            out.c[i] = v
        return out


class ExplainReq(ctypes.Structure):
    c_name = "explain_req"
    _fields_ = [("pod", ctypes.c_uint64), ("peer", IpAddr), ("bound", IpAddr), ("uid", ctypes.c_uint32),
                ("gid", ctypes.c_uint32), ("port", ctypes.c_uint16), ("direction", ctypes.c_uint8),
                ("tcp", ctypes.c_uint8)]


class ExplainAns(ctypes.Structure):
    c_name = "explain_ans"
    _fields_ = [("status", ctypes.c_uint32), ("rule", ctypes.c_uint32), ("orig", Origin),
                ("captured", ctypes.c_uint8), ("listener_ready", ctypes.c_uint8), ("pad", ctypes.c_uint16),
                ("ran", ctypes.c_uint32)]


#: Structs that travel in a BPF_PROG_TEST_RUN packet rather than a map (bpf/explain.c).
PACKET_TYPES: tuple[type, ...] = (ExplainReq, ExplainAns)

#: Key and value types userspace reads each map with (None: userspace never reads that side).
#: The sockhashes' values are socket fds (u32 as written, u64 cookies as read).
MAP_TYPES: dict[str, tuple[type, type | None]] = {
    "pod_by_netns": (ctypes.c_uint64, PodCfg),
    "pod_by_ip": (IpAddr, PodIpVal),
    "pod_ports": (PortKey, ctypes.c_uint8),
    "pod_cidrs": (CidrKey, ctypes.c_uint8),
    "init_bypass": (ctypes.c_uint64, ctypes.c_uint32),
    "origin_by_cookie": (ctypes.c_uint64, Origin),
    "origin_by_tuple": (ConnKey, Origin),
    "inbound_listeners": (IpAddr, None),
    "dns_origin": (ctypes.c_uint64, Origin),
    "app_view": (ctypes.c_uint64, AppView),
    "counters": (ctypes.c_uint32, ctypes.c_uint64),
    "pod_counters": (ctypes.c_uint32, PodCounters),
    "pod_counter_base": (ctypes.c_uint32, PodCounters),
    "accel_socks": (SockKey, None),     # sockmap builds only
}


@dataclass
class PodEntries:
    """Every map entry one pod needs."""

    cfg: PodCfg
    ips: list[tuple[IpAddr, PodIpVal]]
    ports: list[PortKey]
    cidrs: list[CidrKey]


def _cidr_key(pod_id: int, kind: int, net: IPNetwork) -> CidrKey:
    k = CidrKey()
    k.prefixlen = 64 + net.prefixlen
    k.pod_id = pod_id
    k.kind = kind
    k.family = net.version
    raw = net.network_address.packed
    ctypes.memmove(k.addr, raw, len(raw))
    return k


def encode_pod(pod_id: int, netns_cookie: int, cfg: PodConfig) -> PodEntries:
    flags = 0
    if cfg.include_inbound_ports is None:
        flags |= POD_INBOUND_ALL
    if cfg.dns_capture:
        flags |= POD_DNS_CAPTURE
    if cfg.include_outbound_ports:
        flags |= POD_OUT_PORT_INCL
    if cfg.init_bypass:
        flags |= POD_INIT_BYPASS
    pc = PodCfg(pod_id=pod_id, flags=flags, proxy_uid=cfg.proxy_uid, proxy_gid=cfg.proxy_gid)
    if VARIANT:
        pc.variant[0] = VARIANT
    if cfg.ipv4:
        ctypes.memmove(pc.ip4, cfg.ipv4[0].packed, 4)
    if cfg.ipv6:
        ctypes.memmove(pc.ip6, cfg.ipv6[0].packed, 16)
    ips = [(IpAddr.of(ip), PodIpVal(pod_id=pod_id, flags=flags, netns_cookie=netns_cookie))
           for ip in cfg.pod_ips]
    ports: list[PortKey] = []
    lists = ((PORT_IN_INCLUDE, cfg.include_inbound_ports or ()),
             (PORT_IN_EXCLUDE, cfg.exclude_inbound_ports if cfg.include_inbound_ports is None else ()),
             (PORT_OUT_INCLUDE, cfg.include_outbound_ports),
             # The status port is never captured outbound, as istio-cni does it.
             (PORT_OUT_EXCLUDE, tuple(cfg.exclude_outbound_ports) +
              ((cfg.status_port,) if cfg.status_port else ())))
    for kind, values in lists:
        for port in sorted(set(values)):
            ports.append(PortKey(pod_id=pod_id, kind=kind, port=port))
    cidrs = [_cidr_key(pod_id, CIDR_EXCLUDE, n) for n in cfg.exclude_outbound_cidrs]
    cidrs += [_cidr_key(pod_id, CIDR_INCLUDE, n) for n in cfg.include_outbound_cidrs]
    return PodEntries(pc, ips, ports, cidrs)
