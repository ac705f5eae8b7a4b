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

/* Per-pod counters: one struct pod_counters per pod id in the pod_counters array (counters.h);
 * maps.POD_COUNTERS names them in this order, "PC_" + upper case. The RULES come first: each is
 * one rule of Istio's chains, the one that decided a connection, as outbound_rule()
 * (outbound_policy.h) and inbound_rule() (pod_lookup.h) return it, counted once per decision
 * (outbound: per connect(), or per DNS datagram; inbound: per SYN). Then events.
 * Append only: an upgrade carries a pod's totals to the next version by index. */
enum pod_counter {
    /* ISTIO_OUTPUT, in chain order */
    PC_OUT_PASS_EXCLUDED_PORT = 0,  /* -o P (or the status port): --dport P -j RETURN */
    PC_OUT_PASS_PASSTHROUGH_SRC,    /* -o lo -s 127.0.0.6 -j RETURN */
    PC_OUT_CAPTURED_PROXY_UID_LOCAL,/* -o lo ! -d 127.0.0.1 -p tcp --uid-owner PROXY -j ISTIO_IN_REDIRECT */
    PC_OUT_PASS_LOCAL_UID,          /* -o lo -m owner ! --uid-owner PROXY -j RETURN */
    PC_OUT_PASS_PROXY_UID,          /* -m owner --uid-owner PROXY -j RETURN */
    PC_OUT_CAPTURED_PROXY_GID_LOCAL,/* the same three rules for --gid-owner */
    PC_OUT_PASS_LOCAL_GID,
    PC_OUT_PASS_PROXY_GID,
    PC_OUT_DNS,                     /* --dport 53 -j REDIRECT --to-ports 15053 (DNS capture) */
    PC_OUT_PASS_NOT_TCP,            /* ISTIO_REDIRECT matches -p tcp only */
    PC_OUT_PASS_LOOPBACK,           /* -d 127.0.0.1/32 -j RETURN */
    PC_OUT_PASS_EXCLUDED_CIDR,      /* -x: -d CIDR -j RETURN */
    PC_OUT_CAPTURED_PORT,           /* -q: -p tcp --dport P -j ISTIO_REDIRECT */
    PC_OUT_CAPTURED_CIDR,           /* -i: -d CIDR -j ISTIO_REDIRECT */
    PC_OUT_PASS_NOT_INCLUDED,       /* the end of ISTIO_OUTPUT: in no -i CIDR, no -q port */
    /* ISTIO_INBOUND */
    PC_IN_PASS_HBONE,               /* -p tcp --dport 15008 -j RETURN */
    PC_IN_PASS_EXCLUDED_PORT,       /* -b '*' -d P: --dport P -j RETURN */
    PC_IN_CAPTURED_ALL_PORTS,       /* -b '*': -p tcp -j ISTIO_IN_REDIRECT */
    PC_IN_CAPTURED_PORT,            /* -b P: --dport P -j ISTIO_IN_REDIRECT */
    PC_IN_PASS_NOT_INCLUDED,        /* -b list without P (or empty): no rule matches */
    /* events */
    PC_IN_NO_LISTENER,              /* captured inbound SYN dropped: no Envoy listening */
    PC_ORIGDST_HIT,                 /* SO_ORIGINAL_DST answered (asked by the pod's Envoy) */
    PC_ORIGDST_MISS,                /* SO_ORIGINAL_DST on 15001/15006 without an entry: EPERM */
    PC_RAW_SOCKET_DENIED,           /* raw TCP socket refused to a non-proxy UID */
    PC_PODIP_BIND_FAIL,             /* pod-IP mode could not bind a captured socket: refused */
    PC_MAX,
};

struct pod_counters {
    __u64 c[PC_MAX];
};

/* explain (explain.c, run by userspace with BPF_PROG_TEST_RUN, never attached): one question
 * about a pod, answered by the same functions the hooks decide with. The request sits at
 * EXPLAIN_REQ_OFFSET of the test packet, the answer right after it. */
#define EXPLAIN_REQ_OFFSET  14      /* after an Ethernet header's worth of bytes */
#define EXPLAIN_OUTBOUND    1       /* a connect() (TCP) or an unconnected sendmsg() (UDP) */
#define EXPLAIN_INBOUND     2       /* a TCP connection to the pod's IP from another address */
struct explain_req {
    __u64 pod;              /* the pod's pod_by_netns key */
    struct ip_addr peer;    /* outbound: the destination; inbound: the client (IPv6 words may be v4-mapped) */
    struct ip_addr bound;   /* outbound: the socket's bound address, family 0 = unbound */
    __u32 uid;
    __u32 gid;
    __u16 port;             /* outbound: destination port; inbound: the pod's port */
    __u8  direction;        /* EXPLAIN_OUTBOUND / EXPLAIN_INBOUND */
    __u8  tcp;              /* 1 = TCP, 0 = UDP */
};

/* explain_ans.status: whether a rule decided (the others: nothing of ours decides it). */
#define EXPLAIN_DECIDED     1       /* rule holds the deciding rule (a pod counter) */
#define EXPLAIN_NO_POD      2       /* no such pod in pod_by_netns */
#define EXPLAIN_NO_POD_IP   3       /* inbound: the pod has no address of the client's family */
#define EXPLAIN_OWN_POD     4       /* inbound from the pod itself: decided on the way out */
#define EXPLAIN_UDP_IGNORED 5       /* UDP other than DNS of a pod with DNS capture: no hook decides */
struct explain_ans {
    __u32 status;           /* EXPLAIN_* */
    __u32 rule;             /* PC_* of the deciding rule (EXPLAIN_DECIDED) */
    struct origin orig;     /* captured: SO_ORIGINAL_DST's answer, orig.listener = the port it goes to */
    __u8  captured;         /* 1 = sent to orig.listener */
    __u8  listener_ready;   /* inbound captured: Envoy's listening socket is registered */
    __u16 pad;
    __u32 ran;              /* 1: the program wrote this answer */
};

#endif /* ISTIO_EBPF_ABI_H */
