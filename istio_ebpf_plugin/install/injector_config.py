"""Minimal, reversible edits of the injector's ``config`` (the YAML in ``data.config``).

Edits are textual so that every existing template stays byte-identical, and
each one is checked by parsing: the result must equal the original plus our
template and the ``ebpf`` entry in ``defaultTemplates``, nothing else.

* ``templates:`` gains an ``ebpf: |`` entry (inserted as the first entry,
  with the indentation the existing entries use);
* ``defaultTemplates`` gains ``ebpf`` last: ``[sidecar]`` becomes
  ``[sidecar, ebpf]``; a block list gains a ``- ebpf`` line; when the key is
  absent (Istio then defaults to ``[sidecar]``) a line
  ``defaultTemplates: [sidecar, ebpf]  # istio-ebpf`` is added.

:func:`remove` undoes exactly those edits, so install then uninstall gives
back the original bytes.
"""

from __future__ import annotations

import re
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from ..errors import UsageError
from . import template as tpl

NAME = tpl.TEMPLATE_NAME
# Markers on lines we write whole, so uninstall can put back exactly what was there.
_ADDED_LINE = "  # istio-ebpf: added"
_WAS_EMPTY_FLOW = "  # istio-ebpf: was []"
_WAS_NULL = "  # istio-ebpf: was empty"


