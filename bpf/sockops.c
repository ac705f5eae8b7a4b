/* sockops.c - cgroup/sock_ops: connection bookkeeping.
 *
 *  ACTIVE_ESTABLISHED  (app side of a captured connection, source port now
 *                      known): move the original destination from the socket
 *                      cookie to the tuple Envoy will see as its peer, ask for
 *                      state callbacks so the entry goes away with the socket.
 *  STATE_CB -> CLOSE   delete that tuple entry.
 *  TCP_LISTEN_CB       cookie mode: register a socket listening on 15006 as
 *                      the inbound target of every IP of its pod (sk_lookup).
 *  *_ESTABLISHED       with sockmap: put app<->sidecar sockets in accel_socks.
 */
#include "istio_ebpf_maps.h"

#ifndef BPF_SOCK_OPS_TCP_LISTEN_CB
#define BPF_SOCK_OPS_TCP_LISTEN_CB 11
#endif

/* Context fields must be loaded at constant offsets (no pointer arithmetic
 * on ctx): one load per word, kept apart with compiler barriers. */
#define LOAD4(dst, src) do { \
        dst[0] = src[0]; asm volatile("" ::: "memory"); \
        dst[1] = src[1]; asm volatile("" ::: "memory"); \
        dst[2] = src[2]; asm volatile("" ::: "memory"); \
        dst[3] = src[3]; asm volatile("" ::: "memory"); \
    } while (0)

/* IPv4-mapped IPv6 becomes IPv4: Envoy's IPv4 listener sees an IPv4 peer. */
static __always_inline void set_addr(struct ip_addr *ip, __u32 family, __u32 ip4, const __u32 *ip6)
{
    if (family == AF_INET) {
        ip->family = AF_INET;
        ip->a[0] = ip4;
    } else {
        ip_from6(ip, ip6[0], ip6[1], ip6[2], ip6[3]);
    }
}

static __always_inline void local_addr(struct bpf_sock_ops *s, struct ip_addr *ip)
{
    __u32 w[4] = {};
    __u32 family = s->family;
    if (family == AF_INET6)
        LOAD4(w, s->local_ip6);
    set_addr(ip, family, family == AF_INET ? s->local_ip4 : 0, w);
}

static __always_inline void remote_addr(struct bpf_sock_ops *s, struct ip_addr *ip)
{
    __u32 w[4] = {};
    __u32 family = s->family;
    if (family == AF_INET6)
        LOAD4(w, s->remote_ip6);
    set_addr(ip, family, family == AF_INET ? s->remote_ip4 : 0, w);
}

static __always_inline __u64 ops_netns(struct bpf_sock_ops *s)
{
#if ISTIO_EBPF_COOKIE
    return bpf_get_netns_cookie(s);
#else
    return 0;
#endif
}

static __always_inline void conn_key_of(struct bpf_sock_ops *s, struct conn_key *k)
{
    k->netns = ops_netns(s);
    local_addr(s, &k->ip);
    k->port = s->local_port;
}

#if ISTIO_EBPF_SOCKMAP
static __always_inline void accel_insert(struct bpf_sock_ops *s)
{
    struct sock_key k = {};
    k.netns = ops_netns(s);
    local_addr(s, &k.local);
    remote_addr(s, &k.remote);
    k.local_port = s->local_port;
    k.remote_port = bpf_ntohl(s->remote_port);
    int err = accel_socks.sock_hash_update(s, &k, BPF_ANY);
    if (err == 0)
        count(C_SOCKMAP_INSERT, 1);
}

static __always_inline int is_passthrough(const struct ip_addr *ip)
{
    return ip->family == AF_INET ? ip->a[0] == PASSTHROUGH4
                                 : (ip->a[0] | ip->a[1] | ip->a[2]) == 0 && ip->a[3] == bpf_htonl(6);
}
#endif

#if ISTIO_EBPF_COOKIE
/* Envoy started listening on 15006: make it the sk_lookup target for its pod. */
static __always_inline void register_listener(struct bpf_sock_ops *s)
{
    __u64 netns = bpf_get_netns_cookie(s);
    struct pod_cfg *cfg = pod_by_netns.lookup(&netns);
    if (!cfg)
        return;
    struct ip_addr key = {};
    if (s->family == AF_INET && cfg->ip4) {
        key.family = AF_INET;
        key.a[0] = cfg->ip4;
        inbound_listeners.sock_hash_update(s, &key, BPF_ANY);
    } else if (s->family == AF_INET6 && (cfg->ip6[0] | cfg->ip6[1] | cfg->ip6[2] | cfg->ip6[3])) {
        key.family = AF_INET6;
        key.a[0] = cfg->ip6[0]; key.a[1] = cfg->ip6[1];
        key.a[2] = cfg->ip6[2]; key.a[3] = cfg->ip6[3];
        inbound_listeners.sock_hash_update(s, &key, BPF_ANY);
    }
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
            conn_key_of(s, &k);
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
            local_addr(s, &l);
            if (is_passthrough(&l))     /* Envoy -> app through 127.0.0.6 */
                accel_insert(s);
        }
#endif
        break;
    }
    case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB: {
        struct ip_addr l = {}, r = {};
        local_addr(s, &l);
        remote_addr(s, &r);
        /* Accepted through sk_lookup (same rule as sk_lookup.c): the local
         * address is the original destination. Record it so SO_ORIGINAL_DST
         * answers as conntrack would; Envoy's ORIGINAL_DST clusters only use
         * an address the original_dst filter restored. */
        struct pod_ip_val *pod = pod_by_ip.lookup(&l);
        if (pod && !from_own_pod(pod->pod_id, &r) && inbound_port_captured(pod, s->local_port)) {
            struct conn_key k = {};
            k.netns = ops_netns(s);
            k.ip = r;
            k.port = bpf_ntohl(s->remote_port);
            struct origin o = {};
            o.ip = l;
            o.port = s->local_port;
            o.listener = s->local_port;
            origin_by_tuple.update(&k, &o);
            bpf_sock_ops_cb_flags_set(s, BPF_SOCK_OPS_STATE_CB_FLAG);
        }
#if ISTIO_EBPF_SOCKMAP
        if (s->local_port == OUTBOUND_PORT || s->local_port == INBOUND_PORT || is_passthrough(&r))
            accel_insert(s);
#endif
        break;
    }
    case BPF_SOCK_OPS_STATE_CB:
        if (s->args[1] == BPF_TCP_CLOSE) {
            /* Our entries are keyed by the app end: the local end of an app
             * socket, the remote end of an accepted inbound socket. */
            struct conn_key k = {};
            conn_key_of(s, &k);
            origin_by_tuple.delete(&k);
            struct conn_key rk = {};
            rk.netns = k.netns;
            remote_addr(s, &rk.ip);
            rk.port = bpf_ntohl(s->remote_port);
            origin_by_tuple.delete(&rk);
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
