/* istio_ebpf_maps.h - the maps and types shared by every istio-ebpf program.
 *
 * The loader concatenates this header with one .c file per attach point into a
 * single BCC module, so each map below exists once and every program sees it.
 * Userspace (istio_ebpf_plugin/datapath/maps.py) mirrors these structs with
 * ctypes: change both together (tests/test_maps_layout.py compares them with
 * what BCC generates from this file).
 *
 * Compile-time switches (set by the loader):
 *   ISTIO_EBPF_COOKIE   1 = key connection state by netns cookie (kernel >= 5.15)
 *                       0 = pod-IP mode: sockets are bound to the pod IP so a
 *                           tuple is unique on the node without a cookie
 *   ISTIO_EBPF_SOCKMAP  1 = add app<->sidecar sockets to the sockhash for sk_msg
 *   MAX_PODS, MAX_CONNS, MAX_PORTS, MAX_CIDRS  map sizes (no silent small caps)
 *   ISTIO_EBPF_COUNTERS number of counters (len(maps.COUNTERS))
 */
#ifndef ISTIO_EBPF_MAPS_H
#define ISTIO_EBPF_MAPS_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <uapi/linux/in6.h>
#include <linux/socket.h>

#ifndef ISTIO_EBPF_COOKIE
#define ISTIO_EBPF_COOKIE 1
#endif
#ifndef ISTIO_EBPF_SOCKMAP
#define ISTIO_EBPF_SOCKMAP 0
#endif
#ifndef MAX_PODS
#define MAX_PODS 16384
#endif
#ifndef MAX_CONNS
#define MAX_CONNS 131072
#endif
#ifndef MAX_PORTS
#define MAX_PORTS 262144
#endif
#ifndef MAX_CIDRS
#define MAX_CIDRS 262144
#endif

/* Istio's fixed ports (istio-iptables defaults). */
#define OUTBOUND_PORT 15001
#define INBOUND_PORT 15006
#define DNS_PROXY_PORT 15053
#define HBONE_PORT 15008
#define DNS_PORT 53
#define SO_ORIGINAL_DST 80      /* also IP6T_SO_ORIGINAL_DST */

#define LOOPBACK4 0x0100007f    /* 127.0.0.1, network order as read on x86 */
#define PASSTHROUGH4 0x0600007f /* 127.0.0.6: Envoy's inbound passthrough source */

/* An address of either family; IPv4 lives in a[0] (network order), rest 0. */
struct ip_addr {
    __u32 family;
    __u32 a[4];
};

/* pod_cfg.flags */
#define POD_INBOUND_ALL     (1u << 0)   /* -b '*': capture every inbound port but -d */
#define POD_DNS_CAPTURE     (1u << 1)   /* ISTIO_META_DNS_CAPTURE */
#define POD_OUT_PORT_INCL   (1u << 2)   /* some -q ports exist */

/* Per-pod configuration. Key: the pod's network-namespace cookie (cookie
 * mode) or the id of the pod's cgroup (pod-IP mode, see find_pod()). */
struct pod_cfg {
    __u32 pod_id;       /* small id chosen by userspace; keys the port/CIDR tables */
    __u32 flags;
    __u32 proxy_uid;
    __u32 proxy_gid;
    __u32 ip4;          /* first pod IPv4 (network order), 0 = none */
    __u32 ip6[4];       /* first pod IPv6, all 0 = none */
};
BPF_HASH(pod_by_netns, __u64, struct pod_cfg, MAX_PODS);

/* Pod IP -> pod. sk_lookup has no cookie helper, so inbound finds the pod by
 * the destination address; the connect hooks use it for "is this my own IP". */
struct pod_ip_val {
    __u32 pod_id;
    __u32 flags;
    __u64 netns_cookie;
};
BPF_HASH(pod_by_ip, struct ip_addr, struct pod_ip_val, MAX_PODS * 4);

/* Port lists (Istio's -b -d -q -o), one entry per (pod, list, port). */
#define PORT_IN_INCLUDE  1
#define PORT_IN_EXCLUDE  2
#define PORT_OUT_INCLUDE 3
#define PORT_OUT_EXCLUDE 4
struct port_key {
    __u32 pod_id;
    __u16 kind;
    __u16 port;         /* host order */
};
BPF_HASH(pod_ports, struct port_key, __u8, MAX_PORTS);

/* CIDR lists (Istio's -i and -x): an LPM trie whose key starts with the pod id
 * and the list kind, so one trie serves every pod. iptables checks all
 * exclusions before any inclusion: the programs look up EXCLUDE first. */
