/* counters.h - the node's counters array and count(), the per-pod counters and pod_count() (read by
 * the agent's /metrics and /pods, and by the tests).
 *
 * One u64 per enum counter (abi.h); userspace names them with maps.COUNTERS, in order. The
 * loader sizes the array from len(maps.COUNTERS), and the generated ABI check asserts every
 * name's index, so a counter added, removed or moved on one side only fails the build.
 */
#ifndef ISTIO_EBPF_COUNTERS_H
#define ISTIO_EBPF_COUNTERS_H

#include <uapi/linux/bpf.h>

#include "abi.h"

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

/* Per-pod counters (enum pod_counter), indexed by the pod's small pod_id (pod_cfg, pod_ip_val):
 * one array lookup, no hash. Like pod_id, they belong to one datapath version (a CONFIG-side
 * map); userspace zeroes a pod's slot when it assigns the pod_id. Slot 0 is never a pod's: what
 * cannot be told apart (e.g. a miss whose asker has no pod address, getsockopt.c) lands there. */
BPF_ARRAY(pod_counters, struct pod_counters, MAX_PODS + 1);

/* What a pod counted under the versions before this one (an upgrade carries it, by pod id):
 * written by userspace only, never by a program; a pod's totals are base + pod_counters. */
BPF_F_TABLE("hash", __u32, struct pod_counters, pod_counter_base, MAX_PODS, BPF_F_NO_PREALLOC);

#ifndef ISTIO_EBPF_POD_COUNTERS
#define ISTIO_EBPF_POD_COUNTERS 1   /* 0: the benchmark's baseline, nothing counted per pod */
#endif

static __always_inline void pod_count(__u32 pod_id, __u32 idx)
{
#if ISTIO_EBPF_POD_COUNTERS
    struct pod_counters *pc = pod_counters.lookup(&pod_id);
    if (pc && idx < PC_MAX)
        __sync_fetch_and_add(&pc->c[idx], 1);
#endif
}

#endif /* ISTIO_EBPF_COUNTERS_H */
