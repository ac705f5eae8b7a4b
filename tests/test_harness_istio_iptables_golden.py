"""The Istio iptables generator reproduces Istio's own golden files byte for byte."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from support.istio_fixtures import FIXTURES
from istio_ebpf_plugin.datapath.podconfig import PodConfig
from istio_ebpf_plugin.errors import KernelError
from istio_ebpf_plugin.harness.istio_iptables import IstioIptablesFlags, flags_from_args, render, render_for_pod

IPTABLES_GOLDENS = FIXTURES / "master" / "iptables"
ISTIO_DNS = dict(redirect_dns=True, dns_servers_v4=("127.0.0.53",))

# Settings of Istio's capture tests (tools/istio-iptables/pkg/capture), as described in the fixtures README.
CAPTURE_CASES = {
    "empty": IstioIptablesFlags(),
    "inbound-ports-include": IstioIptablesFlags(inbound_ports_include="32000,31000"),
    "inbound-ports-wildcard": IstioIptablesFlags(inbound_ports_include="*"),
    "outbound-ports-include": IstioIptablesFlags(outbound_ports_include=(32000, 31000)),
    "ipnets": IstioIptablesFlags(outbound_ip_ranges_include="10.0.0.0/8"),
    "basic-exclude-nic": IstioIptablesFlags(exclude_interfaces=("not-istio-nic",)),
    "ip-range": IstioIptablesFlags(outbound_ip_ranges_include="9.9.0.0/16", outbound_ip_ranges_exclude=("1.1.0.0/16",),
                                   proxy_uids=("3", "4"), proxy_gids=("1", "2"), **ISTIO_DNS),
    "dns-uid-gid": IstioIptablesFlags(proxy_uids=("3", "4"), proxy_gids=("1", "2"), enable_ipv6=True,
                                      dns_servers_v6=("::127.0.0.53",), **ISTIO_DNS),
}

CNI_DEFAULT_EXCLUDE = (15020, 15021, 15090)   # the order the CNI plugin writes them in
net = ipaddress.ip_network
CNI_CASES = {
    "basic": PodConfig(exclude_inbound_ports=CNI_DEFAULT_EXCLUDE),
    "dns": PodConfig(exclude_inbound_ports=CNI_DEFAULT_EXCLUDE, dns_capture=True),
    "custom-uid": PodConfig(exclude_inbound_ports=CNI_DEFAULT_EXCLUDE, proxy_uid=1000670000, proxy_gid=1000670001),
    "include-exclude-ip": PodConfig(exclude_inbound_ports=CNI_DEFAULT_EXCLUDE,
                                    include_outbound_cidrs=(net("127.0.0.0/8"),),
                                    exclude_outbound_cidrs=(net("10.0.0.0/8"),)),
    "include-exclude-ports": PodConfig(include_inbound_ports=(1111, 2222), exclude_outbound_ports=(5555, 6666),
                                       status_port=0),
}


def golden_body(path: Path) -> str:
    """The restore text of a capture golden: drop the iptables-save / ip6tables-save command log lines."""
    lines = path.read_text().splitlines()
    return "".join(line + "\n" for line in lines if line not in ("iptables-save", "ip6tables-save"))


@pytest.mark.parametrize("name", sorted(CAPTURE_CASES))
def test_capture_golden(name: str) -> None:
    v4, v6 = render(CAPTURE_CASES[name])
    assert v4 + v6 == golden_body(IPTABLES_GOLDENS / "istio-iptables-capture" / f"{name}.golden")


@pytest.mark.parametrize("name", sorted(CNI_CASES))
def test_cni_plugin_golden(name: str) -> None:
    v4, v6 = render_for_pod(CNI_CASES[name], ipv6=False)
    assert v6 == ""
    assert v4 == (IPTABLES_GOLDENS / "cni-plugin" / f"{name}.txt.golden").read_text()


def test_ipv6_rules_mirror_ipv4_with_v6_addresses() -> None:
    """A dual-stack pod gets the same chain logic in ip6tables with ::6 and ::1."""
    v4, v6 = render_for_pod(PodConfig(pod_ips=(ipaddress.ip_address("10.0.0.2"), ipaddress.ip_address("fd00::2"))))
    assert "-A ISTIO_OUTPUT -o lo -s ::6/128 -j RETURN" in v6
    assert "-A ISTIO_OUTPUT -d ::1/128 -j RETURN" in v6
    assert v4.count("\n") == v6.count("\n")
    assert v4.replace("127.0.0.6/32", "::6/128").replace("127.0.0.1/32", "::1/128") == v6


def test_istio_init_arguments_give_the_capture_settings() -> None:
    """istio-init's command line (Istio 1.14's injection of hello) -> the same rules the flags give."""
    args = ["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "",
            "-b", "*", "-d", "15090,15021,15020"]
    flags = flags_from_args(args)
    assert flags == IstioIptablesFlags(outbound_ip_ranges_include="*", inbound_ports_include="*",
                                       inbound_ports_exclude=(15090, 15021, 15020))
    assert flags_from_args([*args, "-g", "2000", "-o", "5432", "-x", "10.0.0.0/8"]) == IstioIptablesFlags(
        outbound_ip_ranges_include="*", inbound_ports_include="*", inbound_ports_exclude=(15090, 15021, 15020),
        proxy_gids=("2000",), outbound_ports_exclude=(5432,), outbound_ip_ranges_exclude=("10.0.0.0/8",))
    with pytest.raises(KernelError, match="TPROXY"):
        flags_from_args([*args[:7], "-m", "TPROXY"])
