"""What each kernel of the matrix must show, and when each probed feature arrived upstream.

The VM tests check the real kernels against this; the unit tests use FEATURE_SINCE to show what
the rule and the probes do on kernels Debian's registry no longer serves (< 5.7, 5.7/5.8).
"""

from __future__ import annotations

#: probe name -> first upstream release that passes it (helper or program type introduced)
FEATURE_SINCE: dict[str, tuple[int, int]] = {
    "cgroup_sock_addr_bind": (4, 17),              # bpf_bind in cgroup/connect
    "sk_msg_redirect": (4, 17),                    # sk_msg + msg_redirect_hash
    "sockops_sockhash": (4, 18),                   # BPF_MAP_TYPE_SOCKHASH
    "getsockopt_prog": (5, 3),                     # BPF_PROG_TYPE_CGROUP_SOCKOPT
    "cgroup_sock_addr_netns_cookie": (5, 7),       # bpf_get_netns_cookie in sock_addr
    "cgroup_sock_addr_ancestor_cgroup": (5, 7),    # bpf_get_current_ancestor_cgroup_id in sock_addr
    "cgroup_getpeername": (5, 8),                  # BPF_CGROUP_INET{4,6}_GETPEERNAME
    "cgroup_getsockname": (5, 8),                  # BPF_CGROUP_INET{4,6}_GETSOCKNAME
    "sk_lookup_assign": (5, 9),                    # BPF_PROG_TYPE_SK_LOOKUP + bpf_sk_assign
    "so_netns_cookie": (5, 14),                    # getsockopt(SO_NETNS_COOKIE)
    "sockops_netns_cookie": (5, 15),
    "getsockopt_netns_cookie": (5, 15),
    "sk_msg_netns_cookie": (5, 15),
    "explain_test_run": (4, 12),                   # BPF_PROG_TEST_RUN of sched_cls (explain.c)
}


def features_for(version: tuple[int, int]) -> dict[str, bool]:
    """Probe results a vanilla kernel of ``version`` gives (cgroup v2 and bpffs present)."""
    out = {name: version >= since for name, since in FEATURE_SINCE.items()}
    out.update(cgroup_v2=True, bpffs=True, bcc_compile=True)
    return out


#: matrix kernel -> (version, mode the agent must select)
EXPECTED_MODE: dict[str, tuple[tuple[int, int], str]] = {
    "5.10": ((5, 10), "podip"),
    "6.1": ((6, 1), "cookie"),
    "6.12": ((6, 12), "cookie"),
}

#: Readers the sockmap self-test finds broken behind the sk_msg ingress redirect, per kernel
#: (measured by `make kernel-matrix`): FIONREAD answers 0 with data readable on 5.10 and 6.1
#: (fixed by 6.12); splice(2) returns 0 (EOF) on every kernel tried, 6.18 included.
SOCKMAP_BROKEN_READERS: dict[str, set[str]] = {"5.10": {"fionread", "splice"}, "6.1": {"fionread", "splice"},
                                               "6.12": {"splice"}}

#: What CI runs (`make test`): the pod-IP proof on 5.10 (probe + demo, and the sockmap self-test
#: refusing the FIONREAD bug only older kernels have) and on 6.12 the cookie-mode selection (probe)
#: and explain's answer for every case of the table (explain-rules: no connections; 59 s under TCG
#: with the datapath's compile, quiet machine). Under TCG every BCC compile costs minutes (5.10 probe
#: + demo + selftest: 6.5 min on a quiet machine); `explain` with connections took 7 min on 6.12, so it
#: and the full steps on every kernel are `make kernel-matrix`.
CI_MATRIX: dict[str, tuple[str, ...]] = {"5.10": ("probe", "demo", "selftest"), "6.12": ("probe", "explain-rules")}
