"""``istio-ebpf render | install | uninstall | status``: front ends of the install hooks."""

from __future__ import annotations

import argparse
import sys

from .. import kernel
from ..errors import UsageError
from . import manager, manifests, pipeline
from . import plan as planmod
from .hookcalls import HookCalls
from .options import DEFAULTS, Options

COMMANDS = {
    "render": "transform 'istioctl manifest generate' / 'helm template' output (stdin or -f) and append the agent; "
              "usable as Helm --post-renderer",
    "install": "enable eBPF capture on the live cluster (patch injector ConfigMaps, apply the agent)",
    "uninstall": "restore the injector ConfigMaps and remove the agent",
    "status": "show what is installed, per ConfigMap and per node",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    hooks = manager.hooks()
    for command, help_text in COMMANDS.items():
        p = subparsers.add_parser(command, help=help_text, description=help_text)
        if command == "render":
            p.add_argument("-f", "--filename", default=DEFAULTS.filename, metavar="FILE",
                           help="multi-document YAML to transform ('-' = stdin, the default)")
            p.add_argument("--nodes", metavar="FILE",
                           help="output of 'kubectl get nodes -o json': print the rollout plan to stderr")
        p.add_argument("--revision", default=DEFAULTS.revision,
                       help="only the injector of this Istio revision ('' = the default revision)")
        if command != "render":
            p.add_argument("--istio-namespace", default=DEFAULTS.istio_namespace,
                           help="only injector ConfigMaps in this namespace")
        hooks.add_options(p, command)
        p.set_defaults(func=_run, install_command=command)


def _run(args: argparse.Namespace) -> int:
    pm = manager.get()
    options = Options.from_namespace(args)
    kernel.validate_mode(options.mode)
    command = options.command
    if command == "render":
        return render(pm, options)
    from . import live  # imports the kubernetes client only when needed

    return {"install": live.install, "uninstall": live.uninstall, "status": live.status}[command](pm, options)


def render(pm, options: Options) -> int:
    plan = None
    if options.nodes:
        text, label = manifests.read_text(options.nodes)
        nodes = planmod.nodes_from_json(text, label)
        plan = HookCalls(pm).plan_nodes(nodes, options)
    text, label = manifests.read_text(options.filename)
    if not text.strip():
        raise UsageError(f"{label}: empty input")
    # Everything is computed before the first byte goes out: no partial output on errors.
    output = pipeline.render(pm, text, label, options, plan)
    if plan is not None:
        sys.stderr.write(planmod.table(plan))
    sys.stdout.write(output)
    sys.stdout.flush()
    return 0
