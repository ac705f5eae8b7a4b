"""Human output of a benchmark document: a text table and a matplotlib PNG."""

from __future__ import annotations

from pathlib import Path


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(doc: dict) -> str:
    """One line per (workload, variant): absolute figures and ratios to iptables (b) and direct (a)."""
    head = (f"{'workload':13s} {'variant':13s} {'rps':>9s} {'min-max':>15s} {'p50 ms':>8s} {'p99 ms':>8s} "
            f"{'p99.9 ms':>9s} {'Mbit/s':>8s} {'cpu us/req':>10s} {'err':>5s} {'x ipt':>6s} {'x dir':>6s}")
    lines = [head, "-" * len(head)]
    last = None
    for r in doc["results"]:
        if last is not None and r["workload"] != last:
            lines.append("")
        last = r["workload"]
        if r.get("rps") is None:
            lines.append(f"{r['workload']:13s} {r['variant']:13s} {r.get('error', 'n/a')}")
            continue
        spread = f"{r['rps_min']:.0f}-{r['rps_max']:.0f}"
        cpu = None if r["cpu_s_per_req"] is None else r["cpu_s_per_req"] * 1e6
        lines.append(f"{r['workload']:13s} {r['variant']:13s} {r['rps']:9.0f} {spread:>15s} {r['p50_ms']:8.3f} "
                     f"{r['p99_ms']:8.3f} {r['p999_ms']:9.3f} {r['throughput_mbps']:8.0f} {_fmt(cpu, '10.1f')} "
                     f"{r['errors']:5d} {_fmt(r['rps_vs_iptables'], '6.2f')} {_fmt(r['rps_vs_direct'], '6.2f')}")
    m = doc["meta"]
    lines.append("")
    lines.append(f"machine: {m['machine']['cpus']} CPUs {m['machine']['cpu_model']}, kernel {m['machine']['kernel']}; "
                 f"tools: {', '.join(f'{k} {v}' for k, v in m['tools'].items())}; mode {m['settings']['mode']}; "
                 f"{m['settings']['rounds']} round(s) x {m['settings']['duration_s']}s")
    for v, info in m["variants"].items():
        if info.get("error"):
            lines.append(f"{v}: {info['error']}")
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
    """Three panels per workload: requests/s, p99 latency and CPU per request, relative to iptables."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in doc["results"]))
    variants = list(dict.fromkeys(r["variant"] for r in doc["results"]))
    by = {(r["workload"], r["variant"]): r for r in doc["results"]}
    colors = {"direct": "#7f7f7f", "iptables": "#d62728", "ebpf": "#1f77b4", "ebpf-sockmap": "#2ca02c",
              "explicit": "#9467bd"}
    panels = (("rps_vs_iptables", "requests/s vs iptables (higher is better)"),
              ("p99_vs_iptables", "p99 latency vs iptables (lower is better)"),
              ("cpu_vs_iptables", "CPU per request vs iptables (lower is better)"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 1.6 * len(workloads) + 3), 11), sharex=True)
    width = 0.8 / max(1, len(variants))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for i, v in enumerate(variants):
            xs, ys, lo, hi = [], [], [], []
            for j, w in enumerate(workloads):
                r = by.get((w, v))
                if not r or r.get(key) is None:
                    continue
                xs.append(j + (i - (len(variants) - 1) / 2) * width)
                ys.append(r[key])
                if key == "rps_vs_iptables" and by.get((w, "iptables"), {}).get("rps"):
                    base = by[(w, "iptables")]["rps"]
                    lo.append(max(0.0, r[key] - r["rps_min"] / base))
                    hi.append(max(0.0, r["rps_max"] / base - r[key]))
            err = [lo, hi] if lo else None
            ax.bar(xs, ys, width, label=v, color=colors.get(v), yerr=err, capsize=2)
        ax.axhline(1.0, color="black", linewidth=0.8)
        if key == "rps_vs_iptables":
            # direct is several times faster: clip it so the sidecar variants stay readable, print its value.
            others = [r[key] for r in doc["results"] if r["variant"] != "direct" and r.get(key)]
            top = max(others + [1.0]) * 1.35
            ax.set_ylim(0, top)
            if "direct" in variants:
                i = variants.index("direct")
                for j, w in enumerate(workloads):
                    r = by.get((w, "direct"))
                    if r and r.get(key) and r[key] > top:
                        ax.text(j + (i - (len(variants) - 1) / 2) * width, top * 0.97, f"{r[key]:.1f}x",
                                ha="center", va="top", fontsize=7, rotation=90, color="white")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, ncol=len(variants), fontsize=9, loc="upper center", bbox_to_anchor=(0.5, 0.965))
    axes[-1].set_xticks(range(len(workloads)))
    axes[-1].set_xticklabels(workloads, rotation=20, fontsize=8)
    m = doc["meta"]
    fig.suptitle(f"istio-ebpf bench: {m['machine']['cpus']} CPUs, kernel {m['machine']['kernel']}, "
                 f"{m['settings']['rounds']} interleaved round(s) x {m['settings']['duration_s']}s, "
                 f"error bars = min..max over rounds", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)
