/* dns.c - cgroup/sendmsg4|6 and cgroup/recvmsg4|6: DNS capture for pods with
 * Istio's DNS proxying (ISTIO_META_DNS_CAPTURE).
 *
 * Unconnected UDP to port 53 goes to 127.0.0.1:15053 (::1 for IPv6), as
 * ISTIO_OUTPUT_DNS does; replies coming back from 15053 get the original
 * server as their source again, as conntrack's reverse NAT would, and
 * getpeername() of a connected DNS socket names the original server (through
 * sockname.c's getpeername hooks). Connected
 * UDP sockets are handled by the connect hooks (connect.c) and share the
 * dns_origin map.
 */
#include "outbound_policy.h"

static __always_inline int dns_verdict(struct bpf_sock_addr *ctx, struct flow *f)
{
    struct pod_cfg *cfg = find_pod(ctx);
    if (!cfg || !(cfg->flags & POD_DNS_CAPTURE))
        return V_PASS;
    __u64 ugid = bpf_get_current_uid_gid();
    return outbound_verdict(cfg, f, (__u32)ugid, (__u32)(ugid >> 32));
}

static __always_inline void remember(struct bpf_sock_addr *ctx, const struct flow *f)
{
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct origin o = {};
    o.ip = f->dst;
    o.port = f->dport;
    o.listener = DNS_PROXY_PORT;
    dns_origin.update(&cookie, &o);
    count(C_DNS_REDIRECT, 1);
}

int ie_sendmsg4(struct bpf_sock_addr *ctx)
{
    if (ctx->protocol != IPPROTO_UDP || bpf_ntohs(ctx->user_port) != DNS_PORT)
        return 1;
    struct flow f = {};
    f.dst.family = AF_INET;
    f.dst.a[0] = ctx->user_ip4;
    f.dport = DNS_PORT;
    if (dns_verdict(ctx, &f) != V_DNS)
        return 1;
    remember(ctx, &f);
    redirect_to(ctx, 0, 0, DNS_PROXY_PORT);
    return 1;
}

int ie_sendmsg6(struct bpf_sock_addr *ctx)
{
    if (ctx->protocol != IPPROTO_UDP || bpf_ntohs(ctx->user_port) != DNS_PORT)
        return 1;
    struct flow f = {};
    int mapped = read_dst6(ctx, &f.dst);
    f.dport = DNS_PORT;
    if (dns_verdict(ctx, &f) != V_DNS)
        return 1;
    remember(ctx, &f);
    redirect_to(ctx, 1, mapped, DNS_PROXY_PORT);
    return 1;
}

/* An address of 15053 on a socket we redirected becomes the original server
 * again: the source of a reply (recvmsg) or the peer (getpeername). */
static __always_inline int restore4(struct bpf_sock_addr *ctx)
{
    if (ctx->protocol != IPPROTO_UDP || bpf_ntohs(ctx->user_port) != DNS_PROXY_PORT ||
        ctx->user_ip4 != LOOPBACK4)
        return 1;
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct origin *o = dns_origin.lookup(&cookie);
    if (!o || o->ip.family != AF_INET)
        return 1;
    ctx->user_ip4 = o->ip.a[0];
    asm volatile("" ::: "memory");
    ctx->user_port = bpf_htons(o->port);
    return 1;
}

static __always_inline int restore6(struct bpf_sock_addr *ctx)
{
    if (ctx->protocol != IPPROTO_UDP || bpf_ntohs(ctx->user_port) != DNS_PROXY_PORT)
        return 1;
    __u32 a0 = ctx->user_ip6[0], a1 = ctx->user_ip6[1], a2 = ctx->user_ip6[2], a3 = ctx->user_ip6[3];
    int mapped_lo = a0 == 0 && a1 == 0 && a2 == bpf_htonl(0xffff) && a3 == LOOPBACK4;
    int lo6 = a0 == 0 && a1 == 0 && a2 == 0 && a3 == bpf_htonl(1);
    if (!mapped_lo && !lo6)
        return 1;
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct origin *o = dns_origin.lookup(&cookie);
    if (!o)
        return 1;
    put6(ctx, &o->ip);
    ctx->user_port = bpf_htons(o->port);
    return 1;
}

int ie_recvmsg4(struct bpf_sock_addr *ctx) { return restore4(ctx); }
int ie_recvmsg6(struct bpf_sock_addr *ctx) { return restore6(ctx); }
/* getpeername of a connected DNS socket: sockname.c calls restore4/restore6. */
