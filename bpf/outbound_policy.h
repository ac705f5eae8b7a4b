/* outbound_policy.h - Istio's ISTIO_OUTPUT chain as one function, outbound_rule(): it returns the
 * rule that decided (a pod counter, abi.h), rule_verdict() what that rule does.
 *
 * Shared by connect4/connect6 (TCP and connected UDP) and sendmsg4/6 (UDP).
 * The order of the checks is the order of istio-iptables' ISTIO_OUTPUT rules, as
 * istio_ebpf_plugin/harness/istio_iptables.py renders them (byte for byte Istio's own
 * capture goldens: tests/test_harness_istio_iptables_golden.py): port exclusions, the
 * 127.0.0.6 passthrough source, the proxy UID rules, the proxy GID rules, DNS, 127.0.0.1,
 * CIDR exclusions, port inclusions, CIDR inclusions. tests/test_harness_iptables.py runs
 * both on the same table of cases.
 */
#ifndef ISTIO_EBPF_OUTBOUND_POLICY_H
#define ISTIO_EBPF_OUTBOUND_POLICY_H

#include "abi.h"
#include "addr.h"
#include "pod_lookup.h"

enum verdict {
    V_PASS = 0,         /* leave the connection alone (iptables RETURN) */
    V_OUTBOUND,         /* ISTIO_REDIRECT: to 15001 */
    V_INBOUND_LOCAL,    /* ISTIO_IN_REDIRECT: proxy traffic to a local address, to 15006 */
    V_DNS,              /* ISTIO_OUTPUT_DNS: to 15053 */
};

struct flow {
    struct ip_addr dst;
    __u16 dport;        /* host order */
    __u8 tcp;
    __u8 src_passthrough;   /* socket bound to 127.0.0.6 */
};

/* "-o lo": the kernel routes 127/8, ::1, ::6 (Istio's IPv6 passthrough address on lo),
 * the unspecified address (ip_is_lo_routed) and the pod's own addresses through loopback. */
static __always_inline int flow_is_local(const struct pod_cfg *cfg, const struct flow *f)
{
    if (ip_is_lo_routed(&f->dst))
        return 1;
    return is_own_ip(cfg->pod_id, &f->dst);
}

/* One owner block of ISTIO_OUTPUT (-u or -g): which of its three rules decided, 0 if none
 * (1 = ISTIO_IN_REDIRECT, 2 = the "-o lo" RETURN, 3 = the owner RETURN; the block's pod
 * counters follow each other in that order). With DNS capture istio-iptables excludes 53
 * from the UID block's IN_REDIRECT (in_redirect_skips_53) and limits both blocks' RETURN to
 * TCP other than 53 (return_tcp_only). */
static __always_inline int owner_rules(const struct flow *f, int local, int owner_match,
                                       int in_redirect_skips_53, int return_tcp_only)
{
    /* -o lo ! -d 127.0.0.1 -p tcp ! --dport 15008[,53] --owner P -j ISTIO_IN_REDIRECT */
    if (owner_match && local && f->tcp && !ip_is_127_0_0_1(&f->dst) && f->dport != HBONE_PORT &&
        !(in_redirect_skips_53 && f->dport == DNS_PORT))
        return 1;
    /* -o lo [-p tcp ! --dport 53] ! --owner P -j RETURN */
    if (!owner_match && local && (!return_tcp_only || (f->tcp && f->dport != DNS_PORT)))
        return 2;
    /* --owner P -j RETURN */
    if (owner_match)
        return 3;
    return 0;
}

/* The rule of ISTIO_OUTPUT that decides flow f of a process with uid/gid: a pod counter
 * (enum pod_counter, PC_OUT_*). rule_verdict() says what it does with the connection. */
static __always_inline int outbound_rule(const struct pod_cfg *cfg, const struct flow *f,
                                         __u32 uid, __u32 gid)
{
    int local = flow_is_local(cfg, f);
    int dns = (cfg->flags & POD_DNS_CAPTURE) != 0;
    int block;

    if (port_listed(cfg->pod_id, PORT_OUT_EXCLUDE, f->dport))
        return PC_OUT_PASS_EXCLUDED_PORT;
    if (local && f->src_passthrough)
        return PC_OUT_PASS_PASSTHROUGH_SRC;
    block = owner_rules(f, local, uid == cfg->proxy_uid, dns, dns);
    if (block)
        return PC_OUT_CAPTURED_PROXY_UID_LOCAL + block - 1;
    block = owner_rules(f, local, gid == cfg->proxy_gid, 0, dns);
    if (block)
        return PC_OUT_CAPTURED_PROXY_GID_LOCAL + block - 1;
    if (dns && f->dport == DNS_PORT)
        return PC_OUT_DNS;
    if (!f->tcp)
        return PC_OUT_PASS_NOT_TCP;  /* ISTIO_REDIRECT matches -p tcp only */
    if (ip_is_127_0_0_1(&f->dst))
        return PC_OUT_PASS_LOOPBACK;
    if (cidr_listed(cfg->pod_id, CIDR_EXCLUDE, &f->dst))
        return PC_OUT_PASS_EXCLUDED_CIDR;
    if ((cfg->flags & POD_OUT_PORT_INCL) && port_listed(cfg->pod_id, PORT_OUT_INCLUDE, f->dport))
        return PC_OUT_CAPTURED_PORT;
    if (cidr_listed(cfg->pod_id, CIDR_INCLUDE, &f->dst))
        return PC_OUT_CAPTURED_CIDR;
    return PC_OUT_PASS_NOT_INCLUDED;
}

/* What an outbound rule does with the connection (enum verdict). */
static __always_inline int rule_verdict(int rule)
{
    if (rule == PC_OUT_CAPTURED_PORT || rule == PC_OUT_CAPTURED_CIDR)
        return V_OUTBOUND;
    if (rule == PC_OUT_CAPTURED_PROXY_UID_LOCAL || rule == PC_OUT_CAPTURED_PROXY_GID_LOCAL)
        return V_INBOUND_LOCAL;
    if (rule == PC_OUT_DNS)
        return V_DNS;
    return V_PASS;
}

/* The listener a verdict other than V_PASS sends the connection to. */
static __always_inline __u16 target_port(int verdict)
{
    if (verdict == V_OUTBOUND)
        return OUTBOUND_PORT;
    if (verdict == V_INBOUND_LOCAL)
        return INBOUND_PORT;
    return DNS_PROXY_PORT;
}

/* The sendmsg hooks (dns.c) decide an unconnected UDP datagram only when it is DNS of a pod with
 * DNS capture; every other datagram is left alone without a rule. */
static __always_inline int udp_decided(const struct pod_cfg *cfg, __u16 dport)
{
    return dport == DNS_PORT && (cfg->flags & POD_DNS_CAPTURE);
}

#endif /* ISTIO_EBPF_OUTBOUND_POLICY_H */
