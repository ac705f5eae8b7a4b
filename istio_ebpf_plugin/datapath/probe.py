"""Feature probes: load tiny programs instead of trusting version numbers.

Each probe compiles (once, one BCC module) and loads a minimal program that
uses exactly the helper or program type a mode depends on. Loading runs the
verifier, so a kernel that lacks the helper (or a distribution that backported
it) answers for itself. Nothing is attached.

``select_mode`` combines the version rule of :mod:`istio_ebpf_plugin.kernel`
with the probe results: a node only gets a mode whose every probe passed;
otherwise it is ``unsupported`` and keeps iptables.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket

from ..errors import KernelError, UsageError
from ..kernel import mode_for_release, validate_mode
from . import host, libbpf

log = logging.getLogger(__name__)

# name -> (function, program type, expected attach type or -1)
_PROBES: dict[str, tuple[str, int, int]] = {
    "cgroup_sock_addr_netns_cookie": ("p_connect_cookie", libbpf.PROG_CGROUP_SOCK_ADDR, libbpf.CGROUP_INET4_CONNECT),
    "cgroup_sock_addr_bind": ("p_connect_bind", libbpf.PROG_CGROUP_SOCK_ADDR, libbpf.CGROUP_INET4_CONNECT),
    "cgroup_sock_addr_ancestor_cgroup": ("p_connect_ancestor", libbpf.PROG_CGROUP_SOCK_ADDR,
                                         libbpf.CGROUP_INET4_CONNECT),
    "sockops_netns_cookie": ("p_sockops_cookie", libbpf.PROG_SOCK_OPS, -1),
    "sockops_sockhash": ("p_sockops_hash", libbpf.PROG_SOCK_OPS, -1),
    "getsockopt_prog": ("p_getsockopt", libbpf.PROG_CGROUP_SOCKOPT, libbpf.CGROUP_GETSOCKOPT),
    "cgroup_getpeername": ("p_getpeername", libbpf.PROG_CGROUP_SOCK_ADDR, libbpf.CGROUP_INET4_GETPEERNAME),
    "cgroup_getsockname": ("p_getsockname", libbpf.PROG_CGROUP_SOCK_ADDR, libbpf.CGROUP_INET6_GETSOCKNAME),
    "getsockopt_netns_cookie": ("p_getsockopt_cookie", libbpf.PROG_CGROUP_SOCKOPT, libbpf.CGROUP_GETSOCKOPT),
    "sk_lookup_assign": ("p_sk_lookup", libbpf.PROG_SK_LOOKUP, libbpf.SK_LOOKUP),
    "sk_msg_redirect": ("p_sk_msg", libbpf.PROG_SK_MSG, -1),
    "sk_msg_netns_cookie": ("p_sk_msg_cookie", libbpf.PROG_SK_MSG, -1),
}

_SOURCE = r"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
BPF_SOCKHASH(p_hash, u32, 4);
int p_connect_cookie(struct bpf_sock_addr *ctx) { return bpf_get_netns_cookie(ctx) != 0; }
int p_connect_bind(struct bpf_sock_addr *ctx) {
    struct sockaddr_in sa = {}; sa.sin_family = AF_INET;
    bpf_bind(ctx, (struct sockaddr *)&sa, sizeof(sa)); return 1; }
int p_connect_ancestor(struct bpf_sock_addr *ctx) { return bpf_get_current_ancestor_cgroup_id(1) != 0; }
int p_sockops_cookie(struct bpf_sock_ops *s) { return bpf_get_netns_cookie(s) != 0; }
int p_sockops_hash(struct bpf_sock_ops *s) { u32 k = 0; p_hash.sock_hash_update(s, &k, BPF_ANY); return 1; }
int p_getsockopt(struct bpf_sockopt *ctx) { return 1; }
int p_getpeername(struct bpf_sock_addr *ctx) { ctx->user_port = bpf_htons(1); return 1; }
int p_getsockname(struct bpf_sock_addr *ctx) { ctx->user_ip6[3] = 1; return 1; }
int p_getsockopt_cookie(struct bpf_sockopt *ctx) { return bpf_get_netns_cookie(ctx) != 0; }
int p_sk_lookup(struct bpf_sk_lookup *ctx) { bpf_sk_assign(ctx, 0, 0); return SK_PASS; }
int p_sk_msg(struct sk_msg_md *msg) { u32 k = 0; p_hash.msg_redirect_hash(msg, &k, BPF_F_INGRESS); return SK_PASS; }
int p_sk_msg_cookie(struct sk_msg_md *msg) { return bpf_get_netns_cookie(msg) != 0 ? SK_PASS : SK_PASS; }
"""

#: What the application must see in either mode: getpeername/getsockname as under iptables (5.8).
APP_VIEW_REQUIREMENTS = ("cgroup_getpeername", "cgroup_getsockname")

