/* deny.c - refuse every connection of one pod that cannot be programmed (fail closed).
 *
 * The agent links these into a POD's own cgroup (connect4/6, sendmsg4/6) and
 * network namespace (sk_lookup) while it cannot write that pod's capture
 * entries (full maps, an invalid traffic annotation, a kernel refusal), and
 * unlinks them once it can. An opted-in pod then never talks past its Envoy:
 *   outbound  connect() and UDP sendmsg() fail with EPERM (return 0);
 *   inbound   every connection to the pod's addresses is dropped at socket
 *             lookup, which the client sees as refused (the SYN gets a RST).
 * Loopback stays open: it never leaves the pod (Istio's rules do not capture
 * it either), and the sidecar's own processes talk over it.
 *
 * No map and no project header: it has to work exactly when the maps are
 * full, and it does not change with the datapath's layout. Names carry a
 * deny_ prefix because the loader compiles every source as one unit.
 */

#ifndef AF_INET
#define AF_INET 2
#endif

static __always_inline int deny_loopback4(__u32 be_addr)
{
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    return (be_addr & 0xff) == 127;        /* 127.0.0.0/8 in network order */
#else
    return (be_addr >> 24) == 127;
#endif
}

static __always_inline __u32 deny_be32(__u32 host)
{
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    return __builtin_bswap32(host);
#else
    return host;
#endif
}

/* ::1, or an IPv4-mapped loopback address (::ffff:127.x.y.z) */
static __always_inline int deny_loopback6(__u32 a0, __u32 a1, __u32 a2, __u32 a3)
{
    if (a0 || a1)
        return 0;
    if (a2 == 0)
        return a3 == deny_be32(1);
    return a2 == deny_be32(0xffff) && deny_loopback4(a3);
}

int ie_deny_connect4(struct bpf_sock_addr *ctx)
{
    return deny_loopback4(ctx->user_ip4);
}

int ie_deny_connect6(struct bpf_sock_addr *ctx)
{
    return deny_loopback6(ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3]);
}

int ie_deny_sendmsg4(struct bpf_sock_addr *ctx)
{
    return deny_loopback4(ctx->user_ip4);
}

int ie_deny_sendmsg6(struct bpf_sock_addr *ctx)
{
    return deny_loopback6(ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3]);
}

int ie_deny_inbound(struct bpf_sk_lookup *ctx)
{
    if (ctx->family == AF_INET)
        return deny_loopback4(ctx->local_ip4) ? SK_PASS : SK_DROP;
    return deny_loopback6(ctx->local_ip6[0], ctx->local_ip6[1], ctx->local_ip6[2], ctx->local_ip6[3])
        ? SK_PASS : SK_DROP;
}
