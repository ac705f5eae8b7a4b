/* dns.c - cgroup/sendmsg4|6 and cgroup/recvmsg4|6: DNS capture for pods with
 * Istio's DNS proxying (ISTIO_META_DNS_CAPTURE).
 *
 * Unconnected UDP to port 53 goes to 127.0.0.1:15053 (::1 for IPv6), as
 * ISTIO_OUTPUT_DNS does; replies coming back from 15053 get the original
 * server as their source again, as conntrack's reverse NAT would, and
 * getpeername() of a connected DNS socket names the original server (sockname.c's
 * getpeername hooks; both use dns_restore.h). Connected UDP sockets are handled by
 * the connect hooks (connect.c) and share the dns_origin map.
 */
#include "abi.h"
#include "addr.h"
#include "counters.h"
#include "dns_restore.h"
#include "maps_conn.h"
#include "outbound_policy.h"
#include "pod_lookup.h"

static __always_inline int dns_verdict(struct bpf_sock_addr *ctx, struct flow *f)
{
    struct pod_cfg *cfg = find_pod(ctx);
    if (!cfg || !udp_decided(cfg, f->dport))
        return V_PASS;
    if (init_bypassed(cfg)) {          /* an app init container: as if the pod were not meshed */
        count(C_INIT_BYPASS, 1);
        return V_PASS;
    }
    __u64 ugid = bpf_get_current_uid_gid();
    int rule = outbound_rule(cfg, f, (__u32)ugid, (__u32)(ugid >> 32));
    pod_count(cfg->pod_id, rule);
    return rule_verdict(rule);
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
    sa_redirect_local(ctx, 0, 0, DNS_PROXY_PORT);
    return 1;
}

int ie_sendmsg6(struct bpf_sock_addr *ctx)
{
    if (ctx->protocol != IPPROTO_UDP || bpf_ntohs(ctx->user_port) != DNS_PORT)
        return 1;
    struct flow f = {};
    int mapped = sa_addr6(ctx, &f.dst);
    f.dport = DNS_PORT;
    if (dns_verdict(ctx, &f) != V_DNS)
        return 1;
    remember(ctx, &f);
    sa_redirect_local(ctx, 1, mapped, DNS_PROXY_PORT);
    return 1;
}

int ie_recvmsg4(struct bpf_sock_addr *ctx) { return dns_restore4(ctx); }
int ie_recvmsg6(struct bpf_sock_addr *ctx) { return dns_restore6(ctx); }
