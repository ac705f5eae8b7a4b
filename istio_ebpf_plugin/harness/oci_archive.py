"""Docker-archive tarballs (``docker save`` format) written by hand, for ``ctr images import``.

The node lab's images are a few files each (a static binary, Envoy and its libraries), so a
hand-written single-layer archive is both smaller and faster than a build tool: one layer tar,
the image config (entrypoint, user, env) and ``manifest.json`` naming the tag.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ImageFile:
    path: str                 # absolute path inside the image
    source: str | None = None  # host file to copy; None with ``data`` for generated content
    data: bytes | None = None
    mode: int = 0o755


@dataclass
class ImageSpec:
    ref: str                                   # e.g. "k8s.gcr.io/pause:3.4"
    files: list[ImageFile]
    entrypoint: list[str]
    cmd: list[str] = field(default_factory=list)
    user: str = ""
    env: list[str] = field(default_factory=lambda: ["PATH=/usr/local/bin:/usr/bin:/bin"])


def _dirs_of(path: str) -> list[str]:
    parts = path.strip("/").split("/")[:-1]
    return ["/".join(parts[:i + 1]) for i in range(len(parts))]


def _layer(files: list[ImageFile]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        seen: set[str] = set()
        for f in sorted(files, key=lambda f: f.path):
            for d in _dirs_of(f.path):
                if d not in seen:
                    seen.add(d)
                    info = tarfile.TarInfo(d)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
                    tar.addfile(info)
            data = f.data if f.data is not None else Path(f.source or "").read_bytes()
            info = tarfile.TarInfo(f.path.lstrip("/"))
            info.size, info.mode, info.mtime = len(data), f.mode, 0
            tar.addfile(info, io.BytesIO(data))
        for d in ("tmp",):   # programs expect a writable /tmp (mounted over by the runtime if asked)
            if d not in seen:
                info = tarfile.TarInfo(d)
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o1777, 0
                tar.addfile(info)
    return buf.getvalue()


def write(spec: ImageSpec, out: Path) -> Path:
    """Write ``spec`` as a docker-archive at ``out`` (atomically) and return it."""
    layer = _layer(spec.files)
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = {
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": spec.entrypoint, "Cmd": spec.cmd or None, "Env": spec.env,
                   "User": spec.user, "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "istio-ebpf node lab (hand-written docker-archive)"}],
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    layer_name = diff_id.split(":", 1)[1] + "/layer.tar"
    manifest = [{"Config": config_name, "RepoTags": [spec.ref], "Layers": [layer_name]}]
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    with tarfile.open(tmp, mode="w") as tar:
        for name, data in ((config_name, config_bytes), (layer_name, layer),
                           ("manifest.json", json.dumps(manifest).encode())):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, out)
    return out
