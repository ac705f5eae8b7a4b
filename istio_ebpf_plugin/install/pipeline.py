"""The render pipeline: manifests in, transformed manifests out, all through the hooks."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pluggy

from ..errors import UsageError
from . import manifests
from .plan import NodePlan


@dataclass
class InjectorEdit:
    """One injector ConfigMap's ``config`` on its way through the edit/revert hooks."""
    name: str
    namespace: str
    revision: str
    original: str
    config: str

    @property
    def changed(self) -> bool:
        return self.config != self.original

    def where(self) -> str:
        return f"ConfigMap {self.namespace + '/' if self.namespace else ''}{self.name}"


def edit_config(pm: pluggy.PluginManager, name: str, namespace: str, config: str,
                options: argparse.Namespace, revert: bool = False) -> InjectorEdit:
    edit = InjectorEdit(name, namespace, manifests.injector_revision(name) or "", config, config)
    hook = pm.hook.istio_ebpf_revert_injector_config if revert else pm.hook.istio_ebpf_edit_injector_config
    hook(edit=edit, options=options)
    if not isinstance(edit.config, str):
        raise UsageError(f"{edit.where()}: a plugin set config to a non-string")
    return edit


def render(pm: pluggy.PluginManager, text: str, source: str, options: argparse.Namespace,
           plan: list[NodePlan] | None = None) -> str:
    """The transformed stream as text; raises UsageError before producing anything on bad input."""
    stream = manifests.split(text, source)
    revision = getattr(options, "revision", None)
    for doc in manifests.injector_documents(stream, revision):
        edit = edit_config(pm, doc.name, doc.namespace, doc.data["data"]["config"], options)
        manifests.replace_config(doc, edit.config)
    agent: list[manifests.Document] = []
    for docs in pm.hook.istio_ebpf_agent_manifests(options=options, plan=plan):
        agent.extend(docs or [])
    manifests.merge_agent(stream, agent)
    pm.hook.istio_ebpf_transform_manifests(stream=stream, options=options, plan=plan)
    return stream.text()