#define CIDR_EXCLUDE 1
#define CIDR_INCLUDE 2
struct cidr_key {
    __u32 prefixlen;    /* 64 + address prefix */
    __u32 pod_id;
    __u8  kind;
    __u8  family;
    __u16 pad;
    __u8  addr[16];
};
BPF_F_TABLE("lpm_trie", struct cidr_key, __u8, pod_cidrs, MAX_CIDRS, BPF_F_NO_PREALLOC);

/* Original destination of a redirected connection. */
struct origin {
    struct ip_addr ip;
    __u16 port;         /* host order */
    __u16 listener;     /* 15001 or 15006: where it was sent */
};

/* connect4/6 -> sockops: keyed by the app socket's cookie (the source port is
 * not chosen yet at connect time). */
BPF_TABLE("lru_hash", __u64, struct origin, origin_by_cookie, MAX_CONNS);

/* sockops -> getsockopt: keyed by the app end of the connection as Envoy sees
 * its peer. In cookie mode the netns cookie separates pods whose tuples are
 * identical (127.0.0.1:P -> 127.0.0.1:15001 in two pods); in pod-IP mode the
 * address is the pod IP and netns is 0. Deleted when the app socket closes;
 * LRU only as a guard against leaks. */
struct conn_key {
    __u64 netns;
    struct ip_addr ip;
    __u32 port;         /* host order */
};
BPF_TABLE("lru_hash", struct conn_key, struct origin, origin_by_tuple, MAX_CONNS);

/* BCC's BPF_SOCKHASH has no lookup() (needed by sk_lookup, 5.9+): the same
 * map declaration with that method added. BCC rewrites a method call into a
 * statement, so call these methods as statements, never inside expressions. */
#define IE_SOCKHASH(_name, _key_type, _max_entries) \
struct _name##_table_t { \
  _key_type key; \
  int leaf; \
  int * (*lookup) (_key_type *); \
  int (*update) (_key_type *, int *); \
  int (*delete) (_key_type *); \
  int (*sock_hash_update) (void *, void *, u64); \
  int (*msg_redirect_hash) (void *, void *, u64); \
  int (*sk_redirect_hash) (void *, void *, u64); \
  u32 max_entries; \
}; \
__attribute__((section("maps/sockhash"))) \
struct _name##_table_t _name = { .max_entries = (_max_entries) }; \
BPF_ANNOTATE_KV_PAIR(_name, _key_type, int)

/* Envoy's inbound listening sockets (15006), keyed by pod IP, for sk_lookup. */
IE_SOCKHASH(inbound_listeners, struct ip_addr, MAX_PODS * 4);

/* UDP DNS redirected to 15053: original server per socket, for recvmsg. */
BPF_TABLE("lru_hash", __u64, struct origin, dns_origin, MAX_CONNS);

/* What a captured TCP socket's owner must see (sockname.c), keyed by the app
 * socket's cookie, written by the connect hooks: getpeername() names the
 * original destination, getsockname() the address the kernel would have
 * chosen for it (the pod IP) as under iptables REDIRECT. local.family 0 =
 * leave the local address alone (loopback destinations). Dropped with the
 * socket (sock_release), LRU as a guard. */
struct app_view {
    struct origin peer;
    struct ip_addr local;
};
BPF_TABLE("lru_hash", __u64, struct app_view, app_view, MAX_CONNS);

#if ISTIO_EBPF_SOCKMAP
/* app <-> sidecar sockets of one node, keyed by their own 4-tuple (+netns). */
struct sock_key {
    __u64 netns;
    struct ip_addr local;
    struct ip_addr remote;
    __u32 local_port;   /* host order */
    __u32 remote_port;  /* host order */
};
IE_SOCKHASH(accel_socks, struct sock_key, MAX_CONNS);
#endif

