/* sk_msg.c - sk_msg on accel_socks: optional sockmap acceleration.
 *
 * Data an app writes to its sidecar (or the sidecar to its app) is put
 * straight on the peer socket's receive queue, skipping the loopback TCP
 * stack. Only sockets sockops inserted (captured app<->Envoy connections and
 * Envoy's 127.0.0.6 passthrough to the app) are in the map; anything else
 * passes through untouched.
 */
#include "abi.h"
#include "addr.h"
#include "counters.h"
#include "maps_conn.h"

#if ISTIO_EBPF_SOCKMAP
int ie_accel(struct sk_msg_md *msg)
{
    struct sock_key peer = {};
#if ISTIO_EBPF_COOKIE
    peer.netns = bpf_get_netns_cookie(msg);
#endif
    /* The peer's own key is our tuple reversed (both ends of a connection are
     * IPv4-mapped or neither is). */
    ops_remote(msg, &peer.local);
    ops_local(msg, &peer.remote);
    peer.local_port = bpf_ntohl(msg->remote_port);
    peer.remote_port = msg->local_port;
    __u64 size = msg->size;
    int verdict = accel_socks.msg_redirect_hash(msg, &peer, BPF_F_INGRESS);
    if (verdict == SK_PASS) {
        count(C_SOCKMAP_MSGS, 1);
        count(C_SOCKMAP_BYTES, size);
    }
    return SK_PASS;
}
#endif
