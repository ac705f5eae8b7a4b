"""An example istio-ebpf plugin: ``--owner-configmap NAME`` adds a ConfigMap naming the owner.

It uses only the public API (:mod:`istio_ebpf_plugin.plugin`): it adds an option to
``render`` and ``install`` and contributes one manifest next to the agent's.
"""

from __future__ import annotations

import argparse

from istio_ebpf_plugin.plugin import Document, Options, documents, hookimpl

CONFIGMAP = """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: istio-ebpf-owner
  namespace: istio-ebpf
data:
  owner: {owner}
"""


@hookimpl
def istio_ebpf_add_options(parser: argparse.ArgumentParser, command: str) -> None:
    if command in ("render", "install"):
        parser.add_argument("--owner-configmap", default=None, metavar="NAME",
                            help="add a ConfigMap istio-ebpf/istio-ebpf-owner naming this owner")


@hookimpl
def istio_ebpf_agent_manifests(options: Options, plan: object) -> list[Document]:
    owner = getattr(options, "owner_configmap", None)   # our own option: None when not given
    if not owner:
        return []
    return documents(CONFIGMAP.format(owner=owner), "istio-ebpf-example")
