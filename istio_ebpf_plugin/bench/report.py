"""Human output of a benchmark document: a text table with 95% intervals, and a matplotlib PNG."""

from __future__ import annotations

from pathlib import Path


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def ratio_text(r: dict, prefix: str) -> str:
    """``1.05 [0.98-1.12]`` (median paired ratio and its 95% interval), ``-`` when absent."""
    value, ci = r.get(prefix), r.get(f"{prefix}_ci")
    if value is None:
        return "-"
    return f"{value:.2f} [{ci[0]:.2f}-{ci[1]:.2f}]" if ci else f"{value:.2f}"


def verdict(r: dict, prefix: str = "rps_vs_iptables") -> str:
    """A claim only where the 95% interval excludes 1.0."""
    ci = r.get(f"{prefix}_ci")
    if not ci:
        return "no difference measurable (no interval)"
    if ci[0] > 1.0:
        return "faster"
    if ci[1] < 1.0:
        return "slower"
    return "no difference measurable"


def table(doc: dict) -> str:
    """One line per (path, workload, variant): medians, paired ratios with intervals, BPF cost."""
    head = (f"{'path':12s} {'workload':12s} {'variant':13s} {'rps':>8s} {'min-max':>13s} {'p99 ms':>8s} "
            f"{'cpu us/req':>10s} {'err':>4s} {'x iptables [95% CI]':>20s} {'x explicit [95% CI]':>20s} "
            f"{'bpf ns/conn':>11s}")
    lines = [head, "-" * len(head)]
    last = None
    for r in doc["results"]:
        group = (r.get("path"), r["workload"])
        if last is not None and group != last:
            lines.append("")
        last = group
        prefix = f"{r.get('path', 'http'):12s} {r['workload']:12s} {r['variant']:13s}"
        if r.get("rps") is None:
            lines.append(f"{prefix} {r.get('error', 'n/a')}")
            continue
        spread = f"{r['rps_min']:.0f}-{r['rps_max']:.0f}"
        cpu = None if r["cpu_s_per_req"] is None else r["cpu_s_per_req"] * 1e6
        lines.append(f"{prefix} {r['rps']:8.0f} {spread:>13s} {r['p99_ms']:8.2f} {_fmt(cpu, '10.1f')} "
                     f"{r['errors']:4d} {ratio_text(r, 'rps_vs_iptables'):>20s} "
                     f"{ratio_text(r, 'rps_vs_explicit'):>20s} {_fmt(r.get('bpf_ns_per_connection'), '11.0f')}")
    m = doc["meta"]
    lines.append("")
    lines.append(f"machine: {m['machine']['cpus']} CPUs {m['machine']['cpu_model']}, kernel {m['machine']['kernel']}; "
                 f"tools: {', '.join(f'{k} {v}' for k, v in m['tools'].items())}; mode {m['settings']['mode']}; "
                 f"{m['settings']['rounds']} paired round(s) x {m['settings']['duration_s']}s")
    if "rounds_total" in m:
        lines.append(f"load: loadavg {m.get('loadavg_start')} -> {m.get('loadavg_end')}; "
                     f"{m['rounds_flagged']}/{m['rounds_total']} rounds flagged (other processes > 25% of the "
                     f"CPUs or steal > 5%)"
                     f"{'; flagged rounds discarded' if m['settings'].get('discard_flagged') else ''}")
    lines.extend(bpf_lines(doc))
    if "agent_rss_mib" in m:
        lines.append(f"agent: RSS {m['agent_rss_mib']:.0f} MiB; start to capture {m['agent_start_to_capture_s']:.2f} s "
                     f"fresh (probes + compile), {m['agent_restart_to_capture_s']:.2f} s restarted over its pins")
    if m.get("upgrade_switch_s") is not None:
        lines.append(f"upgrade N -> N+1 under load: switch {m['upgrade_switch_s']:.2f} s (agent process start -> old "
                     f"version retired; prepare step {m['upgrade_prepare_s']:.2f} s before it), "
                     f"{m['upgrade_failed']} failed, {m['upgrade_uncaptured']} uncaptured")
    for key, info in m["variants"].items():
        if info.get("error"):
            lines.append(f"{key}: {info['error']}")
    lines.extend(scale_lines(m.get("scale")))
    lines.extend(pod_startup_lines(m.get("pod_ready_ms")))
    return "\n".join(lines)


def _ci(ci: list | None, spec: str = ".0f") -> str:
    return f"[{ci[0]:{spec}}-{ci[1]:{spec}}]" if ci else ""


def scale_lines(sc: dict | None) -> list[str]:
    """``--scale``: per pod count, kernel ns per connection and its ratio to the smallest count, agent."""
    if not sc:
        return []
    load = sc.get("loadavg") or []
    out = [f"scale ({sc['path']} {sc['workload']}, {sc['rounds']} paired rounds, {sc.get('rounds_flagged', 0)} "
           f"flagged; loadavg {' -> '.join(f'{x:.1f}' for x in load)}; {sc['processes_per_pod']} processes per pod):",
           f"{'pods':>6s} {'bpf ns/conn [95% CI]':>24s} {'x smallest [95% CI]':>22s} "
           f"{'resync s: first/restart/relist':>32s} {'RSS MiB (peak)':>15s}"]
    for c in sc["counts"]:
        k, a = sc["kernel"].get(str(c), {}), sc["agent"].get(str(c), {})
        ns = f"{k['ns_per_connection']:.0f} {_ci(k.get('ns_per_connection_ci'))}" if k.get("ns_per_connection") else "-"
        ratio = f"{k['ratio']:.3f} {_ci(k.get('ratio_ci'), '.3f')}" if k.get("ratio") is not None else "-"
        r = a.get("resync_s", {})
        resync = "/".join(f"{r[x]:.2f}" if x in r else "-" for x in ("first_start", "restart", "relist"))
        rss = f"{a['rss_mib_max']:.0f} ({a['hwm_mib']:.0f})" if "rss_mib_max" in a else "-"
        out.append(f"{c:6d} {ns:>24s} {ratio:>22s} {resync:>32s} {rss:>15s}")
    return out


