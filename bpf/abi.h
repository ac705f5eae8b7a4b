/* abi.h - what the programs and userspace share: map key/value structs, flags, list kinds,
 * ports, default map sizes and the counter enum. Nothing else lives here (no maps, no code).
 *
 * The Python side mirrors it (istio_ebpf_plugin/datapath/maps.py: structs, flags, kinds,
 * counters, map sizes; podconfig.py: ports) under the SAME names. Every build appends a block
 * of _Static_asserts generated from the Python side (datapath/abi_check.py): the offset and
 * size of every field by name, every constant's value, every counter's index. A mismatch
 * fails the node's own compile, naming what differs; tests/test_maps_layout.py checks the
 * other direction (BCC's description of every map type against the mirrors, by name).
 *
 * Build switches (set by the loader, datapath/build.py):
 *   ISTIO_EBPF_COOKIE   1 = key connection state by netns cookie (kernel >= 5.15)
 *                       0 = pod-IP mode: sockets are bound to the pod IP so a
 *                           tuple is unique on the node without a cookie
 *   ISTIO_EBPF_SOCKMAP  1 = add app<->sidecar sockets to the sockhash for sk_msg
 *   MAX_PODS, MAX_CONNS, MAX_PORTS, MAX_CIDRS  map sizes (defaults below)
 *   ISTIO_EBPF_COUNTERS number of counters (len(maps.COUNTERS))
 *   ISTIO_EBPF_VARIANT  0 = the normal build; N > 0 appends N words to pod_cfg (a CONFIG map
 *                       value layout change: the upgrade tests build N and N+1 apart with it)
 *   IE_STATE_DIR        bpffs directory of the shared connection-STATE maps (maps_conn.h);
 *                       unset = unpinned (probes, layout tests)
 */
#ifndef ISTIO_EBPF_ABI_H
#define ISTIO_EBPF_ABI_H

#include <linux/types.h>

#ifndef ISTIO_EBPF_COOKIE
#define ISTIO_EBPF_COOKIE 1
#endif
#ifndef ISTIO_EBPF_SOCKMAP
#define ISTIO_EBPF_SOCKMAP 0
#endif
#ifndef ISTIO_EBPF_VARIANT
#define ISTIO_EBPF_VARIANT 0
#endif

/* The layout of the connection-STATE maps (maps_conn.h: which maps, their key and value
 * structs below: ip_addr, origin, conn_key, app_view). Every build with the same state layout,
 * mode and map sizes shares ONE set of state maps (build.state_dir_name), so a datapath
 * upgrade keeps every live connection's answers. Bump it (and build.STATE_LAYOUT_VERSION,
 * tests/test_state_layout.py's record) whenever one of them changes: such an upgrade starts
 * with empty state. */
#define STATE_LAYOUT_VERSION 1

/* Default map sizes (maps.DEFAULT_MAP_SIZES): sized for real nodes, never silently small. */
#define DEFAULT_MAX_PODS  16384
#define DEFAULT_MAX_CONNS 131072
#define DEFAULT_MAX_PORTS 262144
#define DEFAULT_MAX_CIDRS 262144
#ifndef MAX_PODS
#define MAX_PODS DEFAULT_MAX_PODS
#endif
#ifndef MAX_CONNS
#define MAX_CONNS DEFAULT_MAX_CONNS
#endif
#ifndef MAX_PORTS
#define MAX_PORTS DEFAULT_MAX_PORTS
#endif
#ifndef MAX_CIDRS
#define MAX_CIDRS DEFAULT_MAX_CIDRS
#endif

/* Istio's fixed ports (istio-iptables defaults; podconfig.py). */
#define OUTBOUND_PORT   15001   /* -p: Envoy's outbound listener */
#define INBOUND_PORT    15006   /* -z: Envoy's inbound listener */
#define DNS_PROXY_PORT  15053   /* the Istio agent's DNS proxy */
#define HBONE_PORT      15008   /* never captured, either way */
#define DNS_PORT        53      /* what DNS capture matches */
#define SO_ORIGINAL_DST 80      /* SOL_IP optname; IP6T_SO_ORIGINAL_DST (SOL_IPV6) is the same */

/* 127.0.0.6, Envoy's inbound passthrough source: network order as read on this host (x86). */
#define INBOUND_PASSTHROUGH_SRC 0x0600007f

/* An address of either family; IPv4 lives in a[0] (network order), rest 0. */
struct ip_addr {
    __u32 family;
    __u32 a[4];
};

