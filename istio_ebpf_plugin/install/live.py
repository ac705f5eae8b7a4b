"""``install`` / ``uninstall`` / ``status`` against a live cluster.

All API calls go through :mod:`istio_ebpf_plugin.kube_api`; the work itself is
done by the plugins' hooks. Injector ConfigMaps are changed only with JSON
patches that begin with a ``test`` of ``metadata.resourceVersion`` (optimistic
concurrency the Kubernetes way): when someone edits the ConfigMap at the same
moment, the server answers 409/422, we read it again, recompute and retry.
(A ``test`` of the config text itself would fail on a real apiserver whenever the
text holds <, >, & or non-ASCII characters, equal or not.)
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Callable

import pluggy

from .. import kube_api
from ..errors import IstioEbpfError, PermanentError, TemporaryError, UsageError
from . import injector_config, journal, manifests
from . import plan as planmod
from .hookcalls import HookCalls
from .options import DEFAULTS, Options
from .pipeline import InjectorEdit, edit_config
from .plugin import BACKUP_CONFIGMAP, INSTALLED_ANNOTATION


def _err(msg: str) -> None:
    print(msg, file=sys.stderr)


def _plan(pm: pluggy.PluginManager, options: Options, show: bool = True) -> list[planmod.NodePlan]:
    nodes = kube_api.list_nodes()
    plan = HookCalls(pm).plan_nodes(nodes, options) or []
    if show:
        _err(planmod.table(plan).rstrip("\n"))
    return plan


def _injectors(options: Options) -> list[dict[str, Any]]:
    cms = kube_api.list_injector_configmaps()
    revision = options.revision
    if revision is not None:
        cms = [cm for cm in cms if manifests.injector_revision(cm["metadata"]["name"]) == revision]
    ns_filter = options.istio_namespace
    if ns_filter:   # before the ambiguity check: naming the namespace is how a user resolves it
        cms = [cm for cm in cms if cm["metadata"].get("namespace") == ns_filter]
    if not cms:
        raise PermanentError("no istio-sidecar-injector ConfigMap in the cluster"
                             + (f" for revision {revision!r}" if revision is not None else "")
                             + (f" in namespace {ns_filter}" if ns_filter else "")
                             + ": is Istio installed?")
    seen: dict[str, str] = {}
    for cm in cms:
        meta = cm["metadata"]
        if meta["name"] in seen:
            raise UsageError(f"ambiguous revisions: ConfigMap {meta['name']} exists in namespaces "
                             f"{seen[meta['name']]} and {meta.get('namespace')}; use --revision/--istio-namespace")
        seen[meta["name"]] = meta.get("namespace", "")
    return cms


def _patch_one(pm: pluggy.PluginManager, cm: dict[str, Any], options: Options, revert: bool,
               before_patch: Callable[[InjectorEdit], None] | None = None,
               sleep: Callable[[float], None] = time.sleep) -> tuple[InjectorEdit, list[dict] | None]:
    """Compute and apply one ConfigMap's patch, re-reading and retrying on concurrent edits."""
    meta = cm["metadata"]
    ns, name = meta.get("namespace", ""), meta["name"]
    retries = max(1, int(options.retries or DEFAULTS.retries))
    current = cm
    for attempt in range(1, retries + 1):
        config = (current.get("data") or {}).get("config")
        if not isinstance(config, str):
            raise PermanentError(f"ConfigMap {ns}/{name}: no data.config")
        edit = edit_config(pm, name, ns, config, options, revert=revert)
        ops = HookCalls(pm).live_patches(current, edit, options)
        if not ops:
            _err(f"ConfigMap {ns}/{name}: unchanged")
            return edit, []
        version = (current.get("metadata") or {}).get("resourceVersion")
        if version:
            ops = [{"op": "test", "path": "/metadata/resourceVersion", "value": str(version)}, *ops]
        if options.dry_run:
            return edit, ops
        if before_patch is not None:
            before_patch(edit)
        journal.active().step(f"patch ConfigMap {ns}/{name}")
        try:
            after = kube_api.json_patch_configmap(ns, name, ops)
            journal.active().record_configmap_patch(current, after or {}, INSTALLED_ANNOTATION)
            _err(f"ConfigMap {ns}/{name}: patched ({len(ops)} operations)")
            return edit, ops
        except kube_api.ConcurrentEditError:
            _err(f"ConfigMap {ns}/{name}: changed by someone else meanwhile; re-reading "
                 f"(attempt {attempt}/{retries})")
        except TemporaryError as exc:
            _err(f"ConfigMap {ns}/{name}: {exc}; retrying (attempt {attempt}/{retries})")
            sleep(exc.delay)
        fresh = kube_api.get_configmap(ns, name)
        if fresh is None:
            raise PermanentError(f"ConfigMap {ns}/{name} was deleted during the operation")
        current = fresh
    raise TemporaryError(f"ConfigMap {ns}/{name}: still changing after {retries} attempts; try again")


