"""The eBPF capture plugin: the built-in implementation of the install hooks.

Registered through the ``istio_ebpf`` entry point (name ``ebpf``), so
installing the package enables it and ``ISTIO_EBPF_BLOCKED_PLUGINS=ebpf``
disables it.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import re
import sys
import time
from typing import Any

from .. import MODE_REASON_ANNOTATION, NODE_MODE_LABEL, kernel, kube_api, resources
from ..errors import PermanentError, TemporaryError, UsageError
from . import drain as drainmod
from . import injector_config, journal, manifests, waits
from . import plan as planmod
from . import template as tpl
from ..agent.pods_cli import KUBECTL_COMMAND
from ..plugin import hookimpl
from .edit import InjectorEdit
from .options import DEFAULTS, Options

#: ConfigMap (in each injector's namespace) holding the config as it was before install.
BACKUP_CONFIGMAP = "istio-ebpf-injector-backup"
#: Annotation on the injector ConfigMap: sha256 of the config we installed.
INSTALLED_ANNOTATION = "istio-ebpf.io/installed-config-sha256"
MODE_ENV = "ISTIO_EBPF_MODE"
AGENT_REASON_ANNOTATION = MODE_REASON_ANNOTATION   # written by the agent (istio_ebpf_plugin/__init__.py)


#: An SELinux type name (the third field of a context such as system_u:system_r:spc_t:s0).
_SELINUX_TYPE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _json_pointer(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


@hookimpl
def istio_ebpf_add_options(parser: argparse.ArgumentParser, command: str) -> None:
    if command in ("render", "install", "status"):
        parser.add_argument("--mode", default=DEFAULTS.mode, metavar="MODE",
                            help="capture mode for every node: auto (by kernel version), cookie, podip, unsupported")
    if command in ("render", "install"):
        parser.add_argument("--image", default=DEFAULTS.image, metavar="REF",
                            help=f"agent image (default: ${resources.IMAGE_ENV}, else {resources.release_image()})")
        parser.add_argument("--selinux-type", default=DEFAULTS.selinux_type, metavar="TYPE",
                            help="SELinux type of the agent pod (seLinuxOptions.type), e.g. spc_t on "
                                 "OpenShift or other SELinux-enforcing nodes; default: the runtime's")
    if command in ("install", "uninstall"):
        parser.add_argument("--dry-run", action="store_true",
                            help="print the JSON patches and manifests instead of applying them")
        parser.add_argument("--timeout", type=float, default=DEFAULTS.timeout,
                            help="seconds to wait for the agent DaemonSet rollout (install), or (uninstall) for "
                                 "the pods that depend on eBPF capture to be restarted and then for the agent "
                                 "pods' clean-up; 0: do not wait")
    if command == "uninstall":
        parser.add_argument("--force", action="store_true",
                            help="remove the agent even while pods depend on its capture (they then run "
                                 "uncaptured until restarted; each is named)")
    if command == "install":
        parser.add_argument("--retries", type=int, default=DEFAULTS.retries,
                            help="attempts when an injector ConfigMap changes under us")


@hookimpl
def istio_ebpf_plan_nodes(nodes: list[dict[str, Any]], options: Options) -> list[planmod.NodePlan]:
    return planmod.build(nodes, Options.of(options).mode or DEFAULTS.mode)


@hookimpl
def istio_ebpf_edit_injector_config(edit: InjectorEdit, options: Options) -> None:
    edit.config = injector_config.add(edit.config, edit.where())


@hookimpl
def istio_ebpf_revert_injector_config(edit: InjectorEdit, options: Options) -> None:
    edit.config = injector_config.remove(edit.config, edit.where())


@hookimpl
def istio_ebpf_live_patches(configmap: dict[str, Any], edit: InjectorEdit,
                            options: Options) -> list[dict[str, Any]]:
    # No `test` of old values here: the caller guards the whole patch with a test of
    # metadata.resourceVersion (a real apiserver fails `test` on strings holding <, >, & or
    # non-ASCII characters even when they are equal, and Istio's config holds all of them).
    annotations = (configmap.get("metadata") or {}).get("annotations") or {}
    ops: list[dict[str, Any]] = []
    if edit.changed:
        ops.append({"op": "replace", "path": "/data/config", "value": edit.config})
    installing = injector_config.is_installed(edit.config, edit.where())
    pointer = "/metadata/annotations/" + _json_pointer(INSTALLED_ANNOTATION)
    if installing:
        want = _sha(edit.config)
        if annotations.get(INSTALLED_ANNOTATION) != want:
            if not annotations and "annotations" not in (configmap.get("metadata") or {}):
                ops.append({"op": "add", "path": "/metadata/annotations", "value": {INSTALLED_ANNOTATION: want}})
            elif INSTALLED_ANNOTATION in annotations:
                ops.append({"op": "replace", "path": pointer, "value": want})
            else:
                ops.append({"op": "add", "path": pointer, "value": want})
    elif INSTALLED_ANNOTATION in annotations:
        ops.append({"op": "remove", "path": pointer})
    return ops


@hookimpl
def istio_ebpf_agent_manifests(options: Options, plan: list[planmod.NodePlan] | None) -> list:
    docs = manifests.agent_documents()
    mode = Options.of(options).mode or DEFAULTS.mode
    image = agent_image(options)
    if mode != "auto":
        kernel.validate_mode(mode)
    selinux = Options.of(options).selinux_type
    if selinux is not None and not _SELINUX_TYPE.fullmatch(selinux):
        raise UsageError(f"invalid SELinux type {selinux!r} (letters, digits and _, e.g. spc_t)")
    for doc in docs:
        if doc.kind != "DaemonSet":
            continue
        if selinux:
            manifests.set_daemonset_selinux_type(doc, selinux)
        if image:
            manifests.set_daemonset_image(doc, image)
        else:  # the release image follows the package version; a site's own images stay
            manifests.set_daemonset_image(doc, resources.release_image(), resources.IMAGE_REPOSITORY)
        if mode != "auto":
            manifests.set_daemonset_env(doc, MODE_ENV, mode)
    return docs


def _agent_published(node: dict[str, Any]) -> bool:
    """The agent labelled this node from its feature probes (it writes the reason annotation too)."""
    return AGENT_REASON_ANNOTATION in (((node.get("metadata") or {}).get("annotations")) or {})


def agent_image(options: Options | None) -> str | None:
    """The agent image chosen by ``--image`` or ``$ISTIO_EBPF_IMAGE``; None when neither is set."""
    image = Options.of(options).image or resources.chosen_image()
    if image is not None and (not image.strip() or any(ch.isspace() for ch in image) or image.startswith("-")):
        raise UsageError(f"invalid agent image reference {image!r}")
    return image


def _label_unless_agent(run: journal.Journal, node: dict[str, Any], p: planmod.NodePlan, tries: int = 8) -> None:
    """Write the plan's label only onto the Node as read: the patch tests its resourceVersion, so an agent
    that published meanwhile is never overwritten (issue 21 item 11); on a conflict, re-read and decide again."""
    for _ in range(tries):
        try:
            run.label_node_if_unchanged(node, NODE_MODE_LABEL, p.mode)
        except kube_api.ConcurrentEditError:
            fresh = next((n for n in kube_api.list_nodes()
                          if (n.get("metadata") or {}).get("name") == p.node), None)
            if fresh is None:
                return
            if _agent_published(fresh):
                label = ((fresh.get("metadata") or {}).get("labels") or {}).get(NODE_MODE_LABEL, "(empty)")
                print(f"node {p.node}: label {NODE_MODE_LABEL}={label} kept (the agent published it "
                      f"while install ran; the kernel rule says {p.mode})", file=sys.stderr)
                return
            node = fresh
            continue
        print(f"node {p.node}: label {NODE_MODE_LABEL}={p.mode}", file=sys.stderr)
        return
    raise kube_api.ConcurrentEditError(f"node {p.node}: changed on every one of {tries} tries to label it")


@hookimpl
def istio_ebpf_post_install(options: Options, plan: list[planmod.NodePlan] | None) -> None:
    # The plan is the kernel-version rule; an agent's label comes from real probes and wins
    # (it may have fallen back after a failed probe). Only nodes without such a label are labelled.
    run = journal.active()
    nodes = {(n.get("metadata") or {}).get("name"): n for n in kube_api.list_nodes()}
    agent_owned = {name for name, n in nodes.items() if _agent_published(n)}
    for p in plan or []:
        if p.node in agent_owned:
            if p.current_label != p.mode:
                shown = p.current_label or "(empty)"
                print(f"node {p.node}: label {NODE_MODE_LABEL}={shown} kept (set by the agent "
                      f"from its probes; the kernel rule says {p.mode})", file=sys.stderr)
            continue
        if p.current_label != p.mode:
            run.step(f"label node {p.node}")
            _label_unless_agent(run, nodes.get(p.node) or {"metadata": {"name": p.node}}, p)
    for doc in manifests.agent_documents():
        if doc.kind != "DaemonSet":
            continue
        ns, selector = doc.namespace, waits.selector_of(doc.data)
        since = drainmod.draining_since(drainmod.agent_pods(ns, selector))
        run.step(f"cancel drain {ns}")
        if drainmod.mark_agents(ns, selector, None):
            print("agent pods: the drain of an earlier 'istio-ebpf uninstall' is cancelled", file=sys.stderr)
        if since is not None:
            # A rollback restores the reverted injection, so the agents must drain again, from the same start.
            run.record(f"drain of agent pods in {ns} cancelled",
                       functools.partial(drainmod.mark_agents, ns, selector, since))
    timeout = float(Options.of(options).timeout)
    if timeout > 0:
        for doc in manifests.agent_documents():
            if doc.kind == "DaemonSet":
                run.step(f"rollout DaemonSet {doc.namespace}/{doc.name}")
                wait_for_daemonset(doc.data, timeout)


def daemonset_progress(ds: dict[str, Any]) -> tuple[bool, str]:
    status = ds.get("status") or {}
    meta = ds.get("metadata") or {}
    desired = int(status.get("desiredNumberScheduled") or 0)
    updated = int(status.get("updatedNumberScheduled") or 0)
    available = int(status.get("numberAvailable") or 0)
    observed = int(status.get("observedGeneration") or 0)
    current = observed >= int(meta.get("generation") or 0)
    done = current and updated >= desired and available >= desired
    return done, f"{updated}/{desired} updated, {available}/{desired} available"


def wait_for_daemonset(body: dict[str, Any], timeout: float, interval: float = 2.0,
                       clock=time.monotonic, sleep=time.sleep) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    name, ns = str(meta.get("name")), str(meta.get("namespace"))
    deadline = clock() + timeout
    last = ""
    while True:
        ds = kube_api.get_object(body.get("apiVersion", "apps/v1"), "DaemonSet", ns, name)
        if ds is None:
            raise PermanentError(f"DaemonSet {ns}/{name} disappeared during rollout")
        done, progress = daemonset_progress(ds)
        if progress != last:
            print(f"rollout {ns}/{name}: {progress}", file=sys.stderr)
            last = progress
        if done:
            return ds
        if clock() >= deadline:
            raise TemporaryError(f"rollout of DaemonSet {ns}/{name} not finished after {timeout:g}s ({progress})")
        sleep(interval)


@hookimpl
def istio_ebpf_status(options: Options, plan: list[planmod.NodePlan] | None) -> list[str]:
    lines: list[str] = []
    daemonset = next(d for d in manifests.agent_documents() if d.kind == "DaemonSet")
    agents = drainmod.agent_pods(daemonset.namespace, waits.selector_of(daemonset.data))
    since = drainmod.draining_since(agents)
    cms = kube_api.list_injector_configmaps()
    if not cms:
        lines.append("PROBLEM: no istio-sidecar-injector ConfigMap: is Istio installed?")
    for cm in cms:
        meta = cm.get("metadata") or {}
        where = f"ConfigMap {meta.get('namespace')}/{meta.get('name')}"
        config = (cm.get("data") or {}).get("config")
        if not isinstance(config, str):
            lines.append(f"PROBLEM: {where}: no data.config")
            continue
        data = injector_config.parse(config, where)
        ours = (data.get("templates") or {}).get(tpl.TEMPLATE_NAME)
        if ours is None and since is not None:
            lines.append(f"DRAINING: {where}: ebpf template removed by 'istio-ebpf uninstall' "
                         "(new pods get stock Istio)")
        elif ours is None:
            lines.append(f"PROBLEM: {where}: ebpf template missing (Istio installed or upgraded without it); "
                         "run 'istio-ebpf install'")
        elif not tpl.is_ours(ours):
            lines.append(f"PROBLEM: {where}: a template named ebpf exists but was not written by istio-ebpf")
        elif injector_config.add(config, where) != config:
            lines.append(f"PROBLEM: {where}: ebpf template is stale for this sidecar template "
                         "(Istio upgraded?); run 'istio-ebpf install'")
        elif (installed := ((meta.get("annotations") or {}).get(INSTALLED_ANNOTATION))) and installed != _sha(config):
            lines.append(f"PROBLEM: {where}: config changed since istio-ebpf installed it (sha256 differs from "
                         f"{INSTALLED_ANNOTATION}); review the change, then run 'istio-ebpf install'")
        else:
            lines.append(f"ok: {where}: ebpf template installed, defaultTemplates "
                         f"{injector_config.effective_defaults(data)}")
    for doc in manifests.agent_documents():
        ident = f"{doc.kind} {doc.namespace + '/' if doc.namespace else ''}{doc.name}"
        live = kube_api.get_object(doc.data.get("apiVersion", ""), doc.kind, doc.namespace or None, doc.name)
        if live is None:
            lines.append(f"PROBLEM: {ident}: not found")
        elif doc.kind == "DaemonSet":
            done, progress = daemonset_progress(live)
            lines.append(f"{'ok' if done else 'PROBLEM'}: {ident}: {progress}")
        else:
            lines.append(f"ok: {ident}: present")
    pods = drainmod.list_captured() if plan or since is not None else []
    now = time.time()
    for p in plan or []:
        if p.current_label in ("cookie", "podip") and p.rule_mode == "unsupported" and p.mode == "unsupported":
            lines.append(f"PROBLEM: node {p.node}: labelled {p.current_label} but kernel {p.kernel} "
                         "cannot capture")
        # Captured only while the node's agent pod is Ready and its heartbeat is fresh (docs/install.md, Status).
        st = planmod.node_state(p, [a for a in agents if (a.get("spec") or {}).get("nodeName") == p.node],
                                sum(1 for c in pods if c.node == p.node), now)
        prefix = "PROBLEM" if st.problem else "ok" if st.state in ("captured", "unsupported") else "note"
        lines.append(f"{prefix}: node {st.node}: {st.state}: {st.detail}")
    if since is not None:
        lines.append(f"DRAINING: 'istio-ebpf uninstall' began {since}: the agents keep capturing until no pod "
                     f"injected with the ebpf template runs; {len(pods)} left")
        lines += [f"DRAINING: pod {p}: still captured by eBPF; restart it" for p in pods]
    lines.append(f"pods: per-pod capture state on a node: {KUBECTL_COMMAND}")
    return lines


@hookimpl
def istio_ebpf_uninstall_cleanup(options: Options) -> None:
    # The drain first (install/drain.py): while a pod injected with the ebpf template runs, its
    # capture is the agent's alone, so the agent stays (or, --force, goes and the pods are named).
    opts = Options.of(options)
    timeout = opts.timeout
    daemonset = next(d for d in manifests.agent_documents() if d.kind == "DaemonSet")
    exists = kube_api.get_object(daemonset.data.get("apiVersion", ""), "DaemonSet", daemonset.namespace,
                                 daemonset.name) is not None
    uncaptured = drainmod.drain(daemonset.namespace, waits.selector_of(daemonset.data), timeout, bool(opts.force)) \
        if exists else []
    # Reverse install order, DaemonSet first (agent_documents() is in kind order). Its pods'
    # preStop hook detaches the programs with the agent's own token: RBAC, ServiceAccount and
    # Namespace must outlive them, so we wait until the pods are gone before going on.
    for doc in reversed(manifests.agent_documents()):
        gone = kube_api.delete_object(doc.data.get("apiVersion", ""), doc.kind, doc.namespace or None, doc.name)
        print(f"{doc.kind} {doc.name}: {'deleted' if gone else 'already absent'}", file=sys.stderr)
        if doc.kind == "DaemonSet" and timeout > 0 and waits.selector_of(doc.data):
            waits.wait_for_pods_gone(doc.namespace, waits.selector_of(doc.data), timeout)
        if doc.kind == "Namespace" and gone and timeout > 0:
            # Like `kubectl delete`: return once it is gone. A Terminating namespace refuses new
            # objects (403), so an install right after an uninstall would fail half-way.
            waits.wait_for_gone(doc.data.get("apiVersion", "v1"), "Namespace", None, doc.name, timeout)
    for node in kube_api.list_nodes():
        meta = node.get("metadata") or {}
        if NODE_MODE_LABEL in (meta.get("labels") or {}):
            kube_api.label_node(meta.get("name", ""), {NODE_MODE_LABEL: None})
    namespaces = {(cm.get("metadata") or {}).get("namespace") for cm in kube_api.list_injector_configmaps()}
    for ns in sorted(n for n in namespaces if n):
        kube_api.delete_object("v1", "ConfigMap", ns, BACKUP_CONFIGMAP)
    drainmod.warn_uncaptured(uncaptured)
