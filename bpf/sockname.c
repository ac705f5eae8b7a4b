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
 * UDP DNS (connected sockets, dns.c) is restored by dns_restore.h, as recvmsg is.
 */
#include "abi.h"
#include "addr.h"
#include "counters.h"
#include "dns_restore.h"
#include "maps_conn.h"

static __always_inline struct app_view *view_of(struct bpf_sock_addr *ctx)
{
    if (ctx->protocol != IPPROTO_TCP)
        return NULL;
    __u64 cookie = bpf_get_socket_cookie(ctx);
    return app_view.lookup(&cookie);
}

/* The peer still shows the redirect: the listener's port on loopback. The redirect wrote
 * 127.0.0.1 (::1, ::ffff:127.0.0.1), but any loopback address is accepted (ip_is_loopback,
 * not ip_is_127_0_0_1): the app_view entry already says this socket was redirected, and
 * the listener's port on lo can only be that redirect. */
static __always_inline int peer_is_redirect(const struct ip_addr *peer, __u16 port, const struct app_view *v)
{
    return ip_is_loopback(peer) && port == v->peer.listener;
}

int ie_getpeername4(struct bpf_sock_addr *ctx)
{
    if (ctx->protocol == IPPROTO_UDP)
        return dns_restore4(ctx);
    struct app_view *v = view_of(ctx);
    if (!v || v->peer.ip.family != AF_INET)
        return 1;
    struct ip_addr peer = {};
    ip_set4(&peer, ctx->user_ip4);
    if (!peer_is_redirect(&peer, bpf_ntohs(ctx->user_port), v))
        return 1;
    sa_put(ctx, 0, &v->peer.ip, v->peer.port);
    count(C_APP_VIEW_RESTORED, 1);
    return 1;
}

int ie_getpeername6(struct bpf_sock_addr *ctx)
{
    if (ctx->protocol == IPPROTO_UDP)
        return dns_restore6(ctx);
    struct app_view *v = view_of(ctx);
    if (!v)
        return 1;
    struct ip_addr peer = {};
    sa_addr6(ctx, &peer);
    if (!peer_is_redirect(&peer, bpf_ntohs(ctx->user_port), v))
        return 1;
    sa_put(ctx, 1, &v->peer.ip, v->peer.port);
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
    sa_put6(ctx, &v->local);
    return 1;
}
