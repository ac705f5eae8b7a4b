/* maps_pod.h - the per-pod CONFIGURATION maps: written by userspace only (datapath/
 * pod_entries.py, from a PodConfig encoded by maps.py), read by every program. They belong
 * to one datapath version and are rebuilt from the pod list when a new version loads.
 * Lookups over them live in pod_lookup.h.
 */
#ifndef ISTIO_EBPF_MAPS_POD_H
#define ISTIO_EBPF_MAPS_POD_H

#include <uapi/linux/bpf.h>

#include "abi.h"

/* The pod a hook runs for: netns cookie (cookie mode) or pod cgroup id (pod-IP mode). */
BPF_HASH(pod_by_netns, __u64, struct pod_cfg, MAX_PODS);

/* Pod IP -> pod. sk_lookup has no cookie helper, so inbound finds the pod by the
 * destination address; the connect hooks use it for "is this my own IP". */
BPF_HASH(pod_by_ip, struct ip_addr, struct pod_ip_val, MAX_PODS * 4);

/* Port lists (Istio's -b -d -q -o): one entry per (pod, list, port). */
BPF_HASH(pod_ports, struct port_key, __u8, MAX_PORTS);

/* CIDR lists (Istio's -i and -x), one LPM trie for every pod. */
BPF_F_TABLE("lpm_trie", struct cidr_key, __u8, pod_cidrs, MAX_CIDRS, BPF_F_NO_PREALLOC);

/* Pods with POD_INIT_BYPASS: the cgroup id of each of their app init containers (as the agent
 * identified them) -> the pod's id. A process there connects as if the pod were not meshed. */
BPF_HASH(init_bypass, __u64, __u32, MAX_PODS * 4);

#endif /* ISTIO_EBPF_MAPS_POD_H */