#: What each mode needs (besides cgroup v2 and bpffs).
MODE_REQUIREMENTS: dict[str, tuple[str, ...]] = {
    "cookie": ("cgroup_sock_addr_netns_cookie", "cgroup_sock_addr_bind", "sockops_netns_cookie",
               "sockops_sockhash", "getsockopt_prog", "getsockopt_netns_cookie", "sk_lookup_assign",
               "so_netns_cookie", *APP_VIEW_REQUIREMENTS),
    # pod-IP mode keys pods by cgroup id, so it does not need SO_NETNS_COOKIE (5.14)
    "podip": ("cgroup_sock_addr_ancestor_cgroup", "cgroup_sock_addr_bind", "getsockopt_prog",
              "sk_lookup_assign", *APP_VIEW_REQUIREMENTS),
}
SOCKMAP_REQUIREMENTS = {"cookie": ("sk_msg_redirect", "sk_msg_netns_cookie"), "podip": ("sk_msg_redirect",)}

#: Environment variable naming probes to report as failed (fault injection for tests/operators).
FORCE_FAIL_ENV = "ISTIO_EBPF_PROBE_FAIL"


def _so_netns_cookie() -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.getsockopt(socket.SOL_SOCKET, 71, 8)
        return True
    except OSError:
        return False


def cheap_checks() -> dict[str, bool]:
    """What needs no compiler: cgroup v2, bpffs, SO_NETNS_COOKIE (never cached, always fresh)."""
    return {"cgroup_v2": host.cgroup_v2_root() is not None, "bpffs": host.is_bpffs(host.BPFFS_ROOT),
            "so_netns_cookie": _so_netns_cookie()}


def probe_source_fingerprint() -> str:
    """Changes whenever the probe programs do (the probe cache's key includes it)."""
    return hashlib.sha256((_SOURCE + repr(sorted(_PROBES.items()))).encode()).hexdigest()


def probe_programs() -> dict[str, bool]:
    """Compile the probe programs with BCC and load each one, in this process."""
    results: dict[str, bool] = {}
    try:
        from bcc import BPF
        from .headers import find_kernel_headers

        find_kernel_headers()
        module = BPF(text=_SOURCE)
    except Exception:
        results.update({name: False for name in _PROBES})
        results["bcc_compile"] = False
        return results
    results["bcc_compile"] = True
    try:
        for name, (func, prog_type, attach) in _PROBES.items():
            try:
                module.load_func(func.encode(), prog_type, None, attach)
                results[name] = True
            except Exception:
                results[name] = False
    finally:
        module.cleanup()
    return results


def probe_programs_task(_args: dict) -> dict[str, bool]:
    """The compile worker's "probe" task."""
    return probe_programs()


def probe_programs_isolated() -> dict[str, bool]:
    """probe_programs() in a short-lived worker process (LLVM's memory leaves with it)."""
    from . import compile_worker

    if compile_worker.in_process():
        return probe_programs()
    try:
        return dict(compile_worker.run("probe", {}))
    except KernelError as exc:
        log.warning("probe worker failed: %s", exc)
        return {**{name: False for name in _PROBES}, "bcc_compile": False}


def probe_features() -> dict[str, bool]:
    """Probe this kernel. Needs CAP_BPF; a probe that cannot run counts as failed."""
    return apply_forced({**cheap_checks(), **probe_programs_isolated()})


def apply_forced(results: dict[str, bool]) -> dict[str, bool]:
    for name in filter(None, os.environ.get(FORCE_FAIL_ENV, "").split(",")):
        results[name.strip()] = False
    return results


def select_mode(release: str, features: dict[str, bool] | None,
                override: str | None = None) -> tuple[str, str]:
    """(mode, reason). The version rule proposes, the probes confirm, nothing is silently wrong."""
    if override not in (None, "", "auto"):
        validate_mode(override)
    by_version = mode_for_release(release)
    wanted = override if override not in (None, "", "auto") else by_version
    why = f"operator override {wanted}" if wanted != by_version else f"kernel {release} -> {by_version}"
    if wanted == "unsupported":
        return "unsupported", why
    if features is None:
        return wanted, why + " (not probed)"
    for base in ("cgroup_v2", "bpffs"):
        if not features.get(base, False):
            return "unsupported", f"{why}, but {base} is not available: keeping iptables"
    missing = [p for p in MODE_REQUIREMENTS[wanted] if not features.get(p, False)]
    if not missing:
        return wanted, why + ", all probes passed"
    # Cookie mode impossible: pod-IP mode may still be safe on this kernel.
    if wanted == "cookie" and override in (None, "", "auto"):
        podip_missing = [p for p in MODE_REQUIREMENTS["podip"] if not features.get(p, False)]
        if not podip_missing:
            return "podip", f"{why}, but probes failed ({', '.join(missing)}): falling back to podip"
    return "unsupported", f"{why}, but probes failed ({', '.join(missing)}): keeping iptables"


def sockmap_supported(mode: str, features: dict[str, bool]) -> bool:
    return all(features.get(p, False) for p in SOCKMAP_REQUIREMENTS.get(mode, ("never",)))


def parse_mode_arg(value: str) -> str:
    if value not in ("auto", "cookie", "podip", "unsupported"):
        raise UsageError(f"unknown mode {value!r}: choose auto, cookie, podip or unsupported")
    return value
