/* outbound_policy.h - Istio's ISTIO_OUTPUT chain as one function.
 *
 * Shared by connect4/connect6 (TCP and connected UDP) and sendmsg4/6 (UDP).
 * The order of the checks is the order of istio-iptables' rules (see the
 * goldens in shared/fixtures/istio/master/iptables): port exclusions, the
 * 127.0.0.6 passthrough source, the proxy UID rules, the proxy GID rules, DNS,
 * 127.0.0.1, CIDR exclusions, port inclusions, CIDR inclusions.
 */
#ifndef ISTIO_EBPF_OUTBOUND_POLICY_H
#define ISTIO_EBPF_OUTBOUND_POLICY_H

#include "istio_ebpf_maps.h"

#ifndef MAX_CGROUP_DEPTH
#define MAX_CGROUP_DEPTH 10
#endif

/* The pod a socket-address hook runs for.
 * cookie mode: keyed by the network-namespace cookie.
 * pod-IP mode (5.7-5.14): userspace cannot read a netns cookie before 5.14
 * (SO_NETNS_COOKIE), so pods are keyed by their cgroup id, found among the
 * current task's cgroup ancestors (a container cgroup, or any child cgroup a
 * process creates, lies below the pod's). */
static __always_inline struct pod_cfg *find_pod(void *ctx)
{
#if ISTIO_EBPF_COOKIE
    __u64 key = bpf_get_netns_cookie(ctx);
    return pod_by_netns.lookup(&key);
#else
    #pragma unroll
    for (int level = 1; level <= MAX_CGROUP_DEPTH; level++) {
        __u64 key = bpf_get_current_ancestor_cgroup_id(level);
        if (key == 0)
            break;
        struct pod_cfg *cfg = pod_by_netns.lookup(&key);
        if (cfg)
            return cfg;
    }
    return NULL;
#endif
}

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

/* "-o lo": the kernel routes 127/8, ::1, ::6 (Istio's IPv6 passthrough
 * address on lo), the unspecified address and the pod's own addresses
 * through loopback. */
static __always_inline int flow_is_local(const struct pod_cfg *cfg, const struct flow *f)
{
    if (f->dst.family == AF_INET) {
        if (is_loopback4(f->dst.a[0]) || f->dst.a[0] == 0)
            return 1;
    } else {
        if ((f->dst.a[0] | f->dst.a[1] | f->dst.a[2]) == 0 &&
            (f->dst.a[3] == 0 || f->dst.a[3] == bpf_htonl(1) || f->dst.a[3] == bpf_htonl(6)))
            return 1;
    }
    return is_own_ip(cfg->pod_id, &f->dst);
}

static __always_inline int is_127_0_0_1(const struct ip_addr *ip)
{
    if (ip->family == AF_INET)
        return ip->a[0] == LOOPBACK4;
    return is_loopback6(ip->a);
}

/* One owner block of ISTIO_OUTPUT (-u or -g); returns 1 when it decided.
 * With DNS capture istio-iptables excludes 53 from the UID block's
 * IN_REDIRECT (in_redirect_skips_53) and limits both blocks' RETURN to TCP
 * other than 53 (return_tcp_only). */
static __always_inline int owner_rules(const struct flow *f, int local, int owner_match,
                                       int in_redirect_skips_53, int return_tcp_only,
                                       int *verdict)
{
    /* -o lo ! -d 127.0.0.1 -p tcp ! --dport 15008[,53] --owner P -j ISTIO_IN_REDIRECT */
    if (owner_match && local && f->tcp && !is_127_0_0_1(&f->dst) && f->dport != HBONE_PORT &&
        !(in_redirect_skips_53 && f->dport == DNS_PORT)) {
        *verdict = V_INBOUND_LOCAL;
        return 1;
    }
    /* -o lo [-p tcp ! --dport 53] ! --owner P -j RETURN */
    if (!owner_match && local && (!return_tcp_only || (f->tcp && f->dport != DNS_PORT))) {
        *verdict = V_PASS;
        return 1;
    }
    /* --owner P -j RETURN */
    if (owner_match) {
        *verdict = V_PASS;
        return 1;
    }
    return 0;
}

static __always_inline int outbound_verdict(const struct pod_cfg *cfg, const struct flow *f,
                                            __u32 uid, __u32 gid)
{
    int verdict = V_PASS;
    int local = flow_is_local(cfg, f);
    int dns = (cfg->flags & POD_DNS_CAPTURE) != 0;

    if (port_listed(cfg->pod_id, PORT_OUT_EXCLUDE, f->dport))
        return V_PASS;
    if (local && f->src_passthrough)
        return V_PASS;
    if (owner_rules(f, local, uid == cfg->proxy_uid, dns, dns, &verdict))
        return verdict;
    if (owner_rules(f, local, gid == cfg->proxy_gid, 0, dns, &verdict))
        return verdict;
    if (dns && f->dport == DNS_PORT)
        return V_DNS;
    if (!f->tcp)
        return V_PASS;  /* ISTIO_REDIRECT matches -p tcp only */
    if (is_127_0_0_1(&f->dst))
        return V_PASS;
    if (cidr_listed(cfg->pod_id, CIDR_EXCLUDE, &f->dst))
        return V_PASS;
    if ((cfg->flags & POD_OUT_PORT_INCL) && port_listed(cfg->pod_id, PORT_OUT_INCLUDE, f->dport))
        return V_OUTBOUND;
    if (cidr_listed(cfg->pod_id, CIDR_INCLUDE, &f->dst))
        return V_OUTBOUND;
    return V_PASS;
}

/* The destination of an IPv6 sock_addr hook. An IPv4-mapped address on an
 * IPv6 socket is IPv4 traffic that the IPv4 hooks never see: it is returned
 * as IPv4 (and 1), so it is decided with the IPv4 rules. */
static __always_inline int read_dst6(struct bpf_sock_addr *ctx, struct ip_addr *dst)
{
    __u32 a0 = ctx->user_ip6[0], a1 = ctx->user_ip6[1], a2 = ctx->user_ip6[2], a3 = ctx->user_ip6[3];
    return ip_from6(dst, a0, a1, a2, a3);
}

/* Send the socket to a local listener: 127.0.0.1, ::ffff:127.0.0.1 on a
 * v4-mapped flow, or ::1 (where iptables' and ip6tables' REDIRECT send it). */
static __always_inline void redirect_to(struct bpf_sock_addr *ctx, int ipv6, int mapped, __u16 port)
{
    if (!ipv6) {
        ctx->user_ip4 = LOOPBACK4;
    } else if (mapped) {
        ctx->user_ip6[3] = LOOPBACK4;
    } else {
        ctx->user_ip6[0] = 0;
        ctx->user_ip6[1] = 0;
        ctx->user_ip6[2] = 0;
        ctx->user_ip6[3] = bpf_htonl(1);
    }
    /* Keep the address and port stores apart: clang may merge adjacent
     * 32-bit context stores into one 64-bit store, which the verifier rejects. */
    asm volatile("" ::: "memory");
    ctx->user_port = bpf_htons(port);
}

#endif
