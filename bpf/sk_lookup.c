/* sk_lookup.c - sk_lookup (one link per pod network namespace): inbound capture.
 *
 * Istio's ISTIO_INBOUND chain without NAT: a TCP connection arriving at a pod
 * IP on a captured port is handed to Envoy's 15006 listening socket. The
 * socket keeps the original destination as its local address, so Envoy's
 * original_dst filter needs no SO_ORIGINAL_DST answer at all.
 *
 * No cookie helper exists here: the pod is found by the destination IP
 * (local_ip4/6). Connections from the pod itself (its own IPs, loopback,
 * 127.0.0.6) were already decided by the connect hooks, as iptables decides
 * them in OUTPUT rather than PREROUTING.
 */
#include "istio_ebpf_maps.h"

int ie_inbound(struct bpf_sk_lookup *ctx)
{
    if (ctx->protocol != IPPROTO_TCP)
        return SK_PASS;

    struct ip_addr local = {}, remote = {};
    local.family = ctx->family;
    remote.family = ctx->family;
    if (ctx->family == AF_INET) {
        local.a[0] = ctx->local_ip4;
        remote.a[0] = ctx->remote_ip4;
    } else {
        local.a[0] = ctx->local_ip6[0]; local.a[1] = ctx->local_ip6[1];
        local.a[2] = ctx->local_ip6[2]; local.a[3] = ctx->local_ip6[3];
        remote.a[0] = ctx->remote_ip6[0]; remote.a[1] = ctx->remote_ip6[1];
        remote.a[2] = ctx->remote_ip6[2]; remote.a[3] = ctx->remote_ip6[3];
    }

    struct pod_ip_val *pod = pod_by_ip.lookup(&local);
    if (!pod || from_own_pod(pod->pod_id, &remote))
        return SK_PASS;
    if (!inbound_port_captured(pod, ctx->local_port))
        return SK_PASS;

    struct bpf_sock *sk = (struct bpf_sock *)inbound_listeners.lookup(&local);
    if (!sk) {
        /* Captured port, no Envoy listening yet: never deliver uncaptured. */
        count(C_INBOUND_NO_LISTENER, 1);
        return SK_DROP;
    }
    long err = bpf_sk_assign(ctx, sk, 0);
    bpf_sk_release(sk);
    if (err) {
        count(C_INBOUND_NO_LISTENER, 1);
        return SK_DROP;
    }
    count(C_INBOUND_ASSIGN, 1);
    return SK_PASS;
}
