"""``istio-ebpf`` command line.

Each subsystem contributes its subcommands through ``register(subparsers)`` so
this module stays a thin dispatcher. Errors we raise on purpose print one line
and exit 2 (usage) or 1 (runtime); nothing else is caught here.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from . import __version__
from .errors import IstioEbpfError, UsageError

# Modules that define register(subparsers); each sets args.func.
_SUBCOMMAND_MODULES = (
    "istio_ebpf_plugin.datapath.cli",
    "istio_ebpf_plugin.harness.cli",
    "istio_ebpf_plugin.install.cli",
    "istio_ebpf_plugin.agent.cli",
    "istio_ebpf_plugin.bench.cli",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="istio-ebpf", description="eBPF traffic capture for Istio sidecars")
    parser.add_argument("--version", action="version", version=f"istio-ebpf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # subsystem not present in this build
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"istio-ebpf: error: {exc}", file=sys.stderr)
        return 2
    except IstioEbpfError as exc:
        print(f"istio-ebpf: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
