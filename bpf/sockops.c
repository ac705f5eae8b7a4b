/* sockops.c - cgroup/sock_ops: connection bookkeeping.
 *
 *  ACTIVE_ESTABLISHED  (app side of a captured connection, source port now
 *                      known): move the original destination from the socket
 *                      cookie to the tuple Envoy will see as its peer
 *                      (CONN_REDIRECTED), ask for state callbacks so the entry
 *                      goes away with the socket.
 *  PASSIVE_ESTABLISHED (a connection sk_lookup handed to Envoy's 15006): record
 *                      its local address as the original destination, under
 *                      the client's end (CONN_INBOUND).
 *  STATE_CB -> CLOSE   delete the entry this socket wrote, and only that one.
 *  TCP_LISTEN_CB       cookie mode: register a socket listening on 15006 as
 *                      the inbound target of every IP of its pod (sk_lookup).
 *  *_ESTABLISHED       with sockmap: put app<->sidecar sockets in accel_socks.
 */
#include "abi.h"
#include "addr.h"
#include "counters.h"
#include "maps_conn.h"
#include "pod_lookup.h"

#ifndef BPF_SOCK_OPS_TCP_LISTEN_CB
#define BPF_SOCK_OPS_TCP_LISTEN_CB 11
#endif

static __always_inline __u64 ops_netns(struct bpf_sock_ops *s)
{
#if ISTIO_EBPF_COOKIE
    return bpf_get_netns_cookie(s);
#else
    return 0;
#endif
}

#if ISTIO_EBPF_SOCKMAP
static __always_inline void accel_insert(struct bpf_sock_ops *s)
{
    struct sock_key k = {};
    k.netns = ops_netns(s);
    ops_local(s, &k.local);
    ops_remote(s, &k.remote);
    k.local_port = s->local_port;
    k.remote_port = bpf_ntohl(s->remote_port);
    int err = accel_socks.sock_hash_update(s, &k, BPF_ANY);
    if (err == 0)
        count(C_SOCKMAP_INSERT, 1);
}
#endif

#if ISTIO_EBPF_COOKIE
/* Envoy started listening on 15006: make it the sk_lookup target for its pod. A socket
 * bound to loopback (istio-validation's 127.0.0.1:15006 during init) takes no connection
 * to the pod's IPs, so it is not one (datapath/listeners.py skips it in pod-IP mode too). */
static __always_inline void register_listener(struct bpf_sock_ops *s)
{
    struct ip_addr bound = {};
    ops_local(s, &bound);
    if (ip_is_loopback(&bound))
        return;
    __u64 netns = bpf_get_netns_cookie(s);
    struct pod_cfg *cfg = pod_by_netns.lookup(&netns);
    if (!cfg)
        return;
    struct ip_addr key = {};
    if (s->family == AF_INET ? pod_ip4(cfg, &key) : pod_ip6(cfg, &key))
        inbound_listeners.sock_hash_update(s, &key, BPF_ANY);
}
#endif

int ie_sockops(struct bpf_sock_ops *s)
{
    if (s->family != AF_INET && s->family != AF_INET6)
        return 1;
    switch (s->op) {
    case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: {
        __u64 cookie = bpf_get_socket_cookie(s);
        struct origin *o = origin_by_cookie.lookup(&cookie);
        if (o) {
            struct conn_key k = {};
            k.netns = ops_netns(s);
            ops_local(s, &k.ip);
            k.port = s->local_port;
            k.kind = CONN_REDIRECTED;
            struct origin copy = *o;
            origin_by_tuple.update(&k, &copy);
            origin_by_cookie.delete(&cookie);
            bpf_sock_ops_cb_flags_set(s, BPF_SOCK_OPS_STATE_CB_FLAG);
            count(C_TUPLE_STORED, 1);
#if ISTIO_EBPF_SOCKMAP
            accel_insert(s);
#endif
        }
#if ISTIO_EBPF_SOCKMAP
        else {
            struct ip_addr l = {};
            ops_local(s, &l);
            if (ip_is_passthrough(&l))     /* Envoy -> app through 127.0.0.6 */
                accel_insert(s);
        }
#endif
        break;
    }
    case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB: {
        struct ip_addr l = {}, r = {};
        ops_local(s, &l);
        ops_remote(s, &r);
        /* Accepted through sk_lookup (same rule as sk_lookup.c): the local
         * address is the original destination. Record it so SO_ORIGINAL_DST
         * answers as conntrack would; Envoy's ORIGINAL_DST clusters only use
         * an address the original_dst filter restored. */
        /* No pod owns a loopback address: Envoy accepting a redirected app connection
         * (local 127.0.0.1:15001) needs no look-up. */
        struct pod_ip_val *pod = NULL;
        if (!ip_is_loopback(&l))
            pod = pod_by_ip.lookup(&l);
        if (pod && !from_own_pod(pod->pod_id, &r) && inbound_port_captured(pod, s->local_port)) {
            struct conn_key k = {};
            k.netns = ops_netns(s);
            k.ip = r;
            k.port = bpf_ntohl(s->remote_port);
            k.kind = CONN_INBOUND;
            struct origin o = {};
            o.ip = l;
            o.port = s->local_port;
            o.listener = s->local_port;
            origin_by_tuple.update(&k, &o);
            bpf_sock_ops_cb_flags_set(s, BPF_SOCK_OPS_STATE_CB_FLAG);
        }
#if ISTIO_EBPF_SOCKMAP
        if (s->local_port == OUTBOUND_PORT || s->local_port == INBOUND_PORT || ip_is_passthrough(&r))
            accel_insert(s);
#endif
        break;
    }
    case BPF_SOCK_OPS_STATE_CB:
        if (s->args[1] == BPF_TCP_CLOSE) {
            /* Only the two kinds above asked for this callback. An app socket was
             * redirected to a loopback listener; an inbound socket's client is never
             * loopback (from_own_pod): so the remote end says which entry is ours,
             * and an entry of the other kind under the same ip:port stays. */
            struct conn_key k = {};
            k.netns = ops_netns(s);
            struct ip_addr r = {};
            ops_remote(s, &r);
            if (ip_is_loopback(&r)) {
                ops_local(s, &k.ip);
                k.port = s->local_port;
                k.kind = CONN_REDIRECTED;
            } else {
                k.ip = r;
                k.port = bpf_ntohl(s->remote_port);
                k.kind = CONN_INBOUND;
            }
            origin_by_tuple.delete(&k);
        }
        break;
    case BPF_SOCK_OPS_TCP_LISTEN_CB:
#if ISTIO_EBPF_COOKIE
        if (s->local_port == INBOUND_PORT)
            register_listener(s);
#endif
        break;
    }
    return 1;
}
