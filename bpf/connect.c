/* connect.c - cgroup/connect4 and cgroup/connect6: outbound capture.
 *
 * Decides with Istio's ISTIO_OUTPUT semantics (outbound_policy.h), counts the
 * deciding rule for the pod, and rewrites the destination of captured
 * connections to Envoy:
 *   V_OUTBOUND       -> 127.0.0.1:15001 (::1 for IPv6)
 *   V_INBOUND_LOCAL  -> 127.0.0.1:15006 (proxy traffic to its own pod)
 *   V_DNS            -> 127.0.0.1:15053
 * The original destination is kept under the socket cookie; sockops moves it
 * to the connection tuple once the source port exists.
 *
 * Pod-IP mode (no netns cookie in sockops/getsockopt before 5.15): bind the
 * socket to the pod IP first, so the tuple Envoy sees is unique on the node.
 * If that bind is impossible the connection is refused (fail closed) rather
 * than left to collide with another pod's tuple. Cookie mode binds too, where
 * it can: the source is then the pod IP, as under iptables.
 * TCP captures also record the app's view (app_view) for sockname.c.
 */
#include "abi.h"
#include "addr.h"
#include "counters.h"
#include "maps_conn.h"
#include "outbound_policy.h"
#include "pod_lookup.h"

/* UDP DNS keeps its origin per socket for recvmsg; TCP (DNS included) goes
 * through sockops to the tuple map for SO_ORIGINAL_DST. */
static __always_inline void store_origin(void *ctx, const struct flow *f, __u16 listener, int udp)
{
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct origin o = {};
    o.ip = f->dst;
    o.port = f->dport;
    o.listener = listener;
    if (udp)
        dns_origin.update(&cookie, &o);
    else
        origin_by_cookie.update(&cookie, &o);
}

/* 1 = bound (or already bound to the pod IP), 0 = cannot (no pod IP, bound elsewhere). */
static __always_inline int bind_pod_ip4(struct bpf_sock_addr *ctx, const struct pod_cfg *cfg)
{
    struct bpf_sock *sk = ctx->sk;
    if (!sk || cfg->ip4 == 0)
        return 0;
    if (sk->src_ip4 == cfg->ip4)
        return 1;
    if (sk->src_ip4 != 0)
        return 0;
    struct sockaddr_in sa = {};
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = cfg->ip4;
    return bpf_bind(ctx, (struct sockaddr *)&sa, sizeof(sa)) == 0;
}

static __always_inline int bind_pod_ip6(struct bpf_sock_addr *ctx, const struct pod_cfg *cfg, int mapped)
{
    struct bpf_sock *sk = ctx->sk;
    __u32 want[4] = {cfg->ip6[0], cfg->ip6[1], cfg->ip6[2], cfg->ip6[3]};
    if (mapped) {       /* IPv4 traffic on an IPv6 socket: ::ffff:<pod IPv4> */
        want[0] = 0; want[1] = 0; want[2] = bpf_htonl(0xffff); want[3] = cfg->ip4;
        if (cfg->ip4 == 0)
            return 0;
    }
    if (!sk || ip6_is_zero(want))
        return 0;
    __u32 src[4] = {};
    LOAD_IP6(src, sk->src_ip6);
    if (ip6_eq(src, want))
        return 1;
    if (!ip6_is_zero(src))
        return 0;
    struct sockaddr_in6 sa = {};
    sa.sin6_family = AF_INET6;
    __builtin_memcpy(&sa.sin6_addr, want, 16);
    return bpf_bind(ctx, (struct sockaddr *)&sa, sizeof(sa)) == 0;
}

static __always_inline void count_verdict(int verdict)
{
    if (verdict == V_OUTBOUND)
        count(C_OUT_REDIRECT, 1);
    else if (verdict == V_INBOUND_LOCAL)
        count(C_IN_REDIRECT_LOCAL, 1);
    else
        count(C_DNS_REDIRECT, 1);
}

/* The source address the kernel would pick for f without the redirect, as
 * the app sees it under iptables: the destination itself when it is one of
 * the pod's IPs or ::6, loopback for other loopback destinations, the pod IP
 * of the flow's family otherwise (family 0 = unknown: leave it alone).
 * Returns 1 for a loopback source (nothing to bind in cookie mode). */
static __always_inline int source_as_iptables(const struct pod_cfg *cfg, const struct flow *f,
                                              struct ip_addr *local)
{
    if (is_own_ip(cfg->pod_id, &f->dst)) {
        *local = f->dst;
    } else if (ip_is_lo_routed(&f->dst)) {     /* flow_is_local() without the look-up just done */
        local->family = f->dst.family;
        if (f->dst.family == AF_INET)
            local->a[0] = LOOPBACK4;
        else
            local->a[3] = f->dst.a[3] == bpf_htonl(6) ? f->dst.a[3] : bpf_htonl(1);
        return 1;
    } else if (f->dst.family == AF_INET) {
        pod_ip4(cfg, local);
    } else {
        pod_ip6(cfg, local);
    }
    return 0;
}

