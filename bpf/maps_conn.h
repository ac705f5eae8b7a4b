/* maps_conn.h - the per-CONNECTION STATE maps: written by the programs as connections come
 * and go (userspace only reads them, and writes inbound_listeners in pod-IP mode). A live
 * connection's SO_ORIGINAL_DST answer, its app view and its inbound listener live here, so
 * these maps are what a datapath upgrade must carry over; nothing here depends on a pod's
 * configuration or on maps_pod.h.
 *
 * Every build pins them in IE_STATE_DIR (named after STATE_LAYOUT_VERSION, the mode and the
 * map sizes by the loader): BCC opens the pins when they exist and creates them otherwise,
 * so version N+1 reads and writes the very maps version N's connections live in.
 */
#ifndef ISTIO_EBPF_MAPS_CONN_H
#define ISTIO_EBPF_MAPS_CONN_H

#include <uapi/linux/bpf.h>

#include "abi.h"

/* A state map: pinned in IE_STATE_DIR, shared by every build of the same state layout. */
#ifdef IE_STATE_DIR
#define IE_STATE_SECTION(_type, _name) "maps/" _type ":" IE_STATE_DIR "/" #_name
#define IE_STATE_TABLE(_type, _key, _leaf, _name, _max) \
    BPF_TABLE_PINNED(_type, _key, _leaf, _name, _max, IE_STATE_DIR "/" #_name)
#else
#define IE_STATE_SECTION(_type, _name) "maps/" _type
#define IE_STATE_TABLE(_type, _key, _leaf, _name, _max) BPF_TABLE(_type, _key, _leaf, _name, _max)
#endif

/* BCC's BPF_SOCKHASH has no lookup() (needed by sk_lookup, 5.9+): the same map declaration
 * with that method added. BCC rewrites a method call into a statement, so call these
 * methods as statements, never inside expressions. */
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
__attribute__((section(IE_STATE_SECTION("sockhash", _name)))) \
struct _name##_table_t _name = { .max_entries = (_max_entries) }; \
BPF_ANNOTATE_KV_PAIR(_name, _key_type, int)

/* connect4/6 -> sockops: the original destination by the app socket's cookie (the source
 * port is not chosen yet at connect time). Dropped at ACTIVE_ESTABLISHED or sock_release. */
IE_STATE_TABLE("lru_hash", __u64, struct origin, origin_by_cookie, MAX_CONNS);

/* sockops -> getsockopt: the original destination by the connection's far end as the
 * asking socket sees its peer (struct conn_key, abi.h). Deleted by the socket that wrote
 * it when it closes (sockops STATE_CB); LRU only as a guard against leaks. */
IE_STATE_TABLE("lru_hash", struct conn_key, struct origin, origin_by_tuple, MAX_CONNS);

/* UDP DNS redirected to 15053: the original server per socket, for recvmsg/getpeername. */
IE_STATE_TABLE("lru_hash", __u64, struct origin, dns_origin, MAX_CONNS);

/* What a captured TCP socket's owner must see (sockname.c), by the app socket's cookie,
 * written by the connect hooks, dropped with the socket (sock_release), LRU as a guard. */
IE_STATE_TABLE("lru_hash", __u64, struct app_view, app_view, MAX_CONNS);

/* Envoy's inbound listening sockets (15006), keyed by pod IP, for sk_lookup. */
IE_SOCKHASH(inbound_listeners, struct ip_addr, MAX_PODS * 4);

#if ISTIO_EBPF_SOCKMAP
/* app <-> sidecar sockets of one node, keyed by their own 4-tuple (+netns), for sk_msg. */
IE_SOCKHASH(accel_socks, struct sock_key, MAX_CONNS);
#endif

#endif /* ISTIO_EBPF_MAPS_CONN_H */