def parse(config: str, where: str = "config") -> dict[str, Any]:
    yaml = YAML(typ="safe", pure=True)
    try:
        data = yaml.load(config)
    except YAMLError as exc:
        from .manifests import yaml_error_summary

        raise UsageError(f"{where}: config is not valid YAML ({yaml_error_summary(exc)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(f"{where}: expected a mapping, got {type(data).__name__}")
    templates = data.get("templates") or {}
    if not isinstance(templates, dict) or not all(isinstance(v, str) for v in templates.values()):
        raise UsageError(f"{where}: 'templates' must map names to template strings")
    defaults = data.get("defaultTemplates")
    if defaults is not None and (not isinstance(defaults, list) or not all(isinstance(v, str) for v in defaults)):
        raise UsageError(f"{where}: 'defaultTemplates' must be a list of names")
    return data


def effective_defaults(data: dict[str, Any]) -> list[str]:
    # Istio uses [sidecar] when defaultTemplates is empty or missing.
    return list(data.get("defaultTemplates") or ["sidecar"])


def is_installed(config: str, where: str = "config") -> bool:
    data = parse(config, where)
    ours = (data.get("templates") or {}).get(NAME)
    return ours is not None and tpl.is_ours(ours) and NAME in effective_defaults(data)


def _top_key(config: str, key: str) -> re.Match | None:
    return re.search(rf"^{re.escape(key)}:[ \t]*(?P<rest>.*)$", config, re.M)


def _block_end(config: str, start: int) -> int:
    """End offset of the value that follows a top-level key line ending at ``start``."""
    pos = start
    for line in config[start:].splitlines(keepends=True):
        if line.strip() and not line[0].isspace() and not line.startswith("- ") and line.rstrip() != "-":
            break
        pos += len(line)
    # Trailing blank lines belong to whatever follows.
    while pos > start and config[:pos].endswith("\n\n"):
        pos -= 1
    return pos


def _indent_block(text: str, indent: str) -> str:
    return "".join(line if line in ("\n", "\r\n") else indent + line
                   for line in text.splitlines(keepends=True))


def _add_template(config: str, body: str, where: str) -> str:
    m = _top_key(config, "templates")
    if m is None:
        sep = "" if config.endswith("\n") or not config else "\n"
        return config + sep + "templates:\n" + _entry(body, "  ")
    rest = m.group("rest").strip()
    if rest == "{}":
        tail = config[m.end():]
        return config[:m.start()] + "templates:\n" + _entry(body, "  ") + (tail[1:] if tail.startswith("\n") else tail)
    if rest == "" or rest.startswith("#"):
        after = m.end() + 1
        if after > len(config):  # "templates:" is the very last line, without a newline
            return config + "\n" + _entry(body, "  ").rstrip("\n")
        nxt = re.search(r"^([ \t]*)\S", config[after:], re.M)
        indent = nxt.group(1) if nxt and nxt.group(1) else "  "
        return config[:after] + _entry(body, indent) + config[after:]
    raise UsageError(f"{where}: 'templates' is written in a layout we cannot edit safely")


def _entry(body: str, indent: str) -> str:
    # "|" keeps the final newline; "|2"-style indicators are not needed because
    # our template never starts with a space.
    return f"{indent}{NAME}: |\n" + _indent_block(body if body.endswith("\n") else body + "\n", indent + "  ")


def _add_default(config: str, where: str) -> str:
    m = _top_key(config, "defaultTemplates")
    if m is None:
        return f"defaultTemplates: [sidecar, {NAME}]{_ADDED_LINE}\n" + config
    rest = m.group("rest")
    start = m.start("rest")
    flow = re.match(r"^\[(?P<items>[^\]]*)\](?P<tail>.*)$", rest)
    if flow:
        items = flow.group("items")
        if not items.strip():  # [] means Istio's default, [sidecar]
            if flow.group("tail").strip():
                raise UsageError(f"{where}: 'defaultTemplates' is written in a layout we cannot edit safely")
            return config[:start] + f"[sidecar, {NAME}]{_WAS_EMPTY_FLOW}" + config[m.end():]
        return config[:start] + "[" + f"{items}, {NAME}" + "]" + flow.group("tail") + config[m.end():]
    if rest.strip() == "" or rest.strip().startswith("#"):
        end = _block_end(config, m.end() + 1)
        block = config[m.end() + 1:end]
        items = [ln for ln in block.splitlines() if ln.strip().startswith("-")]
        if not items:
            if rest.strip():
                raise UsageError(f"{where}: 'defaultTemplates' is written in a layout we cannot edit safely")
            space = "" if config[start - 1:start] in (" ", "\t") else " "
            return config[:start] + f"{space}[sidecar, {NAME}]{_WAS_NULL}" + config[m.end():]
        indent = items[-1][:len(items[-1]) - len(items[-1].lstrip())]   # items all start with "-" after blanks
        addition = f"{indent}- {NAME}\n"
        if not block.endswith("\n"):
            addition = "\n" + addition.rstrip("\n")
        return config[:end] + addition + config[end:]
    raise UsageError(f"{where}: 'defaultTemplates' is written in a layout we cannot edit safely")


def _check(before: dict, after: dict, body: str | None, where: str) -> None:
    """After an edit (body given) or a removal (body None), only our two changes may differ."""
    tb, ta = dict(before.get("templates") or {}), dict(after.get("templates") or {})
    db, da = effective_defaults(before), effective_defaults(after)
    if body is not None:
        tb[NAME] = body
        if NAME not in db:
            db.append(NAME)
    else:
        tb.pop(NAME, None)
        db = [d for d in db if d != NAME]
    rest_b = {k: v for k, v in before.items() if k not in ("templates", "defaultTemplates")}
    rest_a = {k: v for k, v in after.items() if k not in ("templates", "defaultTemplates")}
    if ta != tb or da != db or rest_a != rest_b:
        raise UsageError(f"{where}: could not edit the injector config safely (unexpected layout)")


def add(config: str, where: str = "config") -> str:
    """``config`` with our template (built from its ``sidecar`` template) and default entry.

    Idempotent: a config that already has our current template is returned unchanged;
    an older template of ours is replaced.
    """
    data = parse(config, where)
    templates = data.get("templates") or {}
    sidecar = templates.get("sidecar")
    if sidecar is None:
        raise UsageError(f"{where}: no 'sidecar' template to build the ebpf template from")
    body = tpl.build(sidecar)
    existing = templates.get(NAME)
    if existing is not None and not tpl.is_ours(existing):
        raise UsageError(f"{where}: a template named {NAME!r} exists and was not written by istio-ebpf")
    if existing == body and NAME in effective_defaults(data):
        return config
    text = config
    if existing is not None:
        text = _remove_template(text, where)
    if NAME not in effective_defaults(data):
        text = _add_default(text, where)
    text = _add_template(text, body, where)
    after = parse(text, where)
    _check(data, after, body, where)
    return text


def _remove_template(config: str, where: str) -> str:
    m = re.search(rf"^(?P<indent>[ \t]+){re.escape(NAME)}:[ \t]*\|[-+0-9]*[ \t]*\n", config, re.M)
    if m is None:
        raise UsageError(f"{where}: cannot find the {NAME!r} template text to remove")
    indent = len(m.group("indent"))
    pos = m.end()
    for line in config[m.end():].splitlines(keepends=True):
        if line.strip() and len(line) - len(line.lstrip(" ")) <= indent:
            break
        pos += len(line)
    return config[:m.start()] + config[pos:]


def _remove_default(config: str, where: str) -> str:
    marker = re.escape(f"[sidecar, {NAME}]")
    added = re.search(rf"^defaultTemplates: {marker}{re.escape(_ADDED_LINE)}\n", config, re.M)
    if added:
        return config[:added.start()] + config[added.end():]
    was_flow = re.search(rf"^defaultTemplates:[ \t]*(?P<v>{marker}{re.escape(_WAS_EMPTY_FLOW)})", config, re.M)
    if was_flow:
        return config[:was_flow.start("v")] + "[]" + config[was_flow.end("v"):]
    was_null = re.search(rf"^defaultTemplates:(?P<v>[ \t]*{marker}{re.escape(_WAS_NULL)})", config, re.M)
    if was_null:
        return config[:was_null.start("v")] + config[was_null.end("v"):]
    m = _top_key(config, "defaultTemplates")
    if m is None:
        return config
    rest = m.group("rest")
    flow = re.match(r"^\[(?P<items>[^\]]*)\]", rest)
    if flow:
        items = flow.group("items")
        new = re.sub(rf"(,\s*)?\b{re.escape(NAME)}\b\s*$", "", items)
        if new == items:
            new = re.sub(rf"^\s*{re.escape(NAME)}\s*(,\s*)?", "", items)
        start = m.start("rest")
        return config[:start] + "[" + new + "]" + rest[flow.end():] + config[m.end():]
    end = _block_end(config, m.end() + 1)
    block = config[m.end() + 1:end]
    lines = block.splitlines(keepends=True)
    for i in range(len(lines) - 1, -1, -1):
        if re.fullmatch(rf"\s*-\s+{re.escape(NAME)}\s*\n?", lines[i]):
            del lines[i]
            break
    new_block = "".join(lines)
    if block and not block.endswith("\n") and new_block.endswith("\n"):
        new_block = new_block[:-1]
    return config[:m.end() + 1] + new_block + config[end:]


def remove(config: str, where: str = "config") -> str:
    """Undo :func:`add`; a config without our template is returned unchanged."""
    data = parse(config, where)
    existing = (data.get("templates") or {}).get(NAME)
    if existing is not None and not tpl.is_ours(existing):
        raise UsageError(f"{where}: the {NAME!r} template was not written by istio-ebpf; not removing it")
    text = config
    if existing is not None:
        text = _remove_template(text, where)
    if NAME in (data.get("defaultTemplates") or []):
        text = _remove_default(text, where)
    if text == config:
        return config
    _check(data, parse(text, where), None, where)
    return text
