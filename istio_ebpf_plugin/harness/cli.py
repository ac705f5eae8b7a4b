"""``istio-ebpf harness-cleanup``: remove whatever a crashed harness run left behind."""

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

    from .kernel_matrix import register as register_kernel_matrix

    register_kernel_matrix(subparsers)


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
