"""Hook specifications of the istio-ebpf install flow.

Installed as ``istio_ebpf_plugin.hookspecs`` (never as a top-level ``hooks``
module). Every hook name starts with ``istio_ebpf_``. A plugin is any module
or object with functions marked ``@hookimpl`` (see
:data:`istio_ebpf_plugin.plugin.hookimpl`); third-party plugins
register through the entry-point group ``istio_ebpf``.

Call order for the front ends:

``render``:  add_options -> plan_nodes (only with ``--nodes``) ->
edit_injector_config (once per injector ConfigMap) -> agent_manifests ->
transform_manifests.

``install``: add_options -> plan_nodes -> edit_injector_config ->
live_patches (once per ConfigMap) -> agent_manifests -> transform_manifests ->
(patches and manifests applied) -> post_install.

``uninstall``: add_options -> revert_injector_config -> live_patches ->
uninstall_cleanup.

``status``: add_options -> plan_nodes -> status.

``options`` is always an :class:`istio_ebpf_plugin.plugin.Options` (defaults in one
place; options a plugin added are attributes too). Hooks reach the cluster only
through :mod:`istio_ebpf_plugin.kube_api`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from istio_ebpf_plugin.plugin import NAME as PROJECT
from istio_ebpf_plugin.plugin import hookspec

if TYPE_CHECKING:  # pragma: no cover
    import argparse

    from istio_ebpf_plugin.install.manifests import Document, Stream
    from istio_ebpf_plugin.install.options import Options
    from istio_ebpf_plugin.install.pipeline import InjectorEdit
    from istio_ebpf_plugin.install.plan import NodePlan

__all__ = ["PROJECT", "hookspec"]


@hookspec
def istio_ebpf_add_options(parser: "argparse.ArgumentParser", command: str) -> None:
    """Add command-line options to one install front end.

    When: while the CLI is built, once for each of the commands ``render``,
    ``install``, ``uninstall`` and ``status``, before arguments are parsed.

    :param parser: the sub-command's parser; call ``parser.add_argument``.
    :param command: which command the parser belongs to.
    :return: nothing (the return value is ignored).
    firstresult: no, every plugin is called.
    """


@hookspec(firstresult=True)
def istio_ebpf_plan_nodes(nodes: list[dict[str, Any]], options: "Options") -> "list[NodePlan] | None":
    """Decide the capture mode of every node (the rollout plan).

    When: by ``install`` and ``status`` with the cluster's nodes, and by
    ``render --nodes FILE`` with the nodes from the file, before anything is
    changed.

    :param nodes: Node objects as the API serves them (plain dicts).
    :param options: the command's options (``options.mode`` is the override).
    :return: one :class:`~istio_ebpf_plugin.install.plan.NodePlan` per node,
        or ``None`` to let the next plugin decide.
    firstresult: yes, the first non-``None`` plan wins.
    """


@hookspec
def istio_ebpf_edit_injector_config(edit: "InjectorEdit", options: "Options") -> None:
    """Change the injector's ``config`` (templates, defaultTemplates) for install.

    When: by ``render`` and ``install``, once per ``istio-sidecar-injector[-<rev>]``
    ConfigMap, in plugin registration order (later plugins see earlier edits).

    :param edit: holds ``name``, ``namespace``, ``revision``, ``original`` (the
        config as found) and ``config`` (the working text): assign a new string
        to ``edit.config``. Keep existing templates byte-identical and the edit
        idempotent (applying it to its own output changes nothing).
    :param options: the command's options.
    :return: nothing; the result is ``edit.config``.
    firstresult: no, every plugin is called.
    """


@hookspec
def istio_ebpf_revert_injector_config(edit: "InjectorEdit", options: "Options") -> None:
    """Undo :func:`istio_ebpf_edit_injector_config` for uninstall.

    When: by ``uninstall``, once per injector ConfigMap, in reverse
    registration order.

    :param edit: as for the edit hook; assign the reverted text to ``edit.config``.
        A config the plugin never changed must be left as it is.
    :param options: the command's options.
    :return: nothing; the result is ``edit.config``.
    firstresult: no, every plugin is called.
    """


@hookspec
def istio_ebpf_live_patches(configmap: dict[str, Any], edit: "InjectorEdit",
                            options: "Options") -> list[dict[str, Any]]:
    """RFC 6902 JSON patch operations for one live injector ConfigMap.

    When: by ``install`` and ``uninstall`` after the edit/revert hooks, once per
    ConfigMap whose config changed (and also when it did not, so plugins can
    keep their own bookkeeping in step).

    :param configmap: the ConfigMap as read from the API (plain dict).
    :param edit: the finished edit (``edit.original`` -> ``edit.config``).
    :param options: the command's options.
    :return: a list of operations; every ``replace`` or ``remove`` must be
        preceded by a ``test`` of the value it replaces so a concurrent edit
        makes the patch fail instead of being overwritten. An empty list
        means nothing to do.
    firstresult: no, the lists of all plugins are concatenated in call order.
    """


@hookspec
def istio_ebpf_agent_manifests(options: "Options",
                               plan: "list[NodePlan] | None") -> "list[Document]":
    """Extra Kubernetes objects to ship with the mesh (the node agent).

    When: by ``render`` (appended to the output stream) and ``install``
    (applied to the cluster), after the injector edits.

    :param options: the command's options.
    :param plan: the rollout plan when nodes are known, else ``None``.
    :return: a list of :class:`~istio_ebpf_plugin.install.manifests.Document`.
    firstresult: no, the lists of all plugins are concatenated in call order.
    """


@hookspec
def istio_ebpf_transform_manifests(stream: "Stream", options: "Options",
                                   plan: "list[NodePlan] | None") -> None:
    """Last look at the whole stream before it is written or applied.

    When: by ``render`` and ``install`` after the agent's documents were added.

    :param stream: the documents; edit them in place (mark ``doc.changed``).
        Documents a plugin does not change must keep their exact text.
    :param options: the command's options.
    :param plan: the rollout plan when nodes are known, else ``None``.
    :return: nothing.
    firstresult: no, every plugin is called.
    """


@hookspec
def istio_ebpf_post_install(options: "Options", plan: "list[NodePlan] | None") -> None:
    """Work after the patches and manifests were applied (node labels, rollout wait).

    When: by ``install`` (not with ``--dry-run``), once, after every patch and
    manifest was applied successfully.

    :param options: the command's options.
    :param plan: the rollout plan.
    :return: nothing; raise ``TemporaryError``/``PermanentError`` on failure.
    firstresult: no, every plugin is called.
    """


@hookspec
def istio_ebpf_status(options: "Options", plan: "list[NodePlan] | None") -> list[str]:
    """Report what is installed and what is missing.

    When: by ``status``, once.

    :param options: the command's options.
    :param plan: the rollout plan computed from the live nodes.
    :return: lines of text; a line starting with ``PROBLEM:`` or ``DRAINING:`` (an
        uninstall waits for pods to be restarted) makes ``status`` exit with code 1.
    firstresult: no, the lines of all plugins are concatenated.
    """


@hookspec
def istio_ebpf_uninstall_cleanup(options: "Options") -> None:
    """Remove what the plugin added besides the injector config (agent, labels, backups).

    When: by ``uninstall`` after the injector ConfigMaps were reverted (not with
    ``--dry-run``). The eBPF plugin drains here first: it raises ``TemporaryError``
    (and removes nothing) while pods still depend on its capture after ``--timeout``.

    :param options: the command's options.
    :return: nothing.
    firstresult: no, every plugin is called.
    """
