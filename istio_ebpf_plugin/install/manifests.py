"""Multi-document YAML streams, edited without disturbing what we do not change.

The stream is split textually on ``---`` lines, so a document we leave alone
is written back byte for byte. Changed documents are edited in place: the
injector ConfigMap's ``config`` block scalar is re-indented and swapped, and
the result is parsed again to prove only that value changed.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError
from ruamel.yaml.scalarstring import LiteralScalarString

from .. import resources
from ..errors import UsageError

INJECTOR_PREFIX = "istio-sidecar-injector"
_SEPARATOR = re.compile(r"^---(?:[ \t].*)?$")


@dataclass
class Document:
    separator: str          # the "---..." line (with its newline) that opened it, or ""
    text: str               # the body, exactly as read
    index: int              # position in the stream (0-based)
    data: Any = None        # parsed (safe) content; None for an empty document
    changed: bool = False

    @property
    def kind(self) -> str:
        return str(self.data.get("kind", "")) if isinstance(self.data, dict) else ""

    @property
    def name(self) -> str:
        meta = self.data.get("metadata") if isinstance(self.data, dict) else None
        return str(meta.get("name", "")) if isinstance(meta, dict) else ""

    @property
    def namespace(self) -> str:
        meta = self.data.get("metadata") if isinstance(self.data, dict) else None
        return str(meta.get("namespace") or "") if isinstance(meta, dict) else ""

    def identity(self) -> tuple[str, str, str, str]:
        api = str(self.data.get("apiVersion", "")) if isinstance(self.data, dict) else ""
        group = api.rsplit("/", 1)[0] if "/" in api else ""
        return (group, self.kind, self.namespace, self.name)

    def where(self) -> str:
        label = f"{self.kind}/{self.name}" if self.kind else "document"
        return f"{label} (document {self.index + 1})"


@dataclass
class Stream:
    documents: list[Document] = field(default_factory=list)

    def text(self) -> str:
        out = []
        for doc in self.documents:
            out.append(doc.separator)
            out.append(doc.text)
        return "".join(out)


def _safe_load(text: str, where: str) -> Any:
    yaml = YAML(typ="safe", pure=True)
    try:
        return yaml.load(text)
    except YAMLError as exc:
        raise UsageError(f"{where}: not valid YAML ({yaml_error_summary(exc)})") from None


def yaml_error_summary(exc: Exception) -> str:
    """One line: the problem and where it is."""
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None)
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if problem:
        # The problem text can quote the offending key or value, newlines included.
        text = " ".join(str(problem).split())
        return f"{text} at line {mark.line + 1}" if mark is not None else text
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def split(text: str, source: str = "input") -> Stream:
    """Split a multi-document stream; every document must be a mapping (or empty)."""
    chunks: list[tuple[str, list[str]]] = [("", [])]
    for line in text.splitlines(keepends=True):
        if _SEPARATOR.match(line.rstrip("\r\n")):
            chunks.append((line, []))
        else:
            chunks[-1][1].append(line)
    stream = Stream()
    for i, (sep, lines) in enumerate(chunks):
        if i == 0 and not lines:
            continue
        doc = Document(sep, "".join(lines), len(stream.documents))
        body = doc.text
        if sep.strip() not in ("", "---"):
            body = sep[3:] + body  # "--- !tag" or "--- {a: 1}" carries content
        doc.data = _safe_load(body, f"{source}: document {doc.index + 1}")
        if doc.data is not None and not isinstance(doc.data, dict):
            raise UsageError(f"{source}: document {doc.index + 1} is not a Kubernetes object (a YAML mapping)")
        stream.documents.append(doc)
    return stream


def read_text(path: str) -> tuple[str, str]:
    """(text, label) of a file or ``-`` for standard input."""
    import sys

    if path == "-":
        raw = sys.stdin.buffer.read()
        label = "stdin"
    else:
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
        label = path
    try:
        return raw.decode("utf-8"), label
    except UnicodeDecodeError:
        raise UsageError(f"{label}: not UTF-8 text") from None


def injector_revision(name: str) -> str | None:
    """'' for istio-sidecar-injector, 'canary' for istio-sidecar-injector-canary, None otherwise."""
    if name == INJECTOR_PREFIX:
        return ""
    if name.startswith(INJECTOR_PREFIX + "-") and len(name) > len(INJECTOR_PREFIX) + 1:
        return name[len(INJECTOR_PREFIX) + 1:]
    return None


def injector_documents(stream: Stream, revision: str | None = None) -> list[Document]:
    """The injector ConfigMaps in the stream (one per revision), or a usage error."""
    found: list[Document] = []
    for doc in stream.documents:
        if doc.kind != "ConfigMap" or injector_revision(doc.name) is None:
            continue
        data = doc.data.get("data") if isinstance(doc.data, dict) else None
        if not isinstance(data, dict) or "config" not in data:
            continue
        if not isinstance(data["config"], str):
            raise UsageError(f"{doc.where()}: data.config is not a string")
        found.append(doc)
    if revision is not None:
        found = [d for d in found if injector_revision(d.name) == revision]
        if not found:
            raise UsageError(f"no injector ConfigMap for revision {revision or 'default'!r} in the input")
    if not found:
        raise UsageError("no istio-sidecar-injector ConfigMap (with data.config) in the input")
    seen: dict[str, Document] = {}
    for doc in found:
        if doc.name in seen:
            raise UsageError(f"ambiguous revisions: ConfigMap {doc.name} appears more than once "
                             f"(documents {seen[doc.name].index + 1} and {doc.index + 1}); use --revision")
        seen[doc.name] = doc
    return found


def _rt_yaml() -> YAML:
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 4096
    return yaml


def replace_config(doc: Document, new_config: str) -> None:
    """Swap ``data.config`` in ``doc.text``, keeping every other byte where possible."""
    old_config = doc.data["data"]["config"]
    if new_config == old_config:
        return
    text = doc.text
    try:
        rt = _rt_yaml().load(text)
        line, col = rt["data"].lc.key("config")
    except (YAMLError, KeyError, TypeError, AttributeError):
        raise UsageError(f"{doc.where()}: cannot locate data.config") from None
    lines = text.splitlines(keepends=True)
    new_text = None
    key_line = lines[line] if line < len(lines) else ""
    header = re.match(r"^(\s*config:\s*)\|(?P<chomp>[-+]?)(?P<ind>\d?)\s*(#.*)?$", key_line.rstrip("\r\n"))
    if header:
        chomp = header.group("chomp")
        # Content lines: until a non-blank line indented at or left of the key.
        end = line + 1
        last_content = line
        while end < len(lines):
            ln = lines[end]
            if ln.strip() and len(ln) - len(ln.lstrip(" ")) <= col:
                break
            if ln.strip():
                last_content = end
            end += 1
        content = lines[line + 1:last_content + 1]
        first = next((ln for ln in content if ln.strip()), None)
        indent = " " * (int(header.group("ind")) + col if header.group("ind") else
                        (len(first) - len(first.lstrip(" ")) if first else col + 2))
        body = new_config
        ok = (chomp == "-" and not body.endswith("\n")) or (chomp == "" and body.endswith("\n")
                                                             and not body.endswith("\n\n"))
        if ok and not body[:1].isspace():
            rendered = "".join(ln if ln in ("\n", "\r\n") else indent + ln
                               for ln in body.splitlines(keepends=True))
            if chomp == "-":
                rendered += "\n"
            new_text = "".join(lines[:line + 1]) + rendered + "".join(lines[last_content + 1:])
    if new_text is None:
        # Not a plain literal block (or chomping would lose bytes): re-serialise this document.
        rt["data"]["config"] = LiteralScalarString(new_config)
        buf = io.StringIO()
        _rt_yaml().dump(rt, buf)
        new_text = buf.getvalue()
    check = _safe_load(new_text, doc.where())
    expected = dict(doc.data)
    expected["data"] = dict(doc.data["data"], config=new_config)
    if check != expected:
        raise UsageError(f"{doc.where()}: could not rewrite data.config without changing anything else")
    doc.text = new_text
    doc.data = check
    doc.changed = True


# --- agent manifests -----------------------------------------------------------------------

def manifests_dir() -> Path:
    return resources.manifests_dir()


# Build-tool files that live beside the manifests but are not cluster objects.
_NOT_OBJECTS = ("kustomize.config.k8s.io/",)


#: Apply order by kind (Helm's install order): an object's dependencies come before it, so
#: ``render | kubectl apply -f -`` works on a fresh cluster. Deletion runs in reverse.
KIND_ORDER = ("Namespace", "NetworkPolicy", "ResourceQuota", "LimitRange", "PodSecurityPolicy",
              "PodDisruptionBudget", "ServiceAccount", "Secret", "ConfigMap", "StorageClass",
              "PersistentVolume", "PersistentVolumeClaim", "CustomResourceDefinition", "ClusterRole",
              "ClusterRoleBinding", "Role", "RoleBinding", "Service", "DaemonSet", "Pod",
              "ReplicationController", "ReplicaSet", "Deployment", "HorizontalPodAutoscaler", "StatefulSet",
              "Job", "CronJob", "Ingress", "APIService", "MutatingWebhookConfiguration",
              "ValidatingWebhookConfiguration")


def kind_rank(kind: str) -> int:
    """Position of ``kind`` in :data:`KIND_ORDER`; unknown kinds (custom resources) go last."""
    return KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER)


def agent_documents(directory: Path | None = None) -> list[Document]:
    """Every object of every ``*.yaml`` in the manifests directory, in apply order (:data:`KIND_ORDER`).

    Files are read sorted by name; the sort by kind is stable. A ``kustomization.yaml`` is
    skipped: it configures kustomize, it is not applied. A missing or empty directory is an
    error: rendering without the agent would be a silently partial result.
    """
    directory = directory or manifests_dir()
    files = sorted(directory.glob("*.yaml")) if directory.is_dir() else []
    if not files:
        raise UsageError(f"agent manifests not found: no *.yaml in {directory}")
    docs: list[Document] = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read agent manifest {path}: {exc}") from None
        for doc in split(text, str(path)).documents:
            if doc.data is None or str(doc.data.get("apiVersion", "")).startswith(_NOT_OBJECTS):
                continue
            body = doc.text if doc.text.endswith("\n") else doc.text + "\n"
            docs.append(Document("---\n", body, 0, doc.data))
    if not docs:
        raise UsageError(f"agent manifests not found: no Kubernetes object in {directory}")
    docs.sort(key=lambda d: kind_rank(d.kind))
    for i, doc in enumerate(docs):
        doc.index = i
    return docs


def _pod_template_containers(data: Any) -> list:
    spec = (((data.get("spec") or {}).get("template") or {}).get("spec") or {})
    return [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]


def set_daemonset_image(doc: Document, image: str, repository: str | None = None) -> None:
    """Point the containers of a DaemonSet document at ``image`` (only those whose image is in
    ``repository`` when given); the document stays byte for byte when nothing changes."""
    def wanted(container: Any) -> bool:
        current = str(container.get("image", ""))
        return current != image and (repository is None or current.startswith(repository + ":"))

    if not any(wanted(c) for c in _pod_template_containers(doc.data)):
        return
    rt = _rt_yaml().load(doc.text)
    for container in _pod_template_containers(rt):
        if wanted(container):
            container["image"] = image
    _dump_rt(doc, rt)


def _dump_rt(doc: Document, rt: Any) -> None:
    buf = io.StringIO()
    _rt_yaml().dump(rt, buf)
    doc.text = buf.getvalue()
    doc.data = _safe_load(doc.text, doc.where())
    doc.changed = True


def set_daemonset_selinux_type(doc: Document, selinux_type: str) -> None:
    """``spec.template.spec.securityContext.seLinuxOptions.type`` of a DaemonSet document (every
    container of the pod runs with that SELinux type, e.g. ``spc_t``). Re-serialises that document."""
    rt = _rt_yaml().load(doc.text)
    spec = rt["spec"]["template"]["spec"]
    security = spec.setdefault("securityContext", {})
    security.setdefault("seLinuxOptions", {})["type"] = selinux_type
    _dump_rt(doc, rt)


def set_daemonset_env(doc: Document, name: str, value: str) -> None:
    """Set ``name=value`` in every container of a DaemonSet document, and in every init container
    that declares ``name`` already (the agent's prepare step must agree with the agent; the bpffs
    mount does not need it). Re-serialises that document."""
    rt = _rt_yaml().load(doc.text)
    spec = ((rt.get("spec") or {}).get("template") or {}).get("spec") or {}
    containers = list(spec.get("containers") or []) + \
        [c for c in spec.get("initContainers") or [] if any(e.get("name") == name for e in c.get("env") or [])]
    for container in containers:
        env = container.setdefault("env", [])
        for item in env:
            if item.get("name") == name:
                item["value"] = value
                item.pop("valueFrom", None)
                break
        else:
            env.append({"name": name, "value": value})
    _dump_rt(doc, rt)


def merge_agent(stream: Stream, agent: list[Document]) -> None:
    """Put the agent's documents in the stream: replace same-identity ones in place, append the rest."""
    index = {d.identity(): d for d in stream.documents if d.data is not None}
    for doc in agent:
        existing = index.get(doc.identity())
        if existing is not None:
            if existing.text != doc.text:
                existing.text = doc.text
                existing.data = doc.data
                existing.changed = True
            continue
        if stream.documents and not stream.documents[-1].text.endswith("\n") and stream.documents[-1].text:
            stream.documents[-1].text += "\n"
        stream.documents.append(Document("---\n", doc.text, len(stream.documents), doc.data, changed=True))
