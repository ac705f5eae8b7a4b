/* addr.h - struct ip_addr: IPv4, IPv6 and IPv4-mapped IPv6 addresses, read from and written
 * to the BPF contexts the programs run in.
 *
 * One rule everywhere: an IPv4-mapped IPv6 address (::ffff:a.b.c.d) is IPv4. IPv4 traffic
 * on an IPv6 socket is decided and keyed as IPv4 (Envoy's IPv4 listener sees an IPv4 peer,
 * and the IPv4 hooks never see that traffic).
 *
 * Loopback: four different sets, on purpose.
 *   ip_is_loopback()   127.0.0.0/8 and ::1: loopback addresses (a redirected socket's peer).
 *   ip_is_lo_routed()  127.0.0.0/8, 0.0.0.0, ::1, ::6, ::: destinations the kernel routes
 *                      through lo by address alone (Istio's "-o lo", before the pod's IPs).
 *   ip_is_127_0_0_1()  127.0.0.1 and ::1 exactly: the addresses Istio's rules name
 *                      ("-d 127.0.0.1/32", ip6tables "-d ::1/128"), and where REDIRECT sends.
 *   ip_is_own_src()    127.0.0.0/8 and ::/96 (::, ::1, ::6, ...): sources only the host (the
 *                      pod itself) can use, never another machine.
 */
#ifndef ISTIO_EBPF_ADDR_H
#define ISTIO_EBPF_ADDR_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <uapi/linux/in6.h>
#include <linux/socket.h>

#include "abi.h"

#define LOOPBACK4 0x0100007f    /* 127.0.0.1, network order as read on x86 */

/* Keep context loads and stores apart: the verifier wants each context access at its own
 * constant offset and size, and clang may merge two adjacent 32-bit ones into one 64-bit
 * access that it rejects (sock_ops, bpf_sock, and the stores of bpf_sock_addr). */
#define ctx_barrier() asm volatile("" ::: "memory")

/* Load a 4-word IPv6 address field of a context (ctx->user_ip6, sk->src_ip6, ...) into
 * the __u32 array w, one word at a time (see ctx_barrier). */
#define LOAD_IP6(w, field) do { \
        (w)[0] = (field)[0]; ctx_barrier(); \
        (w)[1] = (field)[1]; ctx_barrier(); \
        (w)[2] = (field)[2]; ctx_barrier(); \
        (w)[3] = (field)[3]; ctx_barrier(); \
    } while (0)

static __always_inline int ip6_is_v4mapped(const __u32 *w)
{
    return w[0] == 0 && w[1] == 0 && w[2] == bpf_htonl(0xffff);
}

static __always_inline void ip_set4(struct ip_addr *ip, __u32 a)
{
    ip->family = AF_INET;
    ip->a[0] = a;
}

/* An IPv6 address as it is, never mapped (pod IPs from pod_cfg, sk_lookup's addresses). */
static __always_inline void ip_set6(struct ip_addr *ip, const __u32 *w)
{
    ip->family = AF_INET6;
    ip->a[0] = w[0]; ip->a[1] = w[1]; ip->a[2] = w[2]; ip->a[3] = w[3];
}

/* An IPv6 address, IPv4-mapped becoming IPv4. 1 if it was mapped. */
static __always_inline int ip_from6(struct ip_addr *ip, const __u32 *w)
{
    if (ip6_is_v4mapped(w)) {
        ip_set4(ip, w[3]);
        return 1;
    }
    ip_set6(ip, w);
    return 0;
}

/* An address of a socket whose family is known: IPv4, or IPv6 (mapped becoming IPv4). */
static __always_inline int ip_from(struct ip_addr *ip, __u32 family, __u32 a4, const __u32 *w6)
{
    if (family == AF_INET) {
        ip_set4(ip, a4);
        return 0;
    }
    return ip_from6(ip, w6);
}

static __always_inline int ip6_is_zero(const __u32 *w)
{
    return (w[0] | w[1] | w[2] | w[3]) == 0;
}

