"""Plugin manager of the install flow (in the manner of tox 4).

Internal: plugin authors use :mod:`istio_ebpf_plugin.plugin`. Built-in plugins and
third-party ones both come from the entry-point group ``istio_ebpf`` (installing a
package is all it takes); ``ISTIO_EBPF_BLOCKED_PLUGINS``
(comma-separated plugin names, the entry-point names) blocks some of them, and
:meth:`pluggy.PluginManager.check_pending` rejects hook implementations whose
name matches no specification (a misspelled hook).
"""

from __future__ import annotations

import importlib
import os

import pluggy

from .. import hookspecs  # type: ignore[attr-defined]  # hooks/, installed under this name
from ..errors import UsageError
from ..plugin import BLOCKED_PLUGINS_ENV as BLOCK_ENV
from ..plugin import NAME as PROJECT
from ..plugin import hookimpl
from .hookcalls import HookCalls

__all__ = ["BLOCK_ENV", "PROJECT", "hookimpl", "create", "get", "hooks", "reset"]
#: Built-ins registered even when the package metadata is missing (e.g. running from a checkout).
BUILTINS = {"ebpf": "istio_ebpf_plugin.install.plugin"}


def blocked_names() -> list[str]:
    return [n.strip() for n in os.environ.get(BLOCK_ENV, "").split(",") if n.strip()]


def create(load_entrypoints: bool = True) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in blocked_names():
        pm.set_blocked(name)
    if load_entrypoints:
        try:
            pm.load_setuptools_entrypoints(PROJECT)
        except Exception as exc:  # a broken third-party plugin: say which, in one line
            raise UsageError(f"cannot load istio-ebpf plugins: {type(exc).__name__}: {exc}") from None
    for name, module in BUILTINS.items():
        if pm.is_blocked(name) or pm.has_plugin(name):
            continue
        pm.register(importlib.import_module(module), name=name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise UsageError(f"plugin error: {exc}") from None
    return pm


_PM: pluggy.PluginManager | None = None


def get() -> pluggy.PluginManager:
    """The process-wide manager (created on first use)."""
    global _PM
    if _PM is None:
        _PM = create()
    return _PM


def hooks() -> HookCalls:
    """Typed calls of the process-wide manager's hooks."""
    return HookCalls(get())


def reset() -> None:
    global _PM
    _PM = None
