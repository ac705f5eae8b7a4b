"""``istio-ebpf bench [--quick] [--json FILE] [--plot FILE.png]``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from ..errors import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="benchmark iptables / ebpf / ebpf-sockmap / explicit (/ direct) on the "
                                            "http, l4 and capture-only paths: paired rounds, 95%% intervals")
    p.add_argument("--quick", action="store_true",
                   help="every path, one keep-alive and one churn workload, 7 rounds of 1 s (under 6 minutes)")
    p.add_argument("--json", metavar="FILE", help="write the results document (one entry per variant and workload)")
    p.add_argument("--plot", metavar="FILE.png", help="write a matplotlib PNG")
    p.add_argument("--from-json", metavar="FILE", help="no run: re-render the table, plot and page of a recorded run")
    p.add_argument("--markdown", metavar="FILE.md", help="write the results page (docs/bench.md) from this run")
    p.add_argument("--notes", metavar="FILE.md", help="with --markdown: hand-written notes appended to the page")
    p.add_argument("--rounds", type=int, help="interleaved rounds per workload (default 12, quick 7)")
    p.add_argument("--duration", type=float, help="seconds per measurement (default 1; wrk takes whole seconds)")
    p.add_argument("--paths", help="comma list among http,l4,capture-only (default: all; none: only the "
                                   "measurements asked for with --agent, --scale, --merge-meta)")
    p.add_argument("--scale", metavar="COUNTS",
                   help="also measure with this many opted-in pods on the node (e.g. 1,100,500): the capture "
                        "programs' run time per connection (paired rounds) and the real agent's full resync and RSS")
    p.add_argument("--merge-meta", metavar="FILE", action="append", default=[],
                   help="add the fields of a JSON object written by another measurement to meta (the node "
                        "benchmark's pod start-up, tests/node_bench.py); repeatable")
    p.add_argument("--discard-flagged", action="store_true",
                   help="leave rounds taken under other load (CPU of other processes, steal) out of the ratios")
    p.add_argument("--agent", action="store_true",
                   help="also measure the real agent: RSS and time to capture, fresh and restarted over its pins, "
                        "and one lab upgrade switch N -> N+1 under load (switch time, failed, uncaptured)")
    p.add_argument("--workloads", help="comma list of workload names (default: all, or the quick set)")
    p.add_argument("--variants", help="comma list among direct,iptables,ebpf,ebpf-sockmap,explicit and "
                                      "ebpf-nocount (ebpf without per-pod counters: their cost)")
    p.add_argument("--mode", choices=("auto", "cookie", "podip"), default="auto",
                   help="datapath mode for the ebpf variants")
    p.add_argument("--floor", action="store_true",
                   help="no run: the per-run cost of EMPTY programs at the datapath's sockops, connect4 and "
                        "sock_release hooks (the kernel's invocation floor under BPF_ENABLE_STATS)")
    p.set_defaults(func=_bench)


def _counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise UsageError(f"--scale takes pod counts like 1,100,500, not {text!r}") from None
    if not counts or min(counts) < 1 or max(counts) > 5000:
        raise UsageError("--scale: pod counts from 1 to 5000")
    return counts


def _bench(args: argparse.Namespace) -> int:
    from . import report, runner, topology

    if args.floor:
        from . import invocation_floor

        sys.stdout.write(invocation_floor.report(invocation_floor.measure()))
        return 0
    if args.rounds is not None and args.rounds < 1:
        raise UsageError("--rounds must be at least 1")
    if args.duration is not None and args.duration <= 0:
        raise UsageError("--duration must be positive")
    if args.plot and not args.plot.endswith(".png"):
        raise UsageError("--plot needs a .png file name")
    if args.notes and not (args.markdown and Path(args.notes).is_file()):
        raise UsageError("--notes needs --markdown and an existing file")
    no_paths = args.paths == "none"
    settings = runner.settings_for(args.quick, rounds=args.rounds, duration=args.duration,
                                   workloads=args.workloads.split(",") if args.workloads else None, mode=args.mode,
                                   paths=args.paths.split(",") if args.paths and not no_paths else None,
                                   discard_flagged=args.discard_flagged)
    if no_paths:
        settings = replace(settings, paths=())
    counts = _counts(args.scale) if args.scale else None
    merged: dict = {}
    for path in args.merge_meta:
        try:
            extra = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read {path}: {exc}") from exc
        if not isinstance(extra, dict):
            raise UsageError(f"{path}: expected a JSON object")
        merged.update(extra)
    if args.variants:
        chosen = tuple(v.strip() for v in args.variants.split(","))
        bad = [v for v in chosen if v not in topology.KNOWN_VARIANTS]
        if bad:
            raise UsageError(f"unknown variant(s) {', '.join(bad)}; known: {', '.join(topology.KNOWN_VARIANTS)}")
        settings = replace(settings, variants=chosen)
    if args.from_json:
        try:
            doc = json.loads(Path(args.from_json).read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read {args.from_json}: {exc}") from exc
    else:
        progress = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
        started = time.monotonic()
        doc = runner.header(settings) if no_paths else runner.run(settings, progress=progress)
        if counts:
            from . import scale

            doc["meta"]["scale"] = scale.measure(counts, rounds=settings.rounds, duration=settings.duration_s,
                                                 mode=doc["meta"]["settings"]["mode"], progress=progress)
        doc["meta"].update(merged)
        if args.agent:
            from . import agent_footprint

            try:
                doc["meta"].update(agent_footprint.measure())
            except Exception as exc:  # noqa: BLE001 - the benchmark's results are kept either way
                doc["meta"]["agent_error"] = f"{type(exc).__name__}: {exc}"[:300]
            from . import upgrade_switch

            try:
                doc["meta"].update(upgrade_switch.measure(doc["meta"]["settings"]["mode"], progress=progress))
            except Exception as exc:  # noqa: BLE001 - the benchmark's results are kept either way
                doc["meta"]["upgrade_error"] = f"{type(exc).__name__}: {exc}"[:300]
        if no_paths:
            doc["meta"].update(elapsed_s=round(time.monotonic() - started, 1), loadavg_end=runner.loadavg())
    print(report.table(doc))
    if args.json and not args.from_json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    if args.plot and doc["results"]:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        report.plot(doc, Path(args.plot))
    if args.markdown:
        from . import markdown

        notes = Path(args.notes).read_text() if args.notes else ""
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(markdown.page(doc, notes))
    return 0
