"""Interleaved, paired benchmark rounds; per workload the median paired ratio with a 95% interval.

For each workload and round, every variant of a path runs once, back to back, in an order that
rotates from round to round; ratios are formed inside a round (``stats.paired_ratios``) and
summarised over rounds (median, seeded bootstrap interval, spread). Each round also records
what else the machine did (other processes' CPU share, steal, load average) and is flagged when
that was large; ``--discard-flagged`` leaves flagged rounds out of the ratios.

JSON schema (``istio-ebpf bench --json FILE``)::

    {"meta": {"command", "date", "machine", "tools", "settings", "elapsed_s", "loadavg_start",
              "loadavg_end", "rounds_flagged", "rounds_total", "bpf_stats",
              "variants": {"<path>/<variant>": {"available", "error", "proxied", "iptables_rules", ...}},
              ["agent_rss_mib", "agent_restart_to_capture_s", ..., "upgrade_switch_s", "upgrade_failed",
               "upgrade_uncaptured", "upgrade_prepare_s", ...]},
     "rounds": [{"path", "workload", "round", "order", "conditions": {...}, "rps": {variant: rps}}],
     "results": [{"path": "http"|"l4"|"capture-only", "variant", "workload", "churn",
                  "rps", "p50_ms", "p99_ms", "p999_ms", "throughput_mbps", "cpu_s_per_req", "errors",
                  "requests", "rounds", "rounds_used", "rps_min", "rps_max",
                  "rps_vs_iptables", "rps_vs_iptables_ci": [lo, hi], "rps_vs_iptables_spread": [min, max],
                  "rps_vs_explicit", "rps_vs_explicit_ci": [lo, hi], "rps_vs_explicit_spread",
                  "rps_vs_direct", "p99_vs_iptables", "cpu_vs_iptables", "cpu_vs_iptables_ci",
                  "bpf_ns_per_connection", "bpf_ns_per_message", "bpf"}, ...]}

Ratios are medians of per-round paired ratios; ``*_ci`` their bootstrap 95% intervals (null with
fewer than 2 rounds). ``bpf_ns_per_connection`` (eBPF variants, churn workloads) is the kernel's
run time of connect + sockops + getsockopt + sk_lookup (+ sock_create/sock_release) per
request; keep-alive workloads open no connection per request, so it is null there.
A variant that could not run has entries with ``error`` and null figures.
"""

from __future__ import annotations

import datetime
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

from .. import kernel
from ..errors import KernelError
from ..harness.envoy import envoy_version
from ..harness.node import Node
from . import bpf_cost, stats, topology, wrk

log = logging.getLogger(__name__)

PAYLOADS = (64, 1024, 16 * 1024, 256 * 1024, 1024 * 1024)


@dataclass(frozen=True)
class Workload:
    name: str
    payload: int          # response body bytes (index into PAYLOADS picks the server port)
    connections: int
    close_each: bool = False   # a new connection per request
    description: str = ""

    @property
    def payload_index(self) -> int:
        return PAYLOADS.index(self.payload)


WORKLOADS = (
    Workload("ka-1k-c1", 1024, 1, description="keep-alive, 1 KB, 1 connection"),
    Workload("ka-1k-c16", 1024, 16, description="keep-alive, 1 KB, 16 connections"),
    Workload("ka-1k-c64", 1024, 64, description="keep-alive, 1 KB, 64 connections"),
    Workload("ka-64b-c16", 64, 16, description="keep-alive, 64 B, 16 connections"),
    Workload("ka-16k-c16", 16 * 1024, 16, description="keep-alive, 16 KB, 16 connections"),
    Workload("ka-256k-c16", 256 * 1024, 16, description="keep-alive, 256 KB, 16 connections"),
    Workload("ka-1m-c16", 1024 * 1024, 16, description="keep-alive, 1 MB, 16 connections"),
    Workload("conn-1k-c16", 1024, 16, close_each=True, description="new connection per request, 1 KB, 16 concurrent"),
    Workload("bulk-1m-c1", 1024 * 1024, 1, description="bulk: one long-lived connection pulling 1 MB responses"),
)
QUICK_WORKLOADS = ("ka-1k-c16", "conn-1k-c16")