def pod_startup_lines(ps: dict | None) -> list[str]:
    """Pod creation to Ready per variant (p50/p95 with 95% intervals), the paired difference, the agent."""
    if not ps:
        return []
    load = ps.get("loadavg") or []
    out = [f"pod start-up (creation -> Ready; {ps['rounds']} paired rounds + {ps['warmup_rounds']} warm-up; "
           f"loadavg {' -> '.join(f'{x:.1f}' for x in load)}):"]
    for v, d in ps["variants"].items():
        out.append(f"  {v:9s} n {d['n']:3d}  p50 {d['p50']:7.0f} ms {_ci(d['p50_ci']):>14s}  p95 {d['p95']:7.0f} ms "
                   f"{_ci(d['p95_ci']):>14s}  (initialized p50 {d['initialized_p50'] or 0:.0f} ms)")
    diff, ratio = ps["ebpf_minus_iptables_ms"], ps["ebpf_over_iptables"]
    if diff.get("median") is not None:
        out.append(f"  eBPF - iptables per round: median {diff['median']:+.0f} ms {_ci(diff['ci'], '+.0f')}; "
                   f"eBPF / iptables {ratio['median']:.3f} {_ci(ratio['ci'], '.3f')}")
    cap = ps.get("agent_capture_ms") or {}
    if cap.get("n"):
        out.append(f"  agent, sandbox start -> capture written: n {cap['n']}  p50 {cap['p50']:.0f} ms "
                   f"{_ci(cap['p50_ci'])}  p95 {cap['p95']:.0f} ms {_ci(cap['p95_ci'])}")
    return out


def bpf_lines(doc: dict) -> list[str]:
    """Per-program kernel cost per connection (churn workloads) and sk_msg cost per message."""
    out = []
    for r in doc["results"]:
        bpf = r.get("bpf")
        if bpf:
            progs = ", ".join(f"{p.removeprefix('ie_')} {v['ns']:.0f} ns ({v['runs']:.1f} runs)"
                              for p, v in bpf["programs"].items())
            out.append(f"bpf {r['path']}/{r['variant']}/{r['workload']}: capture {bpf['capture_ns']:.0f} ns/conn "
                       f"+ hardening {bpf['hardening_ns']:.0f} ns/conn; {progs}")
        if r.get("bpf_ns_per_message"):
            out.append(f"bpf {r['path']}/{r['variant']}/{r['workload']}: "
                       f"sk_msg {r['bpf_ns_per_message']:.0f} ns/message")
    return out


COLORS = {"direct": "#7f7f7f", "iptables": "#d62728", "ebpf": "#1f77b4", "ebpf-sockmap": "#2ca02c",
          "explicit": "#9467bd"}


def plot(doc: dict, path: Path) -> None:
    """One panel per path: requests/s relative to iptables, bars = median paired ratio, whiskers = 95% CI."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = list(dict.fromkeys(r.get("path", "http") for r in doc["results"]))
    fig, axes = plt.subplots(len(paths), 1, figsize=(10, 3.6 * len(paths)), squeeze=False)
    for ax, p in zip(axes[:, 0], paths, strict=True):
        rows = [r for r in doc["results"] if r.get("path", "http") == p]
        workloads = list(dict.fromkeys(r["workload"] for r in rows))
        variants = [v for v in dict.fromkeys(r["variant"] for r in rows) if v != "direct"]
        by = {(r["workload"], r["variant"]): r for r in rows}
        width = 0.8 / max(1, len(variants))
        top = 1.0
        for i, v in enumerate(variants):
            xs, ys, lo, hi = [], [], [], []
            for j, w in enumerate(workloads):
                r = by.get((w, v))
                if not r or r.get("rps_vs_iptables") is None:
                    continue
                y = r["rps_vs_iptables"]
                ci = r.get("rps_vs_iptables_ci") or [y, y]
                xs.append(j + (i - (len(variants) - 1) / 2) * width)
                ys.append(y)
                lo.append(max(0.0, y - ci[0]))
                hi.append(max(0.0, ci[1] - y))
                top = max(top, ci[1])
            ax.bar(xs, ys, width, label=v, color=COLORS.get(v), yerr=[lo, hi], capsize=3)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylim(0, top * 1.15)
        ax.set_xticks(range(len(workloads)))
        ax.set_xticklabels(workloads, fontsize=8)
        ax.set_title(f"{p}: requests/s vs iptables (median paired ratio, whiskers = 95% CI)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    handles: dict = {}
    for ax in axes[:, 0]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), ncol=len(handles), fontsize=8, loc="upper center",
               bbox_to_anchor=(0.5, 0.965))
    m = doc["meta"]
    flagged = f", {m['rounds_flagged']}/{m['rounds_total']} rounds under other load" if "rounds_total" in m else ""
    fig.suptitle(f"istio-ebpf bench: {m['machine']['cpus']} CPUs, kernel {m['machine']['kernel']}, "
                 f"{m['settings']['rounds']} paired rounds x {m['settings']['duration_s']}s, "
                 f"loadavg {m.get('loadavg_start', ['?'])[0]}{flagged}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)
