"""Statistics that hold on a shared, noisy VM: paired per-round ratios, bootstrap intervals, load flags.

Why paired ratios: on a 2-vCPU machine shared with other work, the absolute requests/s of one
variant moves by +-15% from one second to the next. Variants measured back to back inside one
short round see nearly the same background load, so their *ratio* is far steadier than either
figure; the median of the per-round ratios, with a bootstrap interval over rounds, says how
sure we are. A claim is made only when the interval excludes 1.0.
"""

from __future__ import annotations

import os
import random
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

#: Bootstrap resamples and seed: fixed, so the same rounds always give the same interval.
BOOTSTRAP_RESAMPLES = 4000
BOOTSTRAP_SEED = 20261202
#: A round is flagged when processes outside the benchmark used more than this share of all
#: CPUs, or the hypervisor stole more than STEAL_LIMIT of CPU time.
OTHER_LOAD_LIMIT = 0.25
STEAL_LIMIT = 0.05


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear between the closest ranks (numpy's default)."""
    vals = sorted(float(v) for v in values)
    if not vals:
        raise ValueError("percentile of no values")
    pos = (len(vals) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(vals) - 1)
    return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)


def bootstrap_ci(values: Sequence[float], *, level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED,
                 statistic: Callable[[Sequence[float]], float] = statistics.median) -> tuple[float, float] | None:
    """Percentile-bootstrap interval of ``statistic`` (the median; None for fewer than 2 values)."""
    vals = [float(v) for v in values]
    if len(vals) < 2:
        return None
    rng = random.Random(seed)
    n = len(vals)
    meds = sorted(statistic(rng.choices(vals, k=n)) for _ in range(resamples))
    tail = (1.0 - level) / 2
    lo = meds[int(tail * (resamples - 1))]
    hi = meds[int(round((1.0 - tail) * (resamples - 1)))]
    return (lo, hi)


@dataclass(frozen=True)
class RatioSummary:
    """Median of paired ratios with its bootstrap interval and spread."""

    median: float
    ci: tuple[float, float] | None
    lo: float
    hi: float
    n: int


def distribution(values: Sequence[float], digits: int = 1) -> dict:
    """n, p50 and p95 with their bootstrap 95% intervals, min, max (for latencies: pod start-up)."""
    vals = [float(v) for v in values]
    if not vals:
        return {"n": 0, "p50": None, "p50_ci": None, "p95": None, "p95_ci": None, "min": None, "max": None}

    def p95(v: Sequence[float]) -> float:
        return percentile(v, 95)

    def rounded(ci: tuple[float, float] | None) -> list[float] | None:
        return [round(x, digits) for x in ci] if ci else None

    return {"n": len(vals), "p50": round(statistics.median(vals), digits), "p50_ci": rounded(bootstrap_ci(vals)),
            "p95": round(p95(vals), digits), "p95_ci": rounded(bootstrap_ci(vals, statistic=p95)),
            "min": round(min(vals), digits), "max": round(max(vals), digits)}


def paired_ratios(rounds: Sequence[dict[str, float | None]], variant: str, baseline: str) -> list[float]:
    """variant/baseline for every round where both were measured (and the baseline is non-zero)."""
    out = []
    for r in rounds:
        a, b = r.get(variant), r.get(baseline)
        if a is not None and b:
            out.append(a / b)
    return out


def summarize(ratios: Sequence[float]) -> RatioSummary | None:
    if not ratios:
        return None
    return RatioSummary(median=statistics.median(ratios), ci=bootstrap_ci(ratios), lo=min(ratios),
                        hi=max(ratios), n=len(ratios))


def ratio_fields(prefix: str, summary: RatioSummary | None) -> dict:
    """A results entry's ``<prefix>``, ``<prefix>_ci`` and ``<prefix>_spread`` (rounded) from a summary."""
    if summary is None:
        return {prefix: None, f"{prefix}_ci": None, f"{prefix}_spread": None}
    return {prefix: round(summary.median, 3), f"{prefix}_ci": [round(x, 3) for x in summary.ci] if summary.ci else None,
            f"{prefix}_spread": [round(summary.lo, 3), round(summary.hi, 3)]}


#: The requests/s ratios of a results entry, by the variant they are against.
RPS_RATIOS = (("iptables", "rps_vs_iptables"), ("explicit", "rps_vs_explicit"), ("direct", "rps_vs_direct"))


# ---- what else ran on the machine during a round ----------------------------------------------

@dataclass(frozen=True)
class CpuSample:
    """Aggregate /proc/stat jiffies (all CPUs) and the benchmark cgroup's own CPU time."""

    busy: int
    steal: int
    total: int
    own_usec: int
    loadavg1: float


def _jiffy() -> int:
    try:
        return os.sysconf("SC_CLK_TCK")
    except (ValueError, OSError):
        return 100


def parse_proc_stat(text: str) -> tuple[int, int, int]:
    """(busy, steal, total) jiffies from the first ``cpu`` line of /proc/stat."""
    for line in text.splitlines():
        if line.startswith("cpu "):
            f = [int(x) for x in line.split()[1:]]
            f += [0] * (8 - len(f))
            user, nice, system, idle, iowait, irq, softirq, steal = f[:8]
            # guest/guest_nice (f[8:]) are already included in user/nice.
            busy = user + nice + system + irq + softirq
            return busy, steal, busy + idle + iowait + steal
    raise ValueError("no aggregate cpu line in /proc/stat")


def sample(own_cgroup: Path | Sequence[Path] | None) -> CpuSample:
    """The machine's CPU counters, and the CPU time of the benchmark's own cgroup(s)."""
    busy, steal, total = parse_proc_stat(Path("/proc/stat").read_text())
    own = 0
    cgroups = [own_cgroup] if isinstance(own_cgroup, Path) else list(own_cgroup or ())
    for cgroup in cgroups:
        try:
            for line in (cgroup / "cpu.stat").read_text().splitlines():
                if line.startswith("usage_usec "):
                    own += int(line.split()[1])
        except OSError:
            pass
    try:
        load1 = float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        load1 = 0.0
    return CpuSample(busy, steal, total, own, load1)


def conditions(before: CpuSample, after: CpuSample, *, clk_tck: int | None = None) -> dict:
    """Load during a round: other processes' CPU share, steal share, load average; ``flagged``."""
    tck = clk_tck or _jiffy()
    total = max(1, after.total - before.total)
    busy_s = (after.busy - before.busy) / tck
    own_s = (after.own_usec - before.own_usec) / 1e6
    all_cpus_s = total / tck
    other = max(0.0, busy_s - own_s) / all_cpus_s
    steal = (after.steal - before.steal) / total
    reasons = []
    if other > OTHER_LOAD_LIMIT:
        reasons.append(f"other processes used {other:.0%} of the CPUs")
    if steal > STEAL_LIMIT:
        reasons.append(f"steal {steal:.0%}")
    return {"other_cpu_share": round(other, 3), "steal_share": round(steal, 3),
            "loadavg1": after.loadavg1, "flagged": bool(reasons), "why": "; ".join(reasons)}