@dataclass(frozen=True)
class Settings:
    workloads: tuple[Workload, ...]
    variants: tuple[str, ...] = topology.VARIANTS
    rounds: int = 12
    duration_s: float = 1.0
    warmup_s: float = 1.0
    mode: str = "auto"
    paths: tuple[str, ...] = topology.PATHS
    discard_flagged: bool = False

    def describe(self) -> dict:
        return {"workloads": [w.name for w in self.workloads], "variants": list(self.variants),
                "paths": list(self.paths), "rounds": self.rounds, "duration_s": self.duration_s,
                "warmup_s": self.warmup_s, "mode": self.mode, "discard_flagged": self.discard_flagged,
                "wrk_threads": 1, "envoy_concurrency": 1}


#: --quick: every path, one keep-alive and one churn workload, enough short rounds for an interval.
QUICK_ROUNDS = 7
QUICK_DURATION_S = 1.0


def settings_for(quick: bool, *, rounds: int | None = None, duration: float | None = None,
                 workloads: list[str] | None = None, mode: str = "auto", paths: list[str] | None = None,
                 discard_flagged: bool = False) -> Settings:
    from ..errors import UsageError

    by_name = {w.name: w for w in WORKLOADS}
    names = workloads or (list(QUICK_WORKLOADS) if quick else [w.name for w in WORKLOADS])
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise UsageError(f"unknown workload(s) {', '.join(unknown)}; known: {', '.join(by_name)}")
    chosen_paths = tuple(paths or topology.PATHS)
    bad = [p for p in chosen_paths if p not in topology.PATHS]
    if bad:
        raise UsageError(f"unknown path(s) {', '.join(bad)}; known: {', '.join(topology.PATHS)}")
    return Settings(workloads=tuple(by_name[n] for n in names),
                    rounds=rounds if rounds is not None else (QUICK_ROUNDS if quick else 12),
                    duration_s=duration if duration is not None else (QUICK_DURATION_S if quick else 1.0),
                    warmup_s=1.0, mode=mode, paths=chosen_paths, discard_flagged=discard_flagged)


def machine() -> dict:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = 0
    try:
        mem = int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal"))) // 1024
    except (OSError, StopIteration):
        pass
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "cpu_model": cpu, "memory_mb": mem,
            "python": platform.python_version(), "os": _os_name()}


def _os_name() -> str:
    try:
        for line in open("/etc/os-release"):
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.system()


def tools() -> dict:
    out = {"wrk": wrk.version(), "envoy": envoy_version()}
    try:
        import bcc  # type: ignore[import-not-found]
        out["bcc"] = getattr(bcc, "__version__", "unknown")
    except Exception:  # noqa: BLE001 - only a version label
        out["bcc"] = "unavailable"
    try:
        import matplotlib
        out["matplotlib"] = matplotlib.__version__
    except ImportError:
        out["matplotlib"] = "unavailable"
    return out


def _measure(vp: topology.VariantPods, w: Workload, duration: float, script) -> dict:
    cpu0 = vp.cpu_usec()
    r = wrk.run(vp.client, vp.url(w.payload_index), connections=w.connections, duration_s=duration,
                script=script, close_each=w.close_each)
    cpu = (vp.cpu_usec() - cpu0) / 1e6
    return {"rps": r.rps, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "p999_ms": r.p999_ms,
            "throughput_mbps": r.throughput_mbps, "cpu_s": cpu, "requests": r.requests, "errors": r.errors,
            "cpu_s_per_req": cpu / r.requests if r.requests else None}


def _rotated(items: list, k: int) -> list:
    """Round k starts at a different variant, so none is always first (or always after the same one)."""
    if not items:
        return []
    k %= len(items)
    return items[k:] + items[:k]


def header(settings: Settings) -> dict[str, Any]:
    """The document before any round: command, date, machine, tools, settings, load."""
    mode = settings.mode
    if mode == "auto":
        mode = kernel.mode_for_release(platform.release())
    return {"meta": {
        "command": " ".join(["istio-ebpf", *sys.argv[1:]]) if sys.argv else "istio-ebpf bench",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "tools": tools(), "settings": {**settings.describe(), "mode": mode},
        "variants": {}, "loadavg_start": loadavg()}, "rounds": [], "results": []}


