/* dns_restore.h - undo the DNS redirect where a UDP socket sees addresses: the source of a
 * reply (recvmsg, dns.c) and the peer of a connected socket (getpeername, sockname.c). An
 * address of 127.0.0.1:15053 (::1, ::ffff:127.0.0.1) on a socket the DNS capture redirected
 * becomes the original server again, as conntrack's reverse NAT would make it.
 */
#ifndef ISTIO_EBPF_DNS_RESTORE_H
#define ISTIO_EBPF_DNS_RESTORE_H

#include "abi.h"
#include "addr.h"
#include "maps_conn.h"

/* Exactly where the redirect sent it (ip_is_127_0_0_1): any other address is a real one. */
static __always_inline int dns_restore(struct bpf_sock_addr *ctx, int ipv6)
{
    if (ctx->protocol != IPPROTO_UDP || bpf_ntohs(ctx->user_port) != DNS_PROXY_PORT)
        return 1;
    struct ip_addr at = {};
    if (ipv6)
        sa_addr6(ctx, &at);
    else
        ip_set4(&at, ctx->user_ip4);
    if (!ip_is_127_0_0_1(&at))
        return 1;
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct origin *o = dns_origin.lookup(&cookie);
    /* An IPv4 socket can only show an IPv4 server; an IPv6 one shows IPv4 as mapped. */
    if (!o || (!ipv6 && o->ip.family != AF_INET))
        return 1;
    sa_put(ctx, ipv6, &o->ip, o->port);
    return 1;
}

static __always_inline int dns_restore4(struct bpf_sock_addr *ctx) { return dns_restore(ctx, 0); }
static __always_inline int dns_restore6(struct bpf_sock_addr *ctx) { return dns_restore(ctx, 1); }

#endif /* ISTIO_EBPF_DNS_RESTORE_H */
