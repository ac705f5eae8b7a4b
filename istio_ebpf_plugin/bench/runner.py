"""Interleaved benchmark rounds: for each workload, rounds of (a b c d e), median and spread.

JSON schema (``istio-ebpf bench --json FILE``)::

    {"meta": {"command", "date", "machine": {...}, "tools": {...}, "settings": {...}, "elapsed_s",
              "loadavg_start", "loadavg_end",
              "variants": {variant: {"available", "error", "envoy_requests", "iptables_rules", ...}}},
     "results": [{"variant", "workload", "rps", "p50_ms", "p99_ms", "p999_ms", "throughput_mbps",
                  "cpu_s_per_req", "errors", "requests", "rounds", "rps_min", "rps_max",
                  "rps_vs_iptables", "rps_vs_direct", "p99_vs_iptables", "cpu_vs_iptables"}, ...]}

Figures are medians over rounds; ``rps_min``/``rps_max`` give the spread. A variant that could
not run has entries with ``error`` and null figures.
"""

from __future__ import annotations

import datetime
import logging
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

from .. import kernel
from ..harness.envoy import envoy_version
from ..harness.node import Node
from . import topology, wrk

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
QUICK_WORKLOADS = ("ka-1k-c16", "ka-256k-c16", "conn-1k-c16")


@dataclass(frozen=True)
class Settings:
    workloads: tuple[Workload, ...]
    variants: tuple[str, ...] = topology.VARIANTS
    rounds: int = 3
    duration_s: float = 5.0
    warmup_s: float = 1.0
    mode: str = "auto"

    def describe(self) -> dict:
        return {"workloads": [w.name for w in self.workloads], "variants": list(self.variants),
                "rounds": self.rounds, "duration_s": self.duration_s, "warmup_s": self.warmup_s,
                "mode": self.mode, "wrk_threads": 1, "envoy_concurrency": 1}


def settings_for(quick: bool, *, rounds: int | None = None, duration: float | None = None,
                 workloads: list[str] | None = None, mode: str = "auto") -> Settings:
    by_name = {w.name: w for w in WORKLOADS}
    names = workloads or (list(QUICK_WORKLOADS) if quick else [w.name for w in WORKLOADS])
    unknown = [n for n in names if n not in by_name]
    if unknown:
        from ..errors import UsageError
        raise UsageError(f"unknown workload(s) {', '.join(unknown)}; known: {', '.join(by_name)}")
    return Settings(workloads=tuple(by_name[n] for n in names),
                    rounds=rounds if rounds is not None else (1 if quick else 3),
                    duration_s=duration if duration is not None else (3.0 if quick else 5.0),
                    warmup_s=1.0, mode=mode)


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