def run(settings: Settings, progress: Callable[[str], None] = lambda s: None) -> dict:
    """Build the pods, run every (workload, round, path, variant) interleaved, return the JSON document."""
    started = time.monotonic()
    doc = header(settings)
    mode = doc["meta"]["settings"]["mode"]
    measured: dict[tuple[str, str, str], list[dict]] = {}   # (path, variant, workload) -> per round
    rounds: list[dict] = []
    costs: dict[tuple[str, str, str], bpf_cost.Cost] = {}
    with Node() as node, bpf_cost.StatsSwitch() as switch:
        doc["meta"]["bpf_stats"] = switch.error or "BPF_ENABLE_STATS"
        script = wrk.write_script(node.workdir)
        pin_prefix = f"/sys/fs/bpf/istio-ebpf-test-bench-{node.token}"
        variants = topology.build(node, settings.variants, PAYLOADS, mode=mode if mode != "unsupported" else "podip",
                                  pin_prefix=pin_prefix, paths=settings.paths)
        try:
            progress(f"pods ready after {time.monotonic() - started:.1f}s")
            for vp in variants.values():
                if vp.error is None:  # warm-up: connection pools, page cache
                    wrk.run(vp.client, vp.url(PAYLOADS.index(1024)), connections=4, duration_s=settings.warmup_s,
                            script=script)
            for w in settings.workloads:
                for rnd in range(settings.rounds):
                    for path in _rotated(list(settings.paths), rnd):
                        ready = [v for v in topology.variants_for(path, settings.variants)
                                 if variants[(path, v)].error is None]
                        order = _rotated(ready, rnd)
                        before = stats.sample(node.parent_cgroup)
                        rps: dict[str, float] = {}
                        for v in order:
                            vp = variants[(path, v)]
                            dp = topology.datapath_of(variants, v) if switch.fd is not None else None
                            snap = bpf_cost.snapshot(dp) if dp is not None else None
                            try:
                                m = _measure(vp, w, settings.duration_s, script)
                            except (KernelError, subprocess.TimeoutExpired) as exc:   # keep the run going
                                m = {"rps": None, "errors": 1, "requests": 0, "failed": str(exc)[:300]}
                                progress(f"{w.name:12s} {path:12s} {v:13s} failed: {m['failed']}")
                            if snap is not None:
                                c = bpf_cost.Cost.between(snap, bpf_cost.snapshot(dp))
                                key = (path, v, w.name)
                                costs[key] = costs[key].plus(c) if key in costs else c
                                per_conn = c.per_connection(m.get("requests") or 0) if w.close_each else None
                                m["bpf_ns"] = per_conn["capture_ns"] if per_conn and not m.get("errors") else None
                            m["round"] = rnd
                            measured.setdefault((path, v, w.name), []).append(m)
                            if m["rps"] is None:
                                continue
                            rps[v] = m["rps"]
                            progress(f"{w.name:12s} {path:12s} round {rnd + 1}/{settings.rounds} {v:13s} "
                                     f"{m['rps']:10.0f} rps  p99 {m['p99_ms']:7.2f} ms  errors {m['errors']}")
                        cond = stats.conditions(before, stats.sample(node.parent_cgroup))
                        rounds.append({"path": path, "workload": w.name, "round": rnd, "order": order,
                                       "conditions": cond, "rps": {v: round(x, 1) for v, x in rps.items()}})
                        if cond["flagged"]:
                            progress(f"  round flagged: {cond['why']}")
            for (path, v), vp in variants.items():
                rules = vp.client.iptables_rule_count() + vp.server.iptables_rule_count()
                info: dict[str, Any] = {"path": path, "variant": v, "available": vp.error is None,
                                        "error": vp.error, "iptables_rules": rules}
                if vp.error is None:
                    info["proxied"] = vp.proxied_requests()
                if vp.datapath is not None and vp.error is None:
                    try:
                        info["datapath_counters"] = vp.datapath.counters()
                        info["sockmap"] = bool(getattr(vp.datapath, "sockmap", False))
                    except Exception as exc:  # noqa: BLE001 - diagnostics only
                        info["datapath_counters_error"] = str(exc)
                doc["meta"]["variants"][f"{path}/{v}"] = info
        finally:
            topology.teardown(variants)
    errors = {key: vp.error for key, vp in variants.items()}
    doc["rounds"] = rounds
    doc["results"] = aggregate(settings, measured, rounds, errors, costs)
    doc["meta"]["rounds_total"] = len(rounds)
    doc["meta"]["rounds_flagged"] = sum(1 for r in rounds if r["conditions"]["flagged"])
    doc["meta"]["elapsed_s"] = round(time.monotonic() - started, 1)
    doc["meta"]["loadavg_end"] = loadavg()
    return doc