/* TCP: remember what getpeername/getsockname must answer (sockname.c). */
static __always_inline void store_app_view(void *ctx, const struct flow *f, const struct ip_addr *local,
                                           __u16 listener)
{
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct app_view v = {};
    v.peer.ip = f->dst;
    v.peer.port = f->dport;
    v.peer.listener = listener;
    v.local = *local;
    app_view.update(&cookie, &v);
}

/* The tail both connect hooks share: decide, bind, remember, redirect.
 * Binding TCP to the pod IP makes the tuple unique in pod-IP mode (refused
 * when impossible; a loopback destination then shows the pod IP to the
 * listener, see README). In cookie mode it is what iptables gives too (the
 * app's source, and the peer Envoy sees, is the pod IP), so a socket that
 * cannot be bound (already bound to a port) just keeps loopback, and
 * getsockname() restores the address. UDP DNS is never bound. */
static __always_inline int capture(struct bpf_sock_addr *ctx, struct pod_cfg *cfg, struct flow *f,
                                   int ipv6, int mapped)
{
    __u64 ugid = bpf_get_current_uid_gid();
    int rule = outbound_rule(cfg, f, (__u32)ugid, (__u32)(ugid >> 32));
    pod_count(cfg->pod_id, rule);
    int verdict = rule_verdict(rule);
    if (verdict == V_PASS || (!f->tcp && verdict != V_DNS))
        return 1;
    struct ip_addr local = {};
    int loopback_src = f->tcp ? source_as_iptables(cfg, f, &local) : 1;
#if !ISTIO_EBPF_COOKIE
    if (f->tcp && !(ipv6 ? bind_pod_ip6(ctx, cfg, mapped) : bind_pod_ip4(ctx, cfg))) {
        count(C_PODIP_BIND_FAIL, 1);
        pod_count(cfg->pod_id, PC_PODIP_BIND_FAIL);
        return 0;
    }
#else
    if (local.family != 0 && !loopback_src) {
        if (ipv6)
            bind_pod_ip6(ctx, cfg, mapped);
        else
            bind_pod_ip4(ctx, cfg);
    }
#endif
    __u16 port = target_port(verdict);
    store_origin(ctx, f, port, !f->tcp);
    if (f->tcp)
        store_app_view(ctx, f, &local, port);
    sa_redirect_local(ctx, ipv6, mapped, port);
    count_verdict(verdict);
    return 1;
}

/* A pod's app init container, opted out of capture (pod_lookup.h init_bypassed). */
static __always_inline int bypassed(const struct pod_cfg *cfg)
{
    if (!init_bypassed(cfg))
        return 0;
    count(C_INIT_BYPASS, 1);
    return 1;
}

int ie_connect4(struct bpf_sock_addr *ctx)
{
    if (ctx->protocol != IPPROTO_TCP && ctx->protocol != IPPROTO_UDP)
        return 1;
    struct pod_cfg *cfg = find_pod(ctx);
    if (!cfg || bypassed(cfg))
        return 1;
    struct flow f = {};
    f.dst.family = AF_INET;
    f.dst.a[0] = ctx->user_ip4;
    f.dport = bpf_ntohs(ctx->user_port);
    f.tcp = ctx->protocol == IPPROTO_TCP;
    struct ip_addr src = {};
    sk_src(ctx->sk, 0, &src);
    f.src_passthrough = ip_is_passthrough(&src);
    return capture(ctx, cfg, &f, 0, 0);
}

int ie_connect6(struct bpf_sock_addr *ctx)
{
    if (ctx->protocol != IPPROTO_TCP && ctx->protocol != IPPROTO_UDP)
        return 1;
    struct pod_cfg *cfg = find_pod(ctx);
    if (!cfg || bypassed(cfg))
        return 1;
    struct flow f = {};
    int mapped = sa_addr6(ctx, &f.dst);
    f.dport = bpf_ntohs(ctx->user_port);
    f.tcp = ctx->protocol == IPPROTO_TCP;
    /* Bound to 127.0.0.6 (mapped) for IPv4 traffic, to ::6 for IPv6 traffic. */
    struct ip_addr src = {};
    sk_src(ctx->sk, 1, &src);
    f.src_passthrough = src.family == f.dst.family && ip_is_passthrough(&src);
    return capture(ctx, cfg, &f, 1, mapped);
}
