/* pod_lookup.h - finding a hook's pod and reading its configuration (maps_pod.h). */
#ifndef ISTIO_EBPF_POD_LOOKUP_H
#define ISTIO_EBPF_POD_LOOKUP_H

#include "abi.h"
#include "addr.h"
#include "maps_pod.h"

#ifndef MAX_CGROUP_DEPTH
#define MAX_CGROUP_DEPTH 10
#endif

/* The pod a socket hook (sock_addr, sock) runs for.
 * cookie mode: keyed by the network-namespace cookie.
 * pod-IP mode (kernels 5.9-5.14): userspace cannot read a netns cookie before 5.14
 * (SO_NETNS_COOKIE), so pods are keyed by their cgroup id, found among the current task's
 * cgroup ancestors (a container cgroup, or any child cgroup a process creates, lies below
 * the pod's). */
static __always_inline struct pod_cfg *find_pod(void *ctx)
{
#if ISTIO_EBPF_COOKIE
    __u64 key = bpf_get_netns_cookie(ctx);
    return pod_by_netns.lookup(&key);
#else
    #pragma unroll
    for (int level = 1; level <= MAX_CGROUP_DEPTH; level++) {
        __u64 key = bpf_get_current_ancestor_cgroup_id(level);
        if (key == 0)
            break;
        struct pod_cfg *cfg = pod_by_netns.lookup(&key);
        if (cfg)
            return cfg;
    }
    return NULL;
#endif
}

/* Is the current task one of the pod's app init containers, as the agent identified them
 * (istio-ebpf.io/init-containers: bypass)? Only pods with the flag pay the lookup. The key is
 * the task's own cgroup: a container the agent has not identified (yet), an app container, or
 * a cgroup a process creates below its container's, is not listed, so it is captured. */
static __always_inline int init_bypassed(const struct pod_cfg *cfg)
{
    if (!(cfg->flags & POD_INIT_BYPASS))
        return 0;
    __u64 cgroup = bpf_get_current_cgroup_id();
    __u32 *pod_id = init_bypass.lookup(&cgroup);
    return pod_id && *pod_id == cfg->pod_id;
}

/* The pod's first IPv4 / IPv6 address; 0 if it has none of that family. */
static __always_inline int pod_ip4(const struct pod_cfg *cfg, struct ip_addr *ip)
{
    if (cfg->ip4 == 0)
        return 0;
    ip_set4(ip, cfg->ip4);
    return 1;
}

static __always_inline int pod_ip6(const struct pod_cfg *cfg, struct ip_addr *ip)
{
    if (ip6_is_zero(cfg->ip6))
        return 0;
    ip_set6(ip, cfg->ip6);
    return 1;
}

static __always_inline int port_listed(__u32 pod_id, __u16 kind, __u16 port)
{
    struct port_key k = {.pod_id = pod_id, .kind = kind, .port = port};
    return pod_ports.lookup(&k) != NULL;
}

/* iptables checks all exclusions before any inclusion: callers look up CIDR_EXCLUDE first. */
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

/* Istio's ISTIO_INBOUND port rules: the one that decides port, a pod counter (PC_IN_*):
 * 15008 never; -b '*' minus -d, or the -b list. */
static __always_inline int inbound_rule(const struct pod_ip_val *pod, __u16 port)
{
    if (port == HBONE_PORT)
        return PC_IN_PASS_HBONE;
    if (pod->flags & POD_INBOUND_ALL)
        return port_listed(pod->pod_id, PORT_IN_EXCLUDE, port) ? PC_IN_PASS_EXCLUDED_PORT
                                                                 : PC_IN_CAPTURED_ALL_PORTS;
    return port_listed(pod->pod_id, PORT_IN_INCLUDE, port) ? PC_IN_CAPTURED_PORT : PC_IN_PASS_NOT_INCLUDED;
}

static __always_inline int inbound_rule_captures(int rule)
{
    return rule == PC_IN_CAPTURED_ALL_PORTS || rule == PC_IN_CAPTURED_PORT;
}

static __always_inline int inbound_port_captured(const struct pod_ip_val *pod, __u16 port)
{
    return inbound_rule_captures(inbound_rule(pod, port));
}

/* A source the pod itself owns: 127/8, anything in ::/96 (::1, ::6, ::), or one of its IPs.
 * Such connections were decided on the way out (connect hooks), as iptables decides them in
 * OUTPUT, never on the way in. Wider than the outbound chain's "-o lo" (flow_is_local):
 * no other host can send from these, so none of them is inbound traffic. */
static __always_inline int from_own_pod(__u32 pod_id, const struct ip_addr *remote)
{
    if (ip_is_own_src(remote))
        return 1;
    return is_own_ip(pod_id, remote);
}

/* sk_lookup's decision for a TCP connection from remote to local:port: the ISTIO_INBOUND rule
 * (PC_IN_*, >= 0) and in *found the pod; or -EXPLAIN_NO_POD_IP (local is no pod's address) or
 * -EXPLAIN_OWN_POD (the pod's own connection, decided on the way out as iptables decides it in
 * OUTPUT rather than PREROUTING). */
static __always_inline int inbound_decision(const struct ip_addr *local, const struct ip_addr *remote, __u16 port,
                                            struct pod_ip_val **found)
{
    struct pod_ip_val *pod = pod_by_ip.lookup((struct ip_addr *)local);
    *found = pod;
    if (!pod)
        return -EXPLAIN_NO_POD_IP;
    if (from_own_pod(pod->pod_id, remote))
        return -EXPLAIN_OWN_POD;
    return inbound_rule(pod, port);
}

#endif /* ISTIO_EBPF_POD_LOOKUP_H */