def run(settings: Settings, progress: Callable[[str], None] = lambda s: None) -> dict:
    """Build the pods, run every (workload, round, variant) interleaved, return the JSON document."""
    mode = settings.mode
    if mode == "auto":
        mode = kernel.mode_for_release(platform.release())
    started = time.monotonic()
    doc: dict[str, Any] = {"meta": {
        "command": " ".join(["istio-ebpf", *sys.argv[1:]]) if sys.argv else "istio-ebpf bench",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "tools": tools(), "settings": {**settings.describe(), "mode": mode},
        "variants": {}, "loadavg_start": _loadavg()}, "results": []}
    rounds: dict[tuple[str, str], list[dict]] = {}
    with Node() as node:
        script = wrk.write_script(node.workdir)
        pin_prefix = f"/sys/fs/bpf/istio-ebpf-test-bench-{node.token}"
        payloads = PAYLOADS
        variants = topology.build(node, settings.variants, payloads, mode=mode if mode != "unsupported" else "podip",
                                  pin_prefix=pin_prefix)
        try:
            progress(f"pods ready after {time.monotonic() - started:.1f}s")
            ready = [v for v in settings.variants if variants[v].error is None]
            for vp in variants.values():
                if vp.error is None:  # warm-up: connection pools, page cache, JIT of nothing
                    wrk.run(vp.client, vp.url(PAYLOADS.index(1024)), connections=4, duration_s=settings.warmup_s,
                            script=script)
            for w in settings.workloads:
                for rnd in range(settings.rounds):
                    # Rotate the order each round so no variant always runs first.
                    order = ready[rnd % len(ready):] + ready[:rnd % len(ready)] if ready else []
                    for v in order:
                        m = _measure(variants[v], w, settings.duration_s, script)
                        rounds.setdefault((v, w.name), []).append(m)
                        progress(f"{w.name:12s} round {rnd + 1}/{settings.rounds} {v:13s} "
                                 f"{m['rps']:10.0f} rps  p99 {m['p99_ms']:7.2f} ms  errors {m['errors']}")
            for v, vp in variants.items():
                info: dict[str, Any] = {"available": vp.error is None, "error": vp.error,
                                        "iptables_rules": (vp.client.iptables_rule_count()
                                                           + vp.server.iptables_rule_count())}
                if vp.error is None:
                    info["envoy_requests"] = vp.proxied_requests()
                if vp.datapath is not None and vp.error is None:
                    try:
                        info["datapath_counters"] = vp.datapath.counters()
                        info["sockmap"] = bool(getattr(vp.datapath, "sockmap", False))
                    except Exception as exc:  # noqa: BLE001 - diagnostics only
                        info["datapath_counters_error"] = str(exc)
                doc["meta"]["variants"][v] = info
        finally:
            topology.teardown(variants)
    doc["results"] = aggregate(settings, rounds, {v: vp.error for v, vp in variants.items()})
    doc["meta"]["elapsed_s"] = round(time.monotonic() - started, 1)
    doc["meta"]["loadavg_end"] = _loadavg()
    return doc


def _loadavg() -> list[float]:
    """1/5/15-minute load: other work on the host during a run shows up here (it skews figures)."""
    try:
        return [float(x) for x in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return []


def _median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def aggregate(settings: Settings, rounds: dict[tuple[str, str], list[dict]],
              errors: dict[str, str | None]) -> list[dict]:
    results = []
    for w in settings.workloads:
        row: dict[str, dict] = {}
        for v in settings.variants:
            ms = rounds.get((v, w.name), [])
            if not ms:
                row[v] = {"variant": v, "workload": w.name, "error": errors.get(v) or "not measured",
                          "rps": None, "p50_ms": None, "p99_ms": None, "p999_ms": None, "throughput_mbps": None,
                          "cpu_s_per_req": None, "errors": None, "requests": 0, "rounds": 0}
                continue
            row[v] = {"variant": v, "workload": w.name, "description": w.description,
                      "rps": round(_median([m["rps"] for m in ms]), 1),
                      "p50_ms": round(_median([m["p50_ms"] for m in ms]), 3),
                      "p99_ms": round(_median([m["p99_ms"] for m in ms]), 3),
                      "p999_ms": round(_median([m["p999_ms"] for m in ms]), 3),
                      "throughput_mbps": round(_median([m["throughput_mbps"] for m in ms]), 1),
                      "cpu_s_per_req": _median([m["cpu_s_per_req"] for m in ms]),
                      "errors": sum(m["errors"] for m in ms), "requests": sum(m["requests"] for m in ms),
                      "rounds": len(ms), "rps_min": round(min(m["rps"] for m in ms), 1),
                      "rps_max": round(max(m["rps"] for m in ms), 1)}
        base, direct = row.get("iptables", {}), row.get("direct", {})
        for r in row.values():
            r["rps_vs_iptables"] = _ratio(r.get("rps"), base.get("rps"))
            r["rps_vs_direct"] = _ratio(r.get("rps"), direct.get("rps"))
            r["p99_vs_iptables"] = _ratio(r.get("p99_ms"), base.get("p99_ms"))
            r["cpu_vs_iptables"] = _ratio(r.get("cpu_s_per_req"), base.get("cpu_s_per_req"))
            results.append(r)
    return results