/* pod_cfg.flags and pod_ip_val.flags */
#define POD_INBOUND_ALL     (1u << 0)   /* -b '*': capture every inbound port but -d */
#define POD_DNS_CAPTURE     (1u << 1)   /* ISTIO_META_DNS_CAPTURE */
#define POD_OUT_PORT_INCL   (1u << 2)   /* some -q ports exist */
#define POD_INIT_BYPASS     (1u << 3)   /* istio-ebpf.io/init-containers: bypass (init_bypass map) */

/* Per-pod configuration (pod_by_netns). Key: the pod's network-namespace cookie (cookie
 * mode) or the id of the pod's cgroup (pod-IP mode, see pod_lookup.h find_pod()). */
struct pod_cfg {
    __u32 pod_id;       /* small id chosen by userspace; keys the port/CIDR tables */
    __u32 flags;
    __u32 proxy_uid;
    __u32 proxy_gid;
    __u32 ip4;          /* first pod IPv4 (network order), 0 = none */
    __u32 ip6[4];       /* first pod IPv6, all 0 = none */
#if ISTIO_EBPF_VARIANT
    __u32 variant[ISTIO_EBPF_VARIANT];   /* build variant: maps.PodCfg mirrors it */
#endif
};

/* Pod IP -> pod (pod_by_ip). */
struct pod_ip_val {
    __u32 pod_id;
    __u32 flags;
    __u64 netns_cookie;
};

/* Port lists (Istio's -b -d -q -o), one pod_ports entry per (pod, list, port). */
#define PORT_IN_INCLUDE  1
#define PORT_IN_EXCLUDE  2
#define PORT_OUT_INCLUDE 3
#define PORT_OUT_EXCLUDE 4
struct port_key {
    __u32 pod_id;
    __u16 kind;         /* PORT_* */
    __u16 port;         /* host order */
};

/* CIDR lists (Istio's -i and -x): an LPM trie key that starts with the pod id and the list
 * kind, so one trie serves every pod. */
#define CIDR_EXCLUDE 1
#define CIDR_INCLUDE 2
struct cidr_key {
    __u32 prefixlen;    /* 64 + address prefix */
    __u32 pod_id;
    __u8  kind;         /* CIDR_* */
    __u8  family;       /* 4 or 6 */
    __u16 pad;
    __u8  addr[16];
};

/* Original destination of a redirected connection. */
struct origin {
    struct ip_addr ip;
    __u16 port;         /* host order */
    __u16 listener;     /* the local port of the socket that asks SO_ORIGINAL_DST */
};

/* conn_key.kind: which end of which connection the key names. Both kinds live in one
 * map; the kind keeps them apart where the tuples coincide (pod-IP mode, netns 0: an app
 * socket and Envoy's upstream socket of the same pod may share ip:port, and the peer
 * pod's inbound entry is keyed by that same ip:port). */
#define CONN_REDIRECTED 1   /* connect hooks sent it to a loopback listener; key = the app end */
#define CONN_INBOUND    2   /* sk_lookup handed it to 15006; key = the remote client end */

/* origin_by_tuple key: a connection's far end as the socket that asks SO_ORIGINAL_DST sees
 * its peer. In cookie mode the netns cookie separates pods whose tuples are identical
 * (127.0.0.1:P -> 127.0.0.1:15001 in two pods); in pod-IP mode the address is the pod IP
 * and netns is 0. */
struct conn_key {
    __u64 netns;
    struct ip_addr ip;
    __u16 port;         /* host order */
    __u8  kind;         /* CONN_* */
    __u8  pad;
};

/* What a captured TCP socket's owner must see (app_view, sockname.c). local.family 0 =
 * leave the local address alone (loopback destinations). */
struct app_view {
    struct origin peer;
    struct ip_addr local;
};

/* accel_socks key (sockmap builds): app <-> sidecar sockets by their own 4-tuple (+netns). */
struct sock_key {
    __u64 netns;
    struct ip_addr local;
    struct ip_addr remote;
    __u32 local_port;   /* host order */
    __u32 remote_port;  /* host order */
};

/* Counters (the counters array; maps.COUNTERS names them in this order, "C_" + upper case). */
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
    C_INIT_BYPASS,          /* an app init container's connection or DNS query left uncaptured */
    C_MAX,
};

#endif /* ISTIO_EBPF_ABI_H */
