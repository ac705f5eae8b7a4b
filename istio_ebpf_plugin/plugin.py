"""The public plugin API of istio-ebpf (in the manner of tox 4's ``tox.plugin``).

A third-party plugin is a module with functions named after the hook specifications
(:mod:`istio_ebpf_plugin.hookspecs`) and marked ``@hookimpl``, registered through an entry
point in the group :data:`NAME`::

    # pyproject.toml of the plugin
    [project.entry-points.istio_ebpf]
    myplugin = "my_package.my_module"

    # my_package/my_module.py
    from istio_ebpf_plugin.plugin import hookimpl

    @hookimpl
    def istio_ebpf_transform_manifests(stream, options, plan): ...

Setting ``ISTIO_EBPF_BLOCKED_PLUGINS=myplugin,ebpf`` (entry-point names, comma separated)
keeps plugins from loading, the built-in one (``ebpf``) included. Hooks receive an
:class:`Options` (central defaults; options a plugin added are attributes too).
:func:`documents` turns YAML into the documents ``istio_ebpf_agent_manifests`` returns.
Only the names in ``__all__`` are public; everything under ``install/`` is internal.
A complete example: ``docs/example-plugin/``.
"""

from __future__ import annotations

import pluggy

from .install.manifests import Document, split
from .install.options import Options

#: Project name: the pluggy project and the entry-point group plugins register in.
NAME = "istio_ebpf"
#: Marks a hook implementation.
hookimpl = pluggy.HookimplMarker(NAME)
#: Marks a hook specification (used by :mod:`istio_ebpf_plugin.hookspecs`).
hookspec = pluggy.HookspecMarker(NAME)
#: Environment variable: comma-separated plugin (entry-point) names not to load.
BLOCKED_PLUGINS_ENV = "ISTIO_EBPF_BLOCKED_PLUGINS"



def documents(text: str, source: str = "plugin") -> list[Document]:
    """Multi-document YAML as the documents the manifest hooks take and return."""
    return split(text, source).documents


__all__ = ["NAME", "hookimpl", "hookspec", "BLOCKED_PLUGINS_ENV", "Options", "Document", "documents"]
