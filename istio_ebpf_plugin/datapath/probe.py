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

import contextlib
import hashlib
import logging
import os
import socket
import tempfile
from typing import Iterator, Mapping

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
    # `istio-ebpf explain` (datapath/explain.py): a sched_cls program, loaded AND test-run once.
    "explain_test_run": ("p_explain", libbpf.PROG_SCHED_CLS, -1),
}
#: Probes that must also run once with BPF_PROG_TEST_RUN (a 64-byte packet) to pass.
_TEST_RUN = frozenset({"explain_test_run"})

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
int p_explain(struct __sk_buff *skb) { u32 v = 1; bpf_skb_store_bytes(skb, 14, &v, sizeof(v), 0); return 0; }
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
#: A failure's cause goes into the node's reason annotation and logs: one line, at most this long.
MAX_REASON_CHARS = 240


class Features(dict[str, bool]):
    """Probe verdicts (feature -> passed) and, where a failure's cause is known, that cause in one
    line (``reasons["bcc_compile"]``: why BCC could not compile the probe programs)."""

    def __init__(self, verdicts: Mapping[str, bool] | None = None, reasons: Mapping[str, str] | None = None) -> None:
        super().__init__(verdicts or {})
        self.reasons: dict[str, str] = dict(reasons or {})


def reasons_of(features: Mapping[str, bool]) -> dict[str, str]:
    return dict(features.reasons) if isinstance(features, Features) else {}


def one_line(text: str) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line if len(line) <= MAX_REASON_CHARS else line[:MAX_REASON_CHARS - 3] + "..."


@contextlib.contextmanager
def _stderr_copied(into: list[str]) -> Iterator[None]:
    """Copy what the process writes to fd 2 meanwhile (clang's diagnostics) into ``into``; it is
    written to stderr afterwards as well, so logs keep it."""
    with tempfile.TemporaryFile() as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            data = tmp.read()
            if data:
                os.write(2, data)
            into.append(data.decode("utf-8", "replace"))


def compile_failure(exc: BaseException, diagnostics: str = "") -> str:
    """One line saying why BCC could not compile: clang's first error if it printed one, else the exception."""
    errors = [ln for ln in diagnostics.splitlines() if "error:" in ln]
    return one_line(errors[0] if errors else str(exc) or type(exc).__name__)


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


def _failed_compile(reason: str) -> Features:
    return Features({**{name: False for name in _PROBES}, "bcc_compile": False}, {"bcc_compile": reason})


def probe_programs() -> Features:
    """Compile the probe programs with BCC and load each one, in this process."""
    results = Features()
    diagnostics: list[str] = []
    try:
        from bcc import BPF
        from .headers import find_kernel_headers

        find_kernel_headers()
        with _stderr_copied(diagnostics):
            module = BPF(text=_SOURCE)
    except Exception as exc:
        reason = compile_failure(exc, "".join(diagnostics))
        log.warning("BCC could not compile the probe programs: %s", reason)
        return _failed_compile(reason)
    results["bcc_compile"] = True
    try:
        for name, (func, prog_type, attach) in _PROBES.items():
            try:
                fn = module.load_func(func.encode(), prog_type, None, attach)
                if name in _TEST_RUN:
                    _, out = libbpf.prog_test_run(fn.fd, bytes(64))
                    if out[14:18] != (1).to_bytes(4, "little"):
                        raise KernelError(f"{func}: the test run's packet did not come back changed")
                results[name] = True
            except Exception:
                results[name] = False
    finally:
        module.cleanup()
    return results


def probe_programs_task(_args: dict) -> dict[str, dict]:
    """The compile worker's "probe" task (verdicts and reasons, as JSON)."""
    found = probe_programs()
    return {"verdicts": dict(found), "reasons": found.reasons}


def probe_programs_isolated() -> Features:
    """probe_programs() in a short-lived worker process (LLVM's memory leaves with it)."""
    from . import compile_worker

    if compile_worker.in_process():
        return probe_programs()
    try:
        reply = compile_worker.run("probe", {})
        return Features(reply["verdicts"], reply["reasons"])
    except KernelError as exc:
        log.warning("probe worker failed: %s", exc)
        return _failed_compile(one_line(f"the probe worker failed: {exc}"))


def with_cheap_checks(verdicts: Mapping[str, bool]) -> Features:
    """The program verdicts (and their reasons) plus the checks that need no compiler, forced failures applied."""
    return apply_forced(Features({**cheap_checks(), **verdicts}, reasons_of(verdicts)))


def probe_features() -> Features:
    """Probe this kernel. Needs CAP_BPF; a probe that cannot run counts as failed."""
    return with_cheap_checks(probe_programs_isolated())


def forced_failures() -> set[str]:
    """The probes ISTIO_EBPF_PROBE_FAIL names (reported as failed whatever the kernel says)."""
    return {name.strip() for name in os.environ.get(FORCE_FAIL_ENV, "").split(",") if name.strip()}


def apply_forced(results: Mapping[str, bool]) -> Features:
    out = Features(results, reasons_of(results))
    for name in forced_failures():
        out[name] = False
    return out


def select_mode(release: str, features: Mapping[str, bool] | None,
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
    compile_error = reasons_of(features).get("bcc_compile") if features.get("bcc_compile") is False else None
    if compile_error:   # every program probe failed for this one cause: say it instead of listing them
        return "unsupported", f"{why}, but BCC could not compile the probe programs ({compile_error}): keeping iptables"
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
