/* sk_msg.c - sk_msg on accel_socks: optional sockmap acceleration.
 *
 * Data an app writes to its sidecar (or the sidecar to its app) is put
 * straight on the peer socket's receive queue, skipping the loopback TCP
 * stack. Only sockets sockops inserted (captured app<->Envoy connections and
 * Envoy's 127.0.0.6 passthrough to the app) are in the map; anything else
 * passes through untouched.
 */
#include "istio_ebpf_maps.h"

#if ISTIO_EBPF_SOCKMAP
int ie_accel(struct sk_msg_md *msg)
{
    struct sock_key peer = {};
#if ISTIO_EBPF_COOKIE
    peer.netns = bpf_get_netns_cookie(msg);
#endif
    /* The peer's own key is our tuple reversed. */
    if (msg->family == AF_INET) {
        peer.local.family = AF_INET;
        peer.local.a[0] = msg->remote_ip4;
        peer.remote.family = AF_INET;
        peer.remote.a[0] = msg->local_ip4;
    } else {
        __u32 r0 = msg->remote_ip6[0], r1 = msg->remote_ip6[1], r2 = msg->remote_ip6[2], r3 = msg->remote_ip6[3];
        __u32 l0 = msg->local_ip6[0], l1 = msg->local_ip6[1], l2 = msg->local_ip6[2], l3 = msg->local_ip6[3];
        /* both ends of a connection are IPv4-mapped or neither is */
        ip_from6(&peer.local, r0, r1, r2, r3);
        ip_from6(&peer.remote, l0, l1, l2, l3);
    }
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