static __always_inline int ip6_eq(const __u32 *x, const __u32 *y)
{
    return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

static __always_inline int ip_is_unspecified(const struct ip_addr *ip)
{
    return ip->family == AF_INET ? ip->a[0] == 0 : ip6_is_zero(ip->a);
}

/* ::n (n in host order), for an address already known to be IPv6. */
static __always_inline int ip6_is_low(const __u32 *w, __u32 n)
{
    return (w[0] | w[1] | w[2]) == 0 && w[3] == bpf_htonl(n);
}

static __always_inline int ip4_is_loopback(__u32 a)
{
    return (a & 0xff) == 127;       /* 127.0.0.0/8, network order */
}

static __always_inline int ip_is_loopback(const struct ip_addr *ip)
{
    if (ip->family == AF_INET)
        return ip4_is_loopback(ip->a[0]);
    return ip6_is_low(ip->a, 1);
}

static __always_inline int ip_is_lo_routed(const struct ip_addr *ip)
{
    if (ip->family == AF_INET)
        return ip4_is_loopback(ip->a[0]) || ip->a[0] == 0;
    return (ip->a[0] | ip->a[1] | ip->a[2]) == 0 &&
           (ip->a[3] == 0 || ip->a[3] == bpf_htonl(1) || ip->a[3] == bpf_htonl(6));
}

static __always_inline int ip_is_own_src(const struct ip_addr *ip)
{
    if (ip->family == AF_INET)
        return ip4_is_loopback(ip->a[0]);
    return (ip->a[0] | ip->a[1] | ip->a[2]) == 0;     /* ::/96: ::, ::1, ::6, ... */
}

static __always_inline int ip_is_127_0_0_1(const struct ip_addr *ip)
{
    if (ip->family == AF_INET)
        return ip->a[0] == LOOPBACK4;
    return ip6_is_low(ip->a, 1);
}

/* Envoy's inbound passthrough source: 127.0.0.6, ::6 for IPv6. */
static __always_inline int ip_is_passthrough(const struct ip_addr *ip)
{
    if (ip->family == AF_INET)
        return ip->a[0] == INBOUND_PASSTHROUGH_SRC;
    return ip6_is_low(ip->a, 6);
}

/* ---- struct bpf_sock_addr (connect, sendmsg, recvmsg, getpeername, getsockname) ---- */

/* The address of an IPv6 sock_addr hook (user_ip6). 1 if IPv4-mapped (returned as IPv4). */
static __always_inline int sa_addr6(struct bpf_sock_addr *ctx, struct ip_addr *ip)
{
    __u32 w[4];
    LOAD_IP6(w, ctx->user_ip6);
    return ip_from6(ip, w);
}

/* Write ip into an IPv6 sock_addr hook's address: IPv4 as ::ffff:a.b.c.d. */
static __always_inline void sa_put6(struct bpf_sock_addr *ctx, const struct ip_addr *ip)
{
    if (ip->family == AF_INET) {
        ctx->user_ip6[0] = 0;
        ctx->user_ip6[1] = 0;
        ctx->user_ip6[2] = bpf_htonl(0xffff);
        ctx->user_ip6[3] = ip->a[0];
    } else {
        ctx->user_ip6[0] = ip->a[0];
        ctx->user_ip6[1] = ip->a[1];
        ctx->user_ip6[2] = ip->a[2];
        ctx->user_ip6[3] = ip->a[3];
    }
    ctx_barrier();
}

/* Write ip:port into a sock_addr hook of family ipv6 (0/1), the port in host order. */
static __always_inline void sa_put(struct bpf_sock_addr *ctx, int ipv6, const struct ip_addr *ip, __u16 port)
{
    if (ipv6)
        sa_put6(ctx, ip);
    else
        ctx->user_ip4 = ip->a[0];
    ctx_barrier();
    ctx->user_port = bpf_htons(port);
}

/* Send the socket to a local listener: 127.0.0.1, ::ffff:127.0.0.1 on a v4-mapped flow, or
 * ::1 (where iptables' and ip6tables' REDIRECT send it). */
static __always_inline void sa_redirect_local(struct bpf_sock_addr *ctx, int ipv6, int mapped, __u16 port)
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
    ctx_barrier();
    ctx->user_port = bpf_htons(port);
}

/* ---- struct bpf_sock (ctx->sk of sock_addr hooks, getsockopt) ---- */

/* The socket's bound source address (0.0.0.0 / :: when unbound); NULL sk: unspecified. */
static __always_inline int sk_src(struct bpf_sock *sk, int ipv6, struct ip_addr *ip)
{
    __u32 w[4] = {};
    if (!sk) {
        ip->family = ipv6 ? AF_INET6 : AF_INET;
        return 0;
    }
    if (!ipv6) {
        ip_set4(ip, sk->src_ip4);
        return 0;
    }
    LOAD_IP6(w, sk->src_ip6);
    return ip_from6(ip, w);
}

/* An address of a socket context of the given family from its field pair (x_ip4, x_ip6[4]):
 * the IPv6 words are loaded only for an IPv6 socket. Evaluates to 1 if IPv4-mapped. */
#define IP_FROM_CTX(ip, family, f4, f6) ({ \
        __u32 w_[4] = {}; \
        __u32 fam_ = (family); \
        if (fam_ == AF_INET6) \
            LOAD_IP6(w_, f6); \
        ip_from((ip), fam_, fam_ == AF_INET ? (f4) : 0, w_); \
    })

/* The socket's peer and local addresses. */
#define sk_dst(sk, ip)   IP_FROM_CTX(ip, (sk)->family, (sk)->dst_ip4, (sk)->dst_ip6)
#define sk_local(sk, ip) IP_FROM_CTX(ip, (sk)->family, (sk)->src_ip4, (sk)->src_ip6)

/* ---- struct bpf_sock_ops (sockops), struct sk_msg_md (sk_msg) ---- */

#define ops_local(s, ip)  IP_FROM_CTX(ip, (s)->family, (s)->local_ip4, (s)->local_ip6)
#define ops_remote(s, ip) IP_FROM_CTX(ip, (s)->family, (s)->remote_ip4, (s)->remote_ip6)

#endif /* ISTIO_EBPF_ADDR_H */
