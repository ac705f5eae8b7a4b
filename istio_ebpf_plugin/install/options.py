"""The options every install hook receives, with their defaults in one place.

The command line builds them (:meth:`Options.from_namespace`); a plugin's own options
(added in ``istio_ebpf_add_options``) arrive in :attr:`Options.extra` and read as
attributes too, so ``options.my_flag`` works for them as for the built-in ones.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class Options:
    command: str = "render"          # render | install | uninstall | status
    filename: str = "-"              # render: the manifests ('-' = stdin)
    nodes: str | None = None         # render: 'kubectl get nodes -o json' output for the plan
    revision: str | None = None      # only the injector of this Istio revision ('' = default)
    istio_namespace: str | None = None
    mode: str = "auto"               # auto | cookie | podip | unsupported
    image: str | None = None         # agent image; None: $ISTIO_EBPF_IMAGE, else the release image
    selinux_type: str | None = None  # render/install: SELinux type of the agent pod (e.g. spc_t)
    dry_run: bool = False
    timeout: float = 300.0           # install: DaemonSet rollout; uninstall: agent pods' clean-up (0: no wait)
    force: bool = False              # uninstall: remove the agent although pods still depend on its capture
    retries: int = 5                 # install: attempts when an injector ConfigMap changes under us
    extra: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        # Only called for names that are not fields: the options plugins added.
        extra = self.__dict__.get("extra", {})
        if name in extra:
            return extra[name]
        raise AttributeError(f"no option {name!r}")

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> "Options":
        known = {f.name for f in fields(cls)} - {"extra"}
        values = vars(ns)
        args = {k: v for k, v in values.items() if k in known and v is not None}
        if "install_command" in values:
            args["command"] = values["install_command"]
        extra = {k: v for k, v in values.items() if k not in known and k not in ("func", "install_command")}
        return cls(**args, extra=extra)

    @classmethod
    def of(cls, options: "Options | argparse.Namespace | None") -> "Options":
        """``options`` as :class:`Options` (hooks called directly may still pass a Namespace or None)."""
        if isinstance(options, Options):
            return options
        if options is None:
            return cls()
        return cls.from_namespace(options)


#: The defaults, for help texts and argparse.
DEFAULTS = Options()