def _save_backup(edit: InjectorEdit) -> None:
    """Keep the config as it was before our first edit (documented in docs/install.md)."""
    if (injector_config.parse(edit.original, edit.where()).get("templates") or {}).get("ebpf") is not None:
        return  # already ours: the backup from the first install stays
    run = journal.active()
    run.step(f"backup ConfigMap {edit.namespace}/{edit.name}")
    existing = kube_api.get_object("v1", "ConfigMap", edit.namespace, BACKUP_CONFIGMAP)
    # Server-side apply owns the whole data map: send every revision's entry, not just ours.
    old = dict((existing or {}).get("data") or {})
    data = {**old, edit.name: edit.original}

    def body(entries: dict[str, str]) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": BACKUP_CONFIGMAP, "namespace": edit.namespace,
                             "labels": {"app.kubernetes.io/managed-by": "istio-ebpf"}},
                "data": entries}
    if existing is None:
        run.apply(body(data))
    else:
        kube_api.apply_object(body(data))
        run.record(f"ConfigMap {edit.namespace}/{BACKUP_CONFIGMAP} entry {edit.name} added",
                   lambda: kube_api.apply_object(body(old)))


def _print_patch(edit: InjectorEdit, ops: list[dict]) -> str:
    return (f"# JSON patch (RFC 6902) for ConfigMap {edit.namespace}/{edit.name}\n"
            + json.dumps(ops, indent=2) + "\n")


def install(pm: pluggy.PluginManager, options: Options) -> int:
    hooks = HookCalls(pm)
    plan = _plan(pm, options)
    if plan and not any(p.captures for p in plan):
        _err("warning: no node can capture with eBPF; opted-in pods will stay Pending")
    # The agent objects first: missing manifests or a bad --image must stop us before any change.
    stream = manifests.Stream(hooks.agent_manifests(options, plan))
    hooks.transform_manifests(stream, options, plan)
    run = journal.Journal()
    previous = journal.activate(run)
    try:
        return _install_steps(pm, hooks, options, plan, stream, run)
    except (Exception, KeyboardInterrupt) as exc:
        step = run.step_name
        if not run.entries and isinstance(exc, IstioEbpfError):
            if step == "start":
                raise    # before the first step: the error as it is
            raise type(exc)(f"install failed at step '{step}': {exc}; nothing had been changed") from None
        reason = str(exc) if isinstance(exc, IstioEbpfError) else f"{type(exc).__name__}: {exc}"
        undone = len(run.entries)
        left = run.rollback()
        if left:
            _err(f"istio-ebpf: error: install failed at step '{step}': {reason}; rollback incomplete, "
                 f"left as changed: {'; '.join(left)}")
            return 3
        _err(f"istio-ebpf: error: install failed at step '{step}': {reason}; rolled back "
             f"({undone} change{'s' if undone != 1 else ''} of this run undone)")
        return 1
    finally:
        journal.activate(previous)


def _install_steps(pm: pluggy.PluginManager, hooks: HookCalls, options: Options, plan: list[planmod.NodePlan],
                   stream: manifests.Stream, run: journal.Journal) -> int:
    out: list[str] = []
    for cm in _injectors(options):
        edit, ops = _patch_one(pm, cm, options, revert=False, before_patch=_save_backup)
        if options.dry_run and ops:
            out.append(_print_patch(edit, ops))
    if options.dry_run:
        out.append(stream.text())
        sys.stdout.write("".join(out))
        return 0
    for doc in stream.documents:
        run.step(f"apply {doc.kind} {doc.namespace + '/' if doc.namespace else ''}{doc.name}")
        run.apply(doc.data)
        _err(f"applied {doc.kind} {doc.namespace + '/' if doc.namespace else ''}{doc.name}")
    run.step("post-install hooks")
    hooks.post_install(options, plan)
    final = hooks.plan_nodes(kube_api.list_nodes(), options) or []
    sys.stdout.write(planmod.table(final))
    return 0


def uninstall(pm: pluggy.PluginManager, options: Options) -> int:
    out: list[str] = []
    try:
        cms = _injectors(options)
    except PermanentError as exc:
        _err(f"{exc}; removing the agent only")
        cms = []
    for cm in cms:
        edit, ops = _patch_one(pm, cm, options, revert=True)
        if options.dry_run:
            if ops:
                out.append(_print_patch(edit, ops))
            continue
        if edit.changed:
            backup = kube_api.get_object("v1", "ConfigMap", edit.namespace, BACKUP_CONFIGMAP)
            saved = ((backup or {}).get("data") or {}).get(edit.name)
            if saved is not None and saved != edit.config:
                _err(f"note: {edit.where()} differs from the backup taken at install (it was changed since); "
                     "only istio-ebpf's own edits were removed")
            elif saved is not None:
                _err(f"{edit.where()}: restored exactly (matches the backup in {BACKUP_CONFIGMAP})")
    if options.dry_run:
        sys.stdout.write("".join(out))
        return 0
    HookCalls(pm).uninstall_cleanup(options)
    return 0


def status(pm: pluggy.PluginManager, options: Options) -> int:
    # Not the plan table: what a node's label plans is not what runs there (one line per node instead).
    plan = _plan(pm, options, show=False)
    lines = HookCalls(pm).status(options, plan)
    sys.stdout.write("".join(line + "\n" for line in lines))
    return 1 if any(line.startswith(("PROBLEM", "DRAINING")) for line in lines) else 0
