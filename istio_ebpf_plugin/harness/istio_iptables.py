"""Istio's iptables capture rules, rendered from a :class:`PodConfig` and loaded into a pod.

This is the *baseline* the eBPF datapath is compared with. :func:`render` produces the
iptables-restore text that ``istio-iptables`` (REDIRECT mode) would apply, in the same
order and spelling as Istio's golden files, so the generator is checked byte-for-byte
against ``istio-iptables-capture/*.golden`` and ``cni-plugin/*.txt.golden``.

Two levels:

* :class:`IstioIptablesFlags` mirrors istio-iptables' own configuration (several proxy
  UIDs/GIDs, DNS server lists, ``-c`` excluded interfaces), enough for the capture goldens;
* :func:`flags_for_pod` maps a :class:`PodConfig` the way the istio-cni plugin does
  (``-i '*'``, the status port excluded outbound for TCP and UDP, DNS capture of all
  servers), which is what the harness loads into pods.

The rule logic follows Istio's documented behaviour (tools/istio-iptables/pkg/capture);
TPROXY mode and ``-k`` virtual interfaces are not modelled (PodConfig has neither).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ..datapath.podconfig import DNS_PORT, DNS_PROXY_PORT, HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT, PodConfig
from ..datapath.selftest.topology import Pod
from ..errors import KernelError


TABLE_ORDER = ("mangle", "nat", "raw")
BUILTIN_CHAINS = {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}

# Placeholder replaced by the family's value in "versioned" rules.
_V = "\0versioned\0"


@dataclass(frozen=True)
class IstioIptablesFlags:
    """istio-iptables settings (REDIRECT mode) relevant to the rules it writes."""

    proxy_port: int = OUTBOUND_PORT                  # -p
    inbound_capture_port: int = INBOUND_PORT         # -z
    inbound_tunnel_port: int = HBONE_PORT
    proxy_uids: tuple[str, ...] = ("1337",)          # -u (comma list)
    proxy_gids: tuple[str, ...] = ("1337",)          # -g
    inbound_ports_include: str = ""                  # -b: "", "*" or "p1,p2"
    inbound_ports_exclude: tuple[int, ...] = ()      # -d
    outbound_ports_include: tuple[int, ...] = ()     # -q
    outbound_ports_exclude: tuple[int, ...] = ()     # -o
    outbound_ip_ranges_include: str = ""             # -i: "", "*" or "cidr,cidr"
    outbound_ip_ranges_exclude: tuple[str, ...] = () # -x
    exclude_interfaces: tuple[str, ...] = ()         # -c
    redirect_dns: bool = False                       # REDIRECT_DNS / ISTIO_META_DNS_CAPTURE
    capture_all_dns: bool = False
    dns_servers_v4: tuple[str, ...] = ()
    dns_servers_v6: tuple[str, ...] = ()
    enable_ipv6: bool = False
    host_ipv4_loopback_cidr: str = "127.0.0.1/32"


class _Builder:
    """Collects rules per (family, table) in append order, like Istio's rule builder."""

    def __init__(self) -> None:
        self.rules: dict[int, list[tuple[str, str, tuple[str, ...]]]] = {4: [], 6: []}

    def append(self, chain: str, table: str, *params: str, v4: str | None = None, v6: str | None = None,
               families: tuple[int, ...] = (4, 6)) -> None:
        for fam in families:
            value = v4 if fam == 4 else v6
            rule = tuple(value if p == _V else p for p in params) if value is not None else params
            self.rules[fam].append((table, chain, rule))

    def restore_text(self, family: int) -> str:
        out: list[str] = []
        for table in TABLE_ORDER:
            rules = [(c, r) for t, c, r in self.rules[family] if t == table]
            if not rules:
                continue
            out.append(f"* {table}")
            seen: list[str] = []
            for chain, _ in rules:
                if chain not in BUILTIN_CHAINS and chain not in seen:
                    seen.append(chain)
            out += [f"-N {c}" for c in seen]
            out += [f"-A {chain} {' '.join(rule)}" for chain, rule in rules]
            out.append("COMMIT")
        return "\n".join(out) + ("\n" if out else "")


