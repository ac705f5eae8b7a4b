"""Just enough of Go's text/template syntax to cut pieces out of Istio's templates.

We never evaluate templates in Python; we only need to find actions
(``{{ ... }}``), match ``if/range/with/define/block`` with their ``end``, and
see which variables, named templates and functions a piece refers to.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import UsageError

_OPENERS = ("if", "range", "with", "define", "block")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Action:
    start: int
    end: int
    text: str       # the whole "{{ ... }}"
    inner: str      # body without trim markers and surrounding blanks

    @property
    def keyword(self) -> str:
        m = _IDENT.match(self.inner)
        return m.group(0) if m else ""


def _scan_action(text: str, i: int) -> int:
    """Offset just past the ``}}`` closing the action opened at ``i`` (strings may hold braces)."""
    j = i + 2
    n = len(text)
    while j < n:
        c = text[j]
        if c == "`":
            k = text.find("`", j + 1)
            if k < 0:
                break
            j = k + 1
        elif c == '"':
            j += 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            j += 1
        elif text.startswith("/*", j):
            k = text.find("*/", j + 2)
            if k < 0:
                break
            j = k + 2
        elif text.startswith("}}", j):
            return j + 2
        else:
            j += 1
    raise UsageError("template has an unterminated action '{{'")


def actions(text: str) -> list[Action]:
    out = []
    i = text.find("{{")
    while i >= 0:
        end = _scan_action(text, i)
        body = text[i + 2:end - 2]
        inner = body
        if inner[:1] == "-" and (len(inner) == 1 or inner[1] in " \t\r\n"):
            inner = inner[1:]
        if inner[-1:] == "-" and (len(inner) == 1 or inner[-2] in " \t\r\n"):
            inner = inner[:-1]
        out.append(Action(i, end, text[i:end], inner.strip()))
        i = text.find("{{", end)
    return out


def matching_end(text: str, after: int, depth: int = 1) -> Action:
    """The ``end`` action that closes the block open at offset ``after`` (``depth`` levels deep)."""
    for act in actions(text[after:]):
        kw = act.keyword
        if act.inner.startswith("/*"):
            continue
        if kw in _OPENERS:
            depth += 1
        elif kw == "end":
            depth -= 1
            if depth == 0:
                return Action(act.start + after, act.end + after, act.text, act.inner)
    raise UsageError("template has an unterminated block")


def define_block(text: str, name: str) -> str | None:
    """The full ``{{ define "name" }} ... {{ end }}`` text, or ``None``."""
    for act in actions(text):
        if act.keyword == "define" and re.fullmatch(r'define\s+"%s"' % re.escape(name), act.inner):
            end = matching_end(text, act.end)
            return text[act.start:end.end]
    return None


def template_calls(text: str) -> list[str]:
    names = []
    for act in actions(text):
        m = re.match(r'(?:template|include)\s+"([^"]+)"', act.inner)
        if m and m.group(1) not in names:
            names.append(m.group(1))
        for m2 in re.finditer(r'\binclude\s+"([^"]+)"', act.inner):
            if m2.group(1) not in names:
                names.append(m2.group(1))
    return names


def variables_used(text: str) -> list[str]:
    """``$name`` variables read in ``text`` that are not declared in it."""
    used: list[str] = []
    declared: set[str] = set()
    for act in actions(text):
        for m in re.finditer(r"\$([A-Za-z_][A-Za-z0-9_]*)\s*(:?=)?", act.inner):
            name, assign = m.group(1), m.group(2)
            if assign == ":=":
                declared.add(name)
            elif name not in declared and name not in used:
                used.append(name)
        # range $i, $v := ... declares both
        rng = re.match(r"range\s+\$(\w+)\s*,\s*\$(\w+)\s*:=", act.inner)
        if rng:
            declared.update(rng.groups())
    return [v for v in used if v not in declared]


def variable_definition(text: str, name: str) -> Action | None:
    """The top-level ``{{ $name := ... }}`` action declaring ``name``."""
    for act in actions(text):
        if re.match(r"\$%s\s*:=" % re.escape(name), act.inner):
            return act
    return None


_KEYWORDS = {"if", "else", "end", "range", "with", "define", "block", "template", "break", "continue",
             "nil", "true", "false"}


def functions_used(text: str) -> set[str]:
    """Identifiers in command position (function names), ignoring fields, strings and keywords."""
    names: set[str] = set()
    for act in actions(text):
        inner = re.sub(r"`[^`]*`|\"(?:\\.|[^\"\\])*\"|/\*.*?\*/", " ", act.inner, flags=re.S)
        for m in re.finditer(r"(?:^|[\s(|])([A-Za-z_][A-Za-z0-9_]*)\b", inner):
            word = m.group(1)
            start = m.start(1)
            if start > 0 and inner[start - 1] in ".$":
                continue
            if word in _KEYWORDS:
                continue
            names.add(word)
    return names
