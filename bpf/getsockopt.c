/* getsockopt.c - cgroup/getsockopt: answers SO_ORIGINAL_DST (SOL_IP) and
 * IP6T_SO_ORIGINAL_DST (SOL_IPV6) for connections the connect hooks
 * redirected, as netfilter's conntrack would after an iptables REDIRECT.
 *
 * Runs after the kernel's own handler; only overrides the result when the
 * connection is ours, so every other getsockopt is untouched. On Envoy's
 * 15001/15006 listeners a miss is EPERM (fail closed).
 */
#include "abi.h"
#include "addr.h"
#include "counters.h"
#include "maps_conn.h"
#include "maps_pod.h"

#ifndef SOL_IP
#define SOL_IP 0
#endif
#ifndef SOL_IPV6
#define SOL_IPV6 41
#endif
#ifndef EPERM
#define EPERM 1
#endif

/* The pod whose Envoy asks, for its counters (0: none found). Cookie mode: by the asking
 * socket's netns. Pod-IP mode (no cgroup ancestor helper in sockopt programs before 6.4): by an
 * address of the connection that is the pod's own, its local address for an inbound connection,
 * its peer (the app socket, bound to the pod IP) for a redirected one. */
static __always_inline __u32 asking_pod(const struct conn_key *k, const struct ip_addr *local)
{
#if ISTIO_EBPF_COOKIE
    __u64 netns = k->netns;
    struct pod_cfg *cfg = pod_by_netns.lookup(&netns);
    return cfg ? cfg->pod_id : 0;
#else
    struct pod_ip_val *pod = pod_by_ip.lookup((struct ip_addr *)(k->kind == CONN_INBOUND ? local : &k->ip));
    return pod ? pod->pod_id : 0;
#endif
}

int ie_getsockopt(struct bpf_sockopt *ctx)
{
    if (ctx->optname != SO_ORIGINAL_DST || (ctx->level != SOL_IP && ctx->level != SOL_IPV6))
        return 1;
    struct bpf_sock *sk = ctx->sk;
    if (!sk)
        return 1;
    __u32 lport = sk->src_port;
    struct conn_key k = {};
#if ISTIO_EBPF_COOKIE
    k.netns = bpf_get_netns_cookie(ctx);
#endif
    sk_dst(sk, &k.ip);
    /* Which kind of entry answers for this socket (conn_key.kind): a redirected
     * connection reached its listener on loopback; an inbound one kept the pod IP it
     * was sent to as its local address. */
    struct ip_addr local = {};
    sk_local(sk, &local);
    k.kind = ip_is_loopback(&local) ? CONN_REDIRECTED : CONN_INBOUND;
    k.port = bpf_ntohs(sk->dst_port);
    struct origin *o = origin_by_tuple.lookup(&k);
    if (!o || o->listener != lport) {
        if (lport == OUTBOUND_PORT || lport == INBOUND_PORT) {
            /* A redirect listener without our entry (evicted, or an app that
             * dialled 15001 itself): answer EPERM. With conntrack active the
             * kernel would name the listener itself and Envoy would loop. */
            count(C_ORIGDST_MISS, 1);
            pod_count(asking_pod(&k, &local), PC_ORIGDST_MISS);
            /* Returning 0 alone is EPERM only where the kernel had no
             * error of its own: since 5.19 an earlier error (ENOENT
             * without conntrack) stands. Setting retval makes it EPERM
             * everywhere (before 5.19 a 0 return is EPERM at once). */
            ctx->retval = -EPERM;
            return 0;
        }
        return 1;   /* not ours: the kernel's answer stands */
    }

    if (ctx->level == SOL_IP) {
        struct sockaddr_in *sa = ctx->optval;
        if ((void *)(sa + 1) > ctx->optval_end || o->ip.family != AF_INET)
            return 1;
        sa->sin_family = AF_INET;
        sa->sin_port = bpf_htons(o->port);
        sa->sin_addr.s_addr = o->ip.a[0];
        ctx->optlen = sizeof(*sa);
    } else {
        struct sockaddr_in6 *sa = ctx->optval;
        if ((void *)(sa + 1) > ctx->optval_end || o->ip.family != AF_INET6)
            return 1;
        sa->sin6_family = AF_INET6;
        sa->sin6_port = bpf_htons(o->port);
        sa->sin6_flowinfo = 0;
        sa->sin6_addr.in6_u.u6_addr32[0] = o->ip.a[0];
        sa->sin6_addr.in6_u.u6_addr32[1] = o->ip.a[1];
        sa->sin6_addr.in6_u.u6_addr32[2] = o->ip.a[2];
        sa->sin6_addr.in6_u.u6_addr32[3] = o->ip.a[3];
        sa->sin6_scope_id = 0;
        ctx->optlen = sizeof(*sa);
    }
    asm volatile("" ::: "memory");
    ctx->retval = 0;
    count(C_ORIGDST_HIT, 1);
    pod_count(asking_pod(&k, &local), PC_ORIGDST_HIT);
    return 1;
}
