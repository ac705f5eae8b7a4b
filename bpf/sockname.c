/* sockname.c - cgroup/getpeername4|6 and cgroup/getsockname4|6: what the
 * application sees of a captured connection (kernel >= 5.8).
 *
 * Under iptables REDIRECT the NAT is invisible to the app: getpeername()
 * names the destination it dialled, getsockname() its pod IP and the real
 * source port. The connect hooks (connect.c) record both in app_view under the
 * app socket's cookie; these hooks give them back. Only sockets with an
 * app_view entry change, and only while they still show the redirect (a
 * loopback address, the listener's port): Envoy's own accepted and upstream
 * sockets and every uncaptured socket keep the kernel's answer.
 *
 * UDP DNS (connected sockets, dns.c) keeps its own restore4/restore6, which
 * this file calls: dns.c precedes it in the loaded module.
 */
#include "istio_ebpf_maps.h"

static __always_inline int loopback6_or_mapped(__u32 a0, __u32 a1, __u32 a2, __u32 a3)
{
    if (a0 != 0 || a1 != 0)
        return 0;
    if (a2 == 0 && a3 == bpf_htonl(1))
        return 1;
    return a2 == bpf_htonl(0xffff) && is_loopback4(a3);
}

static __always_inline struct app_view *view_of(struct bpf_sock_addr *ctx)
{
    if (ctx->protocol != IPPROTO_TCP)
        return NULL;
    __u64 cookie = bpf_get_socket_cookie(ctx);
    return app_view.lookup(&cookie);
}

int ie_getpeername4(struct bpf_sock_addr *ctx)
{
    if (ctx->protocol == IPPROTO_UDP)
        return restore4(ctx);
    struct app_view *v = view_of(ctx);
    if (!v || v->peer.ip.family != AF_INET || !is_loopback4(ctx->user_ip4) ||
        bpf_ntohs(ctx->user_port) != v->peer.listener)
        return 1;
    ctx->user_ip4 = v->peer.ip.a[0];
    asm volatile("" ::: "memory");
    ctx->user_port = bpf_htons(v->peer.port);
    count(C_APP_VIEW_RESTORED, 1);
    return 1;
}

int ie_getpeername6(struct bpf_sock_addr *ctx)
{
    if (ctx->protocol == IPPROTO_UDP)
        return restore6(ctx);
    struct app_view *v = view_of(ctx);
    if (!v || bpf_ntohs(ctx->user_port) != v->peer.listener)
        return 1;
    if (!loopback6_or_mapped(ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3]))
        return 1;
    put6(ctx, &v->peer.ip);
    ctx->user_port = bpf_htons(v->peer.port);
    count(C_APP_VIEW_RESTORED, 1);
    return 1;
}

/* The local address the route would have chosen for the original
 * destination: it differs where the socket could not be bound to the pod IP
 * (cookie mode, bound to a port beforehand: loopback) or had to be (pod-IP
 * mode, loopback destination: the pod IP). The port is the real one. */
int ie_getsockname4(struct bpf_sock_addr *ctx)
{
    struct app_view *v = view_of(ctx);
    if (!v || v->local.family != AF_INET || ctx->user_ip4 == v->local.a[0])
        return 1;
    ctx->user_ip4 = v->local.a[0];
    count(C_APP_VIEW_RESTORED, 1);
    return 1;
}

int ie_getsockname6(struct bpf_sock_addr *ctx)
{
    struct app_view *v = view_of(ctx);
    if (!v || v->local.family == 0)
        return 1;
    put6(ctx, &v->local);
    return 1;
}