/* Counters read by the agent's /metrics and by the tests. */
enum counter {
    C_OUT_REDIRECT = 0,     /* app connection sent to 15001 */
    C_IN_REDIRECT_LOCAL,    /* proxy connection to a local address sent to 15006 */
    C_INBOUND_ASSIGN,       /* sk_lookup steered to the 15006 listener */
    C_INBOUND_NO_LISTENER,  /* captured inbound port but no listener: dropped */
    C_DNS_REDIRECT,         /* DNS sent to 15053 */
    C_ORIGDST_HIT,          /* SO_ORIGINAL_DST answered */
    C_ORIGDST_MISS,         /* SO_ORIGINAL_DST on 15001/15006 without entry */
    C_TUPLE_STORED,         /* origin moved from cookie to tuple */
    C_PODIP_BIND_FAIL,      /* pod-IP mode could not bind: connection refused */
    C_SOCKMAP_INSERT,
    C_SOCKMAP_MSGS,
    C_SOCKMAP_BYTES,
    C_RAW_SOCKET_DENIED,    /* raw TCP socket refused to a non-proxy UID */
    C_APP_VIEW_RESTORED,    /* getpeername/getsockname answered as under iptables */
    C_MAX,
};
/* The loader passes len(maps.COUNTERS): a counter added on one side only fails the build. */
#ifndef ISTIO_EBPF_COUNTERS
#define ISTIO_EBPF_COUNTERS C_MAX
#endif
_Static_assert(ISTIO_EBPF_COUNTERS == C_MAX, "maps.COUNTERS and enum counter differ");
BPF_ARRAY(counters, __u64, ISTIO_EBPF_COUNTERS);

static __always_inline void count(__u32 idx, __u64 n)
{
    __u64 *v = counters.lookup(&idx);
    if (v)
        __sync_fetch_and_add(v, n);
}

/* ---- small helpers shared by the programs ---- */

/* An IPv6 address as an ip_addr. IPv4-mapped (::ffff:a.b.c.d) becomes IPv4: IPv4 traffic on an
 * IPv6 socket is decided and keyed as IPv4 (Envoy's IPv4 listener sees an IPv4 peer). 1 if mapped. */
static __always_inline int ip_from6(struct ip_addr *ip, __u32 a0, __u32 a1, __u32 a2, __u32 a3)
{
    if (a0 == 0 && a1 == 0 && a2 == bpf_htonl(0xffff)) {
        ip->family = AF_INET;
        ip->a[0] = a3;
        return 1;
    }
    ip->family = AF_INET6;
    ip->a[0] = a0; ip->a[1] = a1; ip->a[2] = a2; ip->a[3] = a3;
    return 0;
}

/* The reverse, into an IPv6 sock_addr context: IPv4 as ::ffff:a.b.c.d. */
static __always_inline void put6(struct bpf_sock_addr *ctx, const struct ip_addr *ip)
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
    asm volatile("" ::: "memory");
}

static __always_inline int is_loopback4(__u32 ip)
{
    return (ip & 0xff) == 127;      /* 127.0.0.0/8, network order */
}

static __always_inline int is_loopback6(const __u32 *a)
{
    return a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == bpf_htonl(1);
}

static __always_inline int port_listed(__u32 pod_id, __u16 kind, __u16 port)
{
    struct port_key k = {.pod_id = pod_id, .kind = kind, .port = port};
    return pod_ports.lookup(&k) != NULL;
}

static __always_inline int cidr_listed(__u32 pod_id, __u8 kind, const struct ip_addr *ip)
{
    struct cidr_key k = {};
    k.prefixlen = 64 + (ip->family == AF_INET ? 32 : 128);
    k.pod_id = pod_id;
    k.kind = kind;
    k.family = ip->family == AF_INET ? 4 : 6;
    __builtin_memcpy(k.addr, ip->a, 16);
    return pod_cidrs.lookup(&k) != NULL;
}

/* Is ip one of this pod's own addresses (routed through lo, "-o lo")? */
static __always_inline int is_own_ip(__u32 pod_id, const struct ip_addr *ip)
{
    struct pod_ip_val *v = pod_by_ip.lookup((struct ip_addr *)ip);
    return v && v->pod_id == pod_id;
}

/* Istio's ISTIO_INBOUND port rules: -b '*' minus -d, or the -b list; 15008 never. */
static __always_inline int inbound_port_captured(const struct pod_ip_val *pod, __u16 port)
{
    if (port == HBONE_PORT)
        return 0;
    if (pod->flags & POD_INBOUND_ALL)
        return !port_listed(pod->pod_id, PORT_IN_EXCLUDE, port);
    return port_listed(pod->pod_id, PORT_IN_INCLUDE, port);
}

/* A source the pod itself owns: loopback, ::6, or one of its IPs. Such
 * connections were decided on the way out (connect hooks), as iptables
 * decides them in OUTPUT, never on the way in. */
static __always_inline int from_own_pod(__u32 pod_id, const struct ip_addr *remote)
{
    if (remote->family == AF_INET) {
        if (is_loopback4(remote->a[0]))
            return 1;
    } else if ((remote->a[0] | remote->a[1] | remote->a[2]) == 0) {
        return 1;       /* ::1, ::6, :: */
    }
    return is_own_ip(pod_id, remote);
}

#endif /* ISTIO_EBPF_MAPS_H */