def loadavg() -> list[float]:
    """1/5/15-minute load: other work on the host during a run shows up here (it skews figures)."""
    try:
        return [float(x) for x in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return []


def _median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _paired(ms_a: list[dict], ms_b: list[dict], key: str, used: set[int]) -> stats.RatioSummary | None:
    """Median of per-round a/b for ``key`` over the rounds in ``used``."""
    by_round = {m["round"]: m.get(key) for m in ms_b}
    ratios = [m[key] / by_round[m["round"]] for m in ms_a
              if m["round"] in used and m.get(key) is not None and by_round.get(m["round"])]
    return stats.summarize(ratios)


def aggregate(settings: Settings, measured: dict[tuple[str, str, str], list[dict]], rounds: list[dict],
              errors: dict[tuple[str, str], str | None],
              costs: dict[tuple[str, str, str], bpf_cost.Cost] | None = None) -> list[dict]:
    costs = costs or {}
    results = []
    for path in settings.paths:
        for w in settings.workloads:
            flagged = {r["round"] for r in rounds
                       if r["path"] == path and r["workload"] == w.name and r["conditions"]["flagged"]}
            all_rounds = set(range(settings.rounds))
            used = all_rounds - flagged if settings.discard_flagged else all_rounds
            row: dict[str, dict] = {}
            for v in topology.variants_for(path, settings.variants):
                tried = measured.get((path, v, w.name), [])
                ms = [m for m in tried if m.get("rps") is not None]     # failed runs count as errors only
                base = {"path": path, "variant": v, "workload": w.name, "churn": w.close_each,
                        "description": w.description}
                if not ms:
                    row[v] = {**base, "error": errors.get((path, v)) or "not measured",
                              "rps": None, "p50_ms": None, "p99_ms": None, "p999_ms": None, "throughput_mbps": None,
                              "cpu_s_per_req": None, "errors": None, "requests": 0, "rounds": 0}
                    continue
                row[v] = {**base,
                          "rps": round(_median([m["rps"] for m in ms]), 1),
                          "p50_ms": round(_median([m["p50_ms"] for m in ms]), 3),
                          "p99_ms": round(_median([m["p99_ms"] for m in ms]), 3),
                          "p999_ms": round(_median([m["p999_ms"] for m in ms]), 3),
                          "throughput_mbps": round(_median([m["throughput_mbps"] for m in ms]), 1),
                          "cpu_s_per_req": _median([m["cpu_s_per_req"] for m in ms]),
                          "errors": sum(m["errors"] for m in tried), "requests": sum(m["requests"] for m in ms),
                          "rounds": len(ms), "rounds_flagged": len(flagged), "rounds_used": len(used),
                          "rps_min": round(min(m["rps"] for m in ms), 1),
                          "rps_max": round(max(m["rps"] for m in ms), 1)}
                if v in topology.EBPF_VARIANTS:
                    cost = costs.get((path, v, w.name))
                    per_conn = cost.per_connection(row[v]["requests"]) if cost and w.close_each else None
                    row[v]["bpf"] = per_conn
                    row[v]["bpf_ns_per_connection"] = per_conn["capture_ns"] if per_conn else None
                    row[v]["bpf_ns_per_message"] = cost.per_message() if cost else None
                    # the same, round by round against ebpf-nocount (no per-pod counters): their cost
                    nocount = [m for m in measured.get((path, "ebpf-nocount", w.name), []) if m.get("bpf_ns")]
                    if v != "ebpf-nocount" and nocount and w.close_each:
                        row[v].update(stats.ratio_fields("bpf_vs_nocount", _paired(ms, nocount, "bpf_ns", used)))
                    if w.close_each:
                        rounds_ns = [m["bpf_ns"] for m in ms if m.get("bpf_ns")]
                        ci = stats.bootstrap_ci(rounds_ns)
                        row[v]["bpf_ns_per_connection_rounds"] = [round(x, 1) for x in rounds_ns]
                        row[v]["bpf_ns_per_connection_ci"] = [round(x, 1) for x in ci] if ci else None
            for v, r in row.items():
                ms = [m for m in measured.get((path, v, w.name), []) if m.get("rps") is not None]
                for base_v, prefix in stats.RPS_RATIOS:
                    base_ms = [m for m in measured.get((path, base_v, w.name), []) if m.get("rps") is not None]
                    r.update(stats.ratio_fields(prefix, _paired(ms, base_ms, "rps", used) if ms and base_ms else None))
                ipt = [m for m in measured.get((path, "iptables", w.name), []) if m.get("rps") is not None]
                p99 = _paired(ms, ipt, "p99_ms", used) if ms and ipt else None
                cpu = _paired(ms, ipt, "cpu_s_per_req", used) if ms and ipt else None
                r["p99_vs_iptables"] = _r(p99.median if p99 else None)
                # CPU per request is a cost, not a share of the machine: steadier than requests/s
                # when other processes take CPU time away.
                r.update(stats.ratio_fields("cpu_vs_iptables", cpu))
                results.append(r)
    return results
