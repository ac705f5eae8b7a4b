"""``istio-ebpf demo`` (local pods, real Envoy) and ``istio-ebpf harness-cleanup`` (what a crashed run left)."""

from __future__ import annotations

import argparse
import json

from ..errors import IstioEbpfError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "harness-cleanup",
        help="remove leftover test pods: netns ie-*, cgroups istio-ebpf-test-*, pins /sys/fs/bpf/istio-ebpf-test*")
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--force", action="store_true",
                   help="also remove objects of harness runs that are still alive, and all pins")
    p.set_defaults(func=_cleanup)

    d = subparsers.add_parser("demo", help="local demo: pods, real Envoy, traffic through eBPF capture")
    d.add_argument("--mode", default="auto", help="auto|cookie|podip")
    d.add_argument("--sockmap", dest="sockmap", action="store_true", help="enable sk_msg acceleration")
    d.add_argument("--no-sockmap", dest="sockmap", action="store_false", help="(default) no acceleration")
    d.add_argument("--requests", type=int, default=50)
    d.add_argument("--json", action="store_true", help="print one JSON object")
    d.set_defaults(func=cmd_demo, sockmap=False)

    # kernel_matrix itself is imported only when the command runs (the CLI loads no lab code)
    k = subparsers.add_parser("kernel-matrix", help="run the datapath on real Debian kernels in virtme-ng VMs")
    k.add_argument("--kernels", default="5.10,6.1,6.12,host", help="comma list of 5.10, 6.1, 6.12, host")
    k.add_argument("--steps", default="probe,demo,table,explain,explain-rules,conflict,selftest,cleanup",
                   help="comma list of probe, demo, table, explain, explain-rules, conflict, selftest, cleanup")
    k.add_argument("--out", default="out/kernel-matrix", help="one <kernel>.json per kernel and table.txt here")
    k.add_argument("--timeout", type=float, default=3600.0, help="seconds per kernel")
    k.set_defaults(func=cmd_kernel_matrix)


def cmd_kernel_matrix(args: argparse.Namespace) -> int:
    from .kernel_matrix import host_main

    return host_main(args)


def _cleanup(args: argparse.Namespace) -> int:
    from . import cleanup

    found = cleanup.find(force=args.force)
    errors = [] if args.dry_run else cleanup.remove(found)
    if args.json:
        print(json.dumps({"netns": found.netns, "cgroups": [str(c) for c in found.cgroups],
                          "pins": [str(p) for p in found.pins], "dirs": [str(d) for d in found.tmpdirs],
                          "removed": not args.dry_run and not errors, "errors": errors}))
    else:
        verb = "would remove" if args.dry_run else "removed"
        print(f"harness-cleanup: {verb}: {found.describe()}")
    if errors:
        raise IstioEbpfError("harness-cleanup incomplete: " + "; ".join(errors))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..datapath.probe import parse_mode_arg
    from .demo import demo_ok, main_json, print_summary, run_demo

    if parse_mode_arg(args.mode) == "unsupported":
        from ..errors import UsageError
        raise UsageError("demo --mode must be auto, cookie or podip")
    summary = run_demo(mode=args.mode, sockmap=args.sockmap, requests=max(2, args.requests))
    if args.json:
        print(main_json(summary))
    else:
        print_summary(summary)
    return 0 if demo_ok(summary) else 1
