"""The render pipeline: manifests in, transformed manifests out, all through the hooks."""

from __future__ import annotations

import pluggy

from ..errors import UsageError
from . import manifests
from .edit import InjectorEdit
from .hookcalls import HookCalls
from .options import Options
from .plan import NodePlan

__all__ = ["InjectorEdit", "edit_config", "render"]


def edit_config(pm: pluggy.PluginManager, name: str, namespace: str, config: str,
                options: Options | None, revert: bool = False) -> InjectorEdit:
    edit = InjectorEdit(name, namespace, manifests.injector_revision(name) or "", config, config)
    HookCalls(pm).edit_injector_config(edit, Options.of(options), revert=revert)
    if not isinstance(edit.config, str):
        raise UsageError(f"{edit.where()}: a plugin set config to a non-string")
    return edit


def render(pm: pluggy.PluginManager, text: str, source: str, options: Options,
           plan: list[NodePlan] | None = None) -> str:
    """The transformed stream as text; raises UsageError before producing anything on bad input."""
    hooks = HookCalls(pm)
    stream = manifests.split(text, source)
    for doc in manifests.injector_documents(stream, options.revision):
        edit = edit_config(pm, doc.name, doc.namespace, doc.data["data"]["config"], options)
        manifests.replace_config(doc, edit.config)
    manifests.merge_agent(stream, hooks.agent_manifests(options, plan))
    hooks.transform_manifests(stream, options, plan)
    return stream.text()
