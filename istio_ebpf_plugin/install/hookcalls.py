"""Typed calls of the install hooks (in the manner of tox 4's ``ToxHandler``/``Plugin`` facade).

The front ends call these instead of ``pm.hook.*``: arguments are checked by the type
checker, list results of every plugin are joined here once, ``None`` answers dropped.
"""

from __future__ import annotations

import argparse
from typing import Any

import pluggy

from .edit import InjectorEdit
from .manifests import Document, Stream
from .options import Options
from .plan import NodePlan


def _joined(parts: list[list[Any] | None]) -> list[Any]:
    out: list[Any] = []
    for part in parts:
        out.extend(part or [])
    return out


class HookCalls:
    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self._hook = pm.hook

    def add_options(self, parser: argparse.ArgumentParser, command: str) -> None:
        self._hook.istio_ebpf_add_options(parser=parser, command=command)

    def plan_nodes(self, nodes: list[dict[str, Any]], options: Options) -> list[NodePlan] | None:
        return self._hook.istio_ebpf_plan_nodes(nodes=nodes, options=options)

    def edit_injector_config(self, edit: InjectorEdit, options: Options, revert: bool = False) -> None:
        hook = self._hook.istio_ebpf_revert_injector_config if revert else self._hook.istio_ebpf_edit_injector_config
        hook(edit=edit, options=options)

    def live_patches(self, configmap: dict[str, Any], edit: InjectorEdit, options: Options) -> list[dict[str, Any]]:
        return _joined(self._hook.istio_ebpf_live_patches(configmap=configmap, edit=edit, options=options))

    def agent_manifests(self, options: Options, plan: list[NodePlan] | None) -> list[Document]:
        return _joined(self._hook.istio_ebpf_agent_manifests(options=options, plan=plan))

    def transform_manifests(self, stream: Stream, options: Options, plan: list[NodePlan] | None) -> None:
        self._hook.istio_ebpf_transform_manifests(stream=stream, options=options, plan=plan)

    def post_install(self, options: Options, plan: list[NodePlan] | None) -> None:
        self._hook.istio_ebpf_post_install(options=options, plan=plan)

    def status(self, options: Options, plan: list[NodePlan] | None) -> list[str]:
        return _joined(self._hook.istio_ebpf_status(options=options, plan=plan))

    def uninstall_cleanup(self, options: Options) -> None:
        self._hook.istio_ebpf_uninstall_cleanup(options=options)
