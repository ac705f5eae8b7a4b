"""Copies of the files pod processes execute, where their UIDs can read them.

Pod processes run as UID 1000 (apps) and 1337 (Envoy). The project may live in
a directory those UIDs cannot traverse (CI clones into a 0700 temporary
directory), so scripts and the Envoy binary are staged once into a
world-readable directory and executed from there.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

STAGE_ROOT = Path("/var/tmp/istio-ebpf-stage")


def staged(path: str | Path, executable: bool = False) -> str:
    """Path of a readable (and, if asked, executable) copy of path; copied once per content."""
    src = Path(path).resolve()
    st = src.stat()
    tag = hashlib.sha1(f"{src}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target_dir = STAGE_ROOT / tag
    target = target_dir / src.name
    if target.exists() and target.stat().st_size == st.st_size:
        return str(target)
    STAGE_ROOT.mkdir(mode=0o755, exist_ok=True)
    os.chmod(STAGE_ROOT, 0o755)
    target_dir.mkdir(mode=0o755, exist_ok=True)
    os.chmod(target_dir, 0o755)
    tmp = target_dir / f".{src.name}.{os.getpid()}"
    shutil.copyfile(src, tmp)
    os.chmod(tmp, 0o755 if executable else 0o644)
    os.replace(tmp, target)   # atomic: a concurrent run never sees half a file
    return str(target)
