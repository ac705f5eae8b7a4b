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
#include "abi.h"
#include "addr.h"
#include "counters.h"
#include "maps_conn.h"
#include "pod_lookup.h"

int ie_inbound(struct bpf_sk_lookup *ctx)
{
    if (ctx->protocol != IPPROTO_TCP)
        return SK_PASS;

    /* Addresses as they are: an IPv6 packet never carries a v4-mapped address (RFC 4291:
     * such traffic arrives as IPv4), and pod_by_ip holds only real pod IPs. */
    struct ip_addr local = {}, remote = {};
    if (ctx->family == AF_INET) {
        ip_set4(&local, ctx->local_ip4);
        ip_set4(&remote, ctx->remote_ip4);
    } else {
        __u32 w[4];
        LOAD_IP6(w, ctx->local_ip6);
        ip_set6(&local, w);
        LOAD_IP6(w, ctx->remote_ip6);
        ip_set6(&remote, w);
    }

    struct pod_ip_val *pod = NULL;
    int rule = inbound_decision(&local, &remote, ctx->local_port, &pod);
    if (rule < 0 || !pod)
        return SK_PASS;
    pod_count(pod->pod_id, rule);
    if (!inbound_rule_captures(rule))
        return SK_PASS;

    struct bpf_sock *sk = (struct bpf_sock *)inbound_listeners.lookup(&local);
    if (!sk) {
        /* Captured port, no Envoy listening yet: never deliver uncaptured. */
        count(C_INBOUND_NO_LISTENER, 1);
        pod_count(pod->pod_id, PC_IN_NO_LISTENER);
        return SK_DROP;
    }
    long err = bpf_sk_assign(ctx, sk, 0);
    bpf_sk_release(sk);
    if (err) {
        count(C_INBOUND_NO_LISTENER, 1);
        pod_count(pod->pod_id, PC_IN_NO_LISTENER);
        return SK_DROP;
    }
    count(C_INBOUND_ASSIGN, 1);
    return SK_PASS;
}
