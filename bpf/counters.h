/* counters.h - the counters array (read by the agent's /metrics and by the tests) and count().
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

#endif /* ISTIO_EBPF_COUNTERS_H */
