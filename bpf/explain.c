/* explain.c - `istio-ebpf explain`: one question about a pod's connection, answered by the
 * very functions the hooks decide with (outbound_policy.h, pod_lookup.h), over the same maps.
 *
 * Never attached. Userspace runs it with BPF_PROG_TEST_RUN (datapath/explain.py): a sched_cls
 * program, because that program type has a test run on every kernel this project supports
 * (4.12+) and may use every map kind the decision reads (hash, LPM trie, sockhash look-up with
 * bpf_sk_release). The question (struct explain_req) sits in the test packet at
 * EXPLAIN_REQ_OFFSET, the answer (struct explain_ans) is written right after it and comes back
 * in the output packet: concurrent questions never share state, and nothing is counted.
 *
 * What it does not see: the asking socket itself. A pod-IP-mode socket already bound to a
 * port elsewhere is refused at connect (podip_bind_fail), whatever the rule says.
 */
#include "abi.h"
#include "addr.h"
#include "maps_conn.h"
#include "outbound_policy.h"
#include "pod_lookup.h"

#ifndef TC_ACT_OK
#define TC_ACT_OK 0
#endif

/* connect4/connect6: the flow the hook builds from its context (IPv4-mapped is IPv4; the
 * passthrough source counts only in its own family). */
static __always_inline void explain_outbound(const struct pod_cfg *cfg, const struct explain_req *req,
                                             struct explain_ans *ans)
{
    struct flow f = {};
    if (req->peer.family == AF_INET)
        ip_set4(&f.dst, req->peer.a[0]);
    else
        ip_from6(&f.dst, req->peer.a);
    f.dport = req->port;
    f.tcp = req->tcp;
    struct ip_addr src = {};
    if (req->bound.family == AF_INET)
        ip_set4(&src, req->bound.a[0]);
    else if (req->bound.family == AF_INET6)
        ip_from6(&src, req->bound.a);
    f.src_passthrough = src.family == f.dst.family && ip_is_passthrough(&src);
    if (!f.tcp && !udp_decided(cfg, f.dport)) {
        ans->status = EXPLAIN_UDP_IGNORED;
        return;
    }
    int rule = outbound_rule(cfg, &f, req->uid, req->gid);
    int verdict = rule_verdict(rule);
    ans->status = EXPLAIN_DECIDED;
    ans->rule = rule;
    if (verdict == V_PASS || (!f.tcp && verdict != V_DNS))
        return;
    ans->captured = 1;
    ans->orig.ip = f.dst;
    ans->orig.port = f.dport;
    ans->orig.listener = target_port(verdict);
}

/* sk_lookup (and sockops' record of the original destination): a client at req->peer
 * connecting to the pod's address of its family, port req->port. */
static __always_inline void explain_inbound(const struct pod_cfg *cfg, const struct explain_req *req,
                                            struct explain_ans *ans)
{
    struct ip_addr local = {}, remote = {};
    if (req->peer.family == AF_INET)
        ip_set4(&remote, req->peer.a[0]);
    else
        ip_from6(&remote, req->peer.a);    /* a v4-mapped client arrives as IPv4 */
    if (!(remote.family == AF_INET ? pod_ip4(cfg, &local) : pod_ip6(cfg, &local))) {
        ans->status = EXPLAIN_NO_POD_IP;
        return;
    }
    struct pod_ip_val *pod = NULL;
    int rule = inbound_decision(&local, &remote, req->port, &pod);
    if (rule < 0) {
        ans->status = -rule;
        return;
    }
    ans->status = EXPLAIN_DECIDED;
    ans->rule = rule;
    if (!inbound_rule_captures(rule))
        return;
    ans->captured = 1;
    ans->orig.ip = local;
    ans->orig.port = req->port;
    ans->orig.listener = INBOUND_PORT;
    struct bpf_sock *sk = (struct bpf_sock *)inbound_listeners.lookup(&local);
    if (sk) {
        ans->listener_ready = 1;
        bpf_sk_release(sk);
    }
}

int ie_explain(struct __sk_buff *skb)
{
    struct explain_req req = {};
    struct explain_ans ans = {};
    if (bpf_skb_load_bytes(skb, EXPLAIN_REQ_OFFSET, &req, sizeof(req)) < 0)
        return TC_ACT_OK;
    __u64 key = req.pod;
    struct pod_cfg *cfg = pod_by_netns.lookup(&key);
    if (!cfg)
        ans.status = EXPLAIN_NO_POD;
    else if (req.direction == EXPLAIN_INBOUND)
        explain_inbound(cfg, &req, &ans);
    else
        explain_outbound(cfg, &req, &ans);
    ans.ran = 1;
    bpf_skb_store_bytes(skb, EXPLAIN_REQ_OFFSET + sizeof(req), &ans, sizeof(ans), 0);
    return TC_ACT_OK;
}
