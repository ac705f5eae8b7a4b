"""``istio-ebpf`` command line.

Each subsystem contributes its subcommands through ``register(subparsers)`` so
this module stays a thin dispatcher. Errors we raise on purpose print one line
and exit 2 (usage) or 1 (runtime); nothing else is caught here.

The lab (``harness``, ``bench``) is not in the wheel nor in the agent image: it runs from a
checkout. Where it is missing, its commands are still listed and answer with one line that
says so, instead of argparse's "invalid choice".
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
    "istio_ebpf_plugin.agent.pods_cli",
    "istio_ebpf_plugin.agent.explain_cli",
    "istio_ebpf_plugin.bench.cli",
)
#: The lab's modules, the commands each registers and the make target that runs each from a
#: checkout (tests/test_ship_wheel.py keeps this in step with what the modules register).
LAB_COMMANDS = {
    "istio_ebpf_plugin.harness.cli": {"harness-cleanup": "make clean-host", "demo": "make demo",
                                      "kernel-matrix": "make kernel-matrix"},
    "istio_ebpf_plugin.bench.cli": {"bench": "make bench"},
}


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
            # Subsystem not present in this build (the package itself or its cli module missing).
            if name.startswith(f"{exc.name}.") or exc.name == name:
                for command, target in LAB_COMMANDS.get(name, {}).items():
                    _register_missing(sub, command, target)
                continue
            raise
        module.register(sub)
    return parser


def _register_missing(sub: argparse._SubParsersAction, command: str, target: str) -> None:
    # No option prefix: whatever follows (--help included) is taken in and answered with the hint.
    p = sub.add_parser(command, help="(lab: runs from a checkout only)", add_help=False, prefix_chars="\0")
    p.add_argument("rest", nargs="*")
    p.set_defaults(func=lambda args: _missing(command, target))


def _missing(command: str, target: str) -> int:
    raise UsageError(f"`{command}` is part of the lab, which runs from a checkout of istio-ebpf, "
                     f"not from the installed package (git clone the repository, then `{target}` there)")


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
