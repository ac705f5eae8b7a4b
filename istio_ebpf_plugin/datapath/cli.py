"""``istio-ebpf probe``."""

from __future__ import annotations

import argparse
import json
import os

from ..kernel import parse_release


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probe", help="kernel release, feature probes and the selected capture mode")
    p.add_argument("--kernel-release", help="apply the version rule to this string only (no probing)")
    p.add_argument("--mode", default="auto", help="operator override: auto|cookie|podip|unsupported")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_probe)


def cmd_probe(args: argparse.Namespace) -> int:
    from .probe import parse_mode_arg, select_mode

    parse_mode_arg(args.mode)
    if args.kernel_release is not None:
        version = parse_release(args.kernel_release)   # UsageError -> exit 2
        mode, reason = select_mode(args.kernel_release, None, override=args.mode)
        out = {"kernel_release": args.kernel_release, "version": str(version), "mode": mode,
               "reason": reason, "probed": False}
    else:
        from .probe import probe_features

        release = os.uname().release
        features = probe_features()
        mode, reason = select_mode(release, features, override=args.mode)
        out = {"kernel_release": release, "version": str(parse_release(release)), "mode": mode,
               "reason": reason, "probed": True, "features": features}
    if args.json:
        print(json.dumps(out, sort_keys=True))
    else:
        print(f"kernel release  {out['kernel_release']} ({out['version']})")
        for name, ok in sorted(out.get("features", {}).items()):
            print(f"  {name:34s} {'ok' if ok else 'FAILED'}")
        print(f"mode            {out['mode']}  ({out['reason']})")
    return 0