def _split_ranges(value: str) -> tuple[bool, list[str], list[str], bool, bool]:
    """(wildcard, v4 cidrs, v6 cidrs, v4 has loopback, v6 has loopback), like separateV4V6."""
    if value == "*":
        return True, [], [], False, False
    v4: list[str] = []
    v6: list[str] = []
    lo4 = lo6 = False
    for item in filter(None, (s.strip() for s in value.split(","))):
        try:
            net = ipaddress.ip_interface(item)
        except ValueError:
            continue  # istio-iptables ignores unparsable entries too
        if net.version == 4:
            v4.append(item)
            lo4 = lo4 or net.ip.is_loopback
        else:
            v6.append(item)
            lo6 = lo6 or net.ip.is_loopback
    return False, v4, v6, lo4, lo6


def build(flags: IstioIptablesFlags) -> _Builder:
    b = _Builder()
    f = flags
    tun = str(f.inbound_tunnel_port)
    lo = dict(v4=f.host_ipv4_loopback_cidr, v6="::1/128")
    _, ex4, ex6, _, _ = _split_ranges(",".join(f.outbound_ip_ranges_exclude))
    inc_wild, inc4, inc6, inc_lo4, inc_lo6 = _split_ranges(f.outbound_ip_ranges_include)
    dns = f.redirect_dns and (f.capture_all_dns or f.dns_servers_v4 or f.dns_servers_v6)

    for nic in f.exclude_interfaces:
        b.append("PREROUTING", "nat", "-i", nic, "-j", "RETURN")
        b.append("OUTPUT", "nat", "-o", nic, "-j", "RETURN")
    b.append("ISTIO_INBOUND", "nat", "-p", "tcp", "--dport", tun, "-j", "RETURN")
    b.append("ISTIO_REDIRECT", "nat", "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(f.proxy_port))
    b.append("ISTIO_IN_REDIRECT", "nat", "-p", "tcp", "-j", "REDIRECT", "--to-ports",
             str(f.inbound_capture_port))

    # Inbound: every port but the excluded ones (-b '*'), or only the listed ones.
    if f.inbound_ports_include:
        b.append("PREROUTING", "nat", "-p", "tcp", "-j", "ISTIO_INBOUND")
        if f.inbound_ports_include.strip() == "*":
            for port in f.inbound_ports_exclude:
                b.append("ISTIO_INBOUND", "nat", "-p", "tcp", "--dport", str(port), "-j", "RETURN")
            b.append("ISTIO_INBOUND", "nat", "-p", "tcp", "-j", "ISTIO_IN_REDIRECT")
        else:
            for port in filter(None, (p.strip() for p in f.inbound_ports_include.split(","))):
                b.append("ISTIO_INBOUND", "nat", "-p", "tcp", "--dport", port, "-j", "ISTIO_IN_REDIRECT")

    b.append("OUTPUT", "nat", "-j", "ISTIO_OUTPUT")
    for port in f.outbound_ports_exclude:  # before anything that could redirect
        b.append("ISTIO_OUTPUT", "nat", "-p", "tcp", "--dport", str(port), "-j", "RETURN")
        b.append("ISTIO_OUTPUT", "nat", "-p", "udp", "--dport", str(port), "-j", "RETURN")
    # Envoy's inbound passthrough connects from 127.0.0.6 / ::6: never captured.
    b.append("ISTIO_OUTPUT", "nat", "-o", "lo", "-s", _V, "-j", "RETURN", v4="127.0.0.6/32", v6="::6/128")

    keep_lo_return = not (inc_lo4 or inc_lo6)

    def owner_rules(kind: str, ident: str, multiport_dns: bool) -> None:
        # Proxy -> own pod IP over lo goes to the inbound listener (app -> VIP -> Envoy -> Envoy -> app).
        if multiport_dns:
            b.append("ISTIO_OUTPUT", "nat", "-o", "lo", "!", "-d", _V, "-p", "tcp", "-m", "multiport", "!",
                     "--dports", f"53,{tun}", "-m", "owner", f"--{kind}-owner", ident, "-j",
                     "ISTIO_IN_REDIRECT", **lo)
        else:
            b.append("ISTIO_OUTPUT", "nat", "-o", "lo", "!", "-d", _V, "-p", "tcp", "!", "--dport", tun,
                     "-m", "owner", f"--{kind}-owner", ident, "-j", "ISTIO_IN_REDIRECT", **lo)
        # Anyone else talking over lo (app -> app by pod IP) is left alone...
        if keep_lo_return:
            if dns:
                b.append("ISTIO_OUTPUT", "nat", "-o", "lo", "-p", "tcp", "!", "--dport", "53", "-m", "owner",
                         "!", f"--{kind}-owner", ident, "-j", "RETURN")
            else:
                b.append("ISTIO_OUTPUT", "nat", "-o", "lo", "-m", "owner", "!", f"--{kind}-owner", ident,
                         "-j", "RETURN")
        # ...and the proxy's own traffic is never redirected again (no loops).
        b.append("ISTIO_OUTPUT", "nat", "-m", "owner", f"--{kind}-owner", ident, "-j", "RETURN")

    for uid in f.proxy_uids:
        owner_rules("uid", uid, bool(dns))
    for gid in f.proxy_gids:
        owner_rules("gid", gid, False)

    if dns:
        _dns_rules(b, f)

    b.append("ISTIO_OUTPUT", "nat", "-d", _V, "-j", "RETURN", **lo)
    for cidr in ex4:
        b.append("ISTIO_OUTPUT", "nat", "-d", cidr, "-j", "RETURN", families=(4,))
    for cidr in ex6:
        b.append("ISTIO_OUTPUT", "nat", "-d", cidr, "-j", "RETURN", families=(6,))
    for port in f.outbound_ports_include:
        b.append("ISTIO_OUTPUT", "nat", "-p", "tcp", "--dport", str(port), "-j", "ISTIO_REDIRECT")
    for fam, cidrs in ((4, inc4), (6, inc6)):
        if inc_wild:
            b.append("ISTIO_OUTPUT", "nat", "-j", "ISTIO_REDIRECT", families=(fam,))
        for cidr in cidrs:
            b.append("ISTIO_OUTPUT", "nat", "-d", cidr, "-j", "ISTIO_REDIRECT", families=(fam,))
    return b


def _dns_rules(b: _Builder, f: IstioIptablesFlags) -> None:
    port, dns = str(DNS_PROXY_PORT), str(DNS_PORT)
    b.append("OUTPUT", "raw", "-j", "ISTIO_OUTPUT_DNS")
    if f.capture_all_dns or f.dns_servers_v4:
        b.append("ISTIO_OUTPUT", "nat", "-j", "ISTIO_OUTPUT_DNS", families=(4,))
    if f.capture_all_dns or f.dns_servers_v6:
        b.append("ISTIO_OUTPUT", "nat", "-j", "ISTIO_OUTPUT_DNS", families=(6,))
    for proto, to in (("tcp", "--to-ports"), ("udp", "--to-port")):
        if f.capture_all_dns:
            b.append("ISTIO_OUTPUT_DNS", "nat", "-p", proto, "--dport", dns, "-j", "REDIRECT", to, port)
        else:
            for s in f.dns_servers_v4:
                b.append("ISTIO_OUTPUT_DNS", "nat", "-p", proto, "--dport", dns, "-d", f"{s}/32", "-j",
                         "REDIRECT", to, port, families=(4,))
            for s in f.dns_servers_v6:
                b.append("ISTIO_OUTPUT_DNS", "nat", "-p", proto, "--dport", dns, "-d", f"{s}/128", "-j",
                         "REDIRECT", to, port, families=(6,))
    # Conntrack zones: proxy <-> upstream resolvers in zone 1, app <-> proxy in zone 2.
    for kind, idents in (("uid", f.proxy_uids), ("gid", f.proxy_gids)):
        for ident in idents:
            b.append("ISTIO_OUTPUT_DNS", "raw", "-p", "udp", "--dport", dns, "-m", "owner",
                     f"--{kind}-owner", ident, "-j", "CT", "--zone", "1")
            b.append("ISTIO_OUTPUT_DNS", "raw", "-p", "udp", "--sport", port, "-m", "owner",
                     f"--{kind}-owner", ident, "-j", "CT", "--zone", "2")
    if f.capture_all_dns:
        b.append("PREROUTING", "raw", "-j", "ISTIO_INBOUND")
        b.append("ISTIO_OUTPUT_DNS", "raw", "-p", "udp", "--dport", dns, "-j", "CT", "--zone", "2")
        b.append("ISTIO_INBOUND", "raw", "-p", "udp", "--sport", dns, "-j", "CT", "--zone", "1")
        return
    for fam, servers, mask in ((4, f.dns_servers_v4, 32), (6, f.dns_servers_v6, 128)):
        if servers:
            b.append("PREROUTING", "raw", "-j", "ISTIO_INBOUND", families=(fam,))
        for s in servers:
            b.append("ISTIO_OUTPUT_DNS", "raw", "-p", "udp", "--dport", dns, "-d", f"{s}/{mask}", "-j", "CT",
                     "--zone", "2", families=(fam,))
            b.append("ISTIO_INBOUND", "raw", "-p", "udp", "--sport", dns, "-s", f"{s}/{mask}", "-j", "CT",
                     "--zone", "1", families=(fam,))


def render(flags: IstioIptablesFlags) -> tuple[str, str]:
    """(IPv4 restore text, IPv6 restore text); the IPv6 text is empty unless enable_ipv6."""
    b = build(flags)
    return b.restore_text(4), (b.restore_text(6) if flags.enable_ipv6 else "")


#: istio-iptables' short flags that take a value (the ones the injection templates write).
_VALUE_FLAGS = {"-p", "-z", "-u", "-g", "-m", "-i", "-x", "-b", "-d", "-o", "-q", "-k", "-c", "-t"}


def flags_from_args(args: list[str] | tuple[str, ...]) -> IstioIptablesFlags:
    """The settings of an ``istio-iptables`` command line, as the istio-init container gets it.

    ``istio-iptables -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x "" -b '*' -d 15090,15021,15020``
    (Istio 1.14's injection). Flags that do not change the REDIRECT rules are ignored; TPROXY is refused.
    """
    values: dict[str, str] = {}
    words = iter(args)
    for word in words:
        if word in _VALUE_FLAGS:
            values[word] = next(words, "")
    if values.get("-m", "REDIRECT") != "REDIRECT":
        raise KernelError(f"istio-iptables -m {values['-m']}: only REDIRECT is modelled")

    def ports(flag: str) -> tuple[int, ...]:
        return tuple(int(p) for p in values.get(flag, "").split(",") if p.strip())

    uids = tuple(u for u in values.get("-u", "1337").split(",") if u)
    return IstioIptablesFlags(
        proxy_port=int(values.get("-p", OUTBOUND_PORT)), inbound_capture_port=int(values.get("-z", INBOUND_PORT)),
        proxy_uids=uids, proxy_gids=tuple(g for g in values.get("-g", ",".join(uids)).split(",") if g),
        inbound_ports_include=values.get("-b", ""), inbound_ports_exclude=ports("-d"),
        outbound_ports_include=ports("-q"), outbound_ports_exclude=ports("-o"),
        outbound_ip_ranges_include=values.get("-i", ""),
        outbound_ip_ranges_exclude=tuple(c for c in values.get("-x", "").split(",") if c.strip()))


def flags_for_pod(cfg: PodConfig, *, ipv6: bool | None = None) -> IstioIptablesFlags:
    """istio-iptables settings the istio-cni plugin derives for a pod with ``cfg``."""
    if cfg.include_inbound_ports is None:
        inbound = "*"
    else:
        inbound = ",".join(str(p) for p in cfg.include_inbound_ports)
    inbound_excl = tuple(cfg.exclude_inbound_ports)
    outbound_excl = tuple(cfg.exclude_outbound_ports)
    if cfg.status_port:
        if cfg.status_port not in inbound_excl:
            inbound_excl += (cfg.status_port,)
        if cfg.status_port not in outbound_excl:
            outbound_excl += (cfg.status_port,)
    include = {str(n) for n in cfg.include_outbound_cidrs}
    if {"0.0.0.0/0", "::/0"} <= include:
        include_str = "*"
    else:
        include_str = ",".join(str(n) for n in cfg.include_outbound_cidrs)
    return IstioIptablesFlags(
        proxy_uids=(str(cfg.proxy_uid),),
        proxy_gids=(str(cfg.proxy_gid),),
        inbound_ports_include=inbound,
        inbound_ports_exclude=inbound_excl,
        outbound_ports_include=tuple(cfg.include_outbound_ports),
        outbound_ports_exclude=outbound_excl,
        outbound_ip_ranges_include=include_str,
        outbound_ip_ranges_exclude=tuple(str(n) for n in cfg.exclude_outbound_cidrs),
        redirect_dns=cfg.dns_capture,
        capture_all_dns=cfg.dns_capture,
        enable_ipv6=bool(cfg.ipv6) if ipv6 is None else ipv6,
    )


def render_for_pod(cfg: PodConfig, *, ipv6: bool | None = None) -> tuple[str, str]:
    return render(flags_for_pod(cfg, ipv6=ipv6))


# --- loading into a pod ----------------------------------------------------------------

def to_restore_format(text: str) -> str:
    """Istio prints ``* nat``; iptables-restore wants ``*nat``."""
    return "\n".join(("*" + line[2:]) if line.startswith("* ") else line for line in text.splitlines()) + "\n"


_EMPTY_TABLES = "*nat\nCOMMIT\n*mangle\nCOMMIT\n*raw\nCOMMIT\n"


def _restore(pod: Pod, tool: str, text: str) -> None:
    # As the pod's own root, like istio-init: in a pod with its own user namespace the owner
    # match takes rules only from there, and reads --uid-owner 1337 as the pod's UID 1337.
    proc = pod.ns_exec([tool, "-w"], check=False, input=text, as_pod_root=True)
    if proc.returncode != 0:
        raise KernelError(f"{tool} in pod {pod.name} failed: {proc.stderr.strip()}")


def flush_pod(pod: Pod) -> None:
    """Empty nat, mangle and raw (IPv4 and IPv6) in the pod netns."""
    _restore(pod, "iptables-restore", _EMPTY_TABLES)
    _restore(pod, "ip6tables-restore", _EMPTY_TABLES)


def apply_to_pod(pod: Pod, cfg: PodConfig, *, ipv6: bool = True) -> None:
    """Replace the pod's nat/mangle/raw tables with Istio's rules for ``cfg``."""
    v4, v6 = render_for_pod(cfg, ipv6=ipv6)
    flush_pod(pod)
    _restore(pod, "iptables-restore", to_restore_format(v4))
    if v6:
        _restore(pod, "ip6tables-restore", to_restore_format(v6))


def count_rules(pod: Pod, tables: tuple[str, ...] = ("nat", "mangle", "raw")) -> int:
    """``-A`` rules in the given tables of the pod netns, IPv4 plus IPv6 (0 for eBPF pods)."""
    total = 0
    for tool in ("iptables-save", "ip6tables-save"):
        for table in tables:
            proc = pod.ns_exec([tool, "-t", table], check=False, as_pod_root=True)
            if proc.returncode != 0:
                continue  # table not present in this netns: no rules
            total += sum(1 for line in proc.stdout.splitlines() if line.startswith("-A "))
    return total

