"""Per-pod capture configuration: what Istio's istio-iptables flags express.

A :class:`PodConfig` is the single input of the datapath for one pod. The node
agent builds it from the pod object (annotations, IPs, proxy env); the harness
builds it directly. :mod:`.maps` encodes it into BPF map entries and
:mod:`istio_ebpf_plugin.harness.istio_iptables` renders the equivalent Istio
iptables rules, so the two capture mechanisms are driven by the same value.

Defaults are those of a stock injected pod
(``-p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x "" -b '*' -d 15090,15021,15020``).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Union

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

# Istio's fixed ports and addresses, the same names as in bpf/abi.h (checked at every build).
OUTBOUND_PORT = 15001       # -p: Envoy's outbound listener
INBOUND_PORT = 15006        # -z: Envoy's inbound listener
DNS_PROXY_PORT = 15053      # the Istio agent's DNS proxy
HBONE_PORT = 15008          # never captured (ISTIO_INBOUND / ISTIO_OUTPUT exempt it)
DNS_PORT = 53               # what DNS capture matches
INBOUND_PASSTHROUGH_SRC = "127.0.0.6"   # Envoy's inbound passthrough source
PROXY_UID = 1337
PROXY_GID = 1337
#: Ports the injector always puts in --exclude-inbound-ports (with the status port appended).
ALWAYS_EXCLUDED_INBOUND = (15090, 15021)
DEFAULT_STATUS_PORT = 15020


@dataclass(frozen=True)
class PodConfig:
    """Capture configuration of one pod (one network namespace)."""

    #: Pod IPs (IPv4 and/or IPv6), as in ``status.podIPs``.
    pod_ips: tuple[IPAddress, ...] = ()
    #: Outbound CIDRs captured (``-i``); ``0.0.0.0/0`` and ``::/0`` stand for ``*``.
    include_outbound_cidrs: tuple[IPNetwork, ...] = (
        ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
    #: Outbound CIDRs never captured (``-x``).
    exclude_outbound_cidrs: tuple[IPNetwork, ...] = ()
    #: Inbound ports captured (``-b``): ``None`` means ``*`` (all but the excluded ones).
    include_inbound_ports: tuple[int, ...] | None = None
    #: Inbound ports not captured (``-d``), only meaningful with ``*``.
    exclude_inbound_ports: tuple[int, ...] = ALWAYS_EXCLUDED_INBOUND + (DEFAULT_STATUS_PORT,)
    #: Outbound ports always captured (``-q``), whatever the destination CIDR.
    include_outbound_ports: tuple[int, ...] = ()
    #: Outbound ports never captured (``-o``).
    exclude_outbound_ports: tuple[int, ...] = ()
    #: Envoy's identity: exempt from outbound capture (``-u`` / ``-g``).
    proxy_uid: int = PROXY_UID
    proxy_gid: int = PROXY_GID
    #: Istio DNS proxying (``ISTIO_META_DNS_CAPTURE``): UDP/TCP 53 to 127.0.0.1:15053.
    dns_capture: bool = False
    #: Sidecar status port (excluded inbound and outbound like the CNI plugin does); 0 = none.
    status_port: int = DEFAULT_STATUS_PORT
    #: ``istio-ebpf.io/init-containers: bypass``: the cgroups the agent lists as the pod's app
    #: init containers connect uncaptured (``Datapath.set_init_bypass``).
    init_bypass: bool = False

    @property
    def ipv4(self) -> tuple[ipaddress.IPv4Address, ...]:
        return tuple(ip for ip in self.pod_ips if ip.version == 4)

    @property
    def ipv6(self) -> tuple[ipaddress.IPv6Address, ...]:
        return tuple(ip for ip in self.pod_ips if ip.version == 6)


def ip_list(values: list[str] | tuple[str, ...]) -> tuple[IPAddress, ...]:
    return tuple(ipaddress.ip_address(v) for v in values)
