"""Feature-probe verdicts cached in the pin directory, so a restarted agent does not compile again.

A probe compiles and loads tiny programs (BCC: seconds, and LLVM's memory). Their verdicts only
change with the kernel or the probe programs, so they are kept under the pin root, keyed by
the kernel (release and build string) and a hash of the probe sources:
``<pin_root>/probes_<key>/<probe>=<0|1>``. bpffs holds no regular files, only directories and
pinned objects, so each verdict is a directory name. The cheap checks (cgroup v2, bpffs,
SO_NETNS_COOKIE) are never cached. A failed compile is not cached (missing headers are
fixable); forced failures (ISTIO_EBPF_PROBE_FAIL) apply on top of cached verdicts.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Callable

from . import probe

log = logging.getLogger(__name__)

#: bpffs refuses "." in names (reserved), hence "_" separators.
PREFIX = "probes_"


def cache_key(release: str | None = None, build: str | None = None) -> str:
    uname = os.uname()
    h = hashlib.sha256()
    for part in (release or uname.release, build or uname.version, probe.probe_source_fingerprint()):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _dir(pin_root: str | Path, key: str) -> Path:
    return Path(pin_root) / f"{PREFIX}{key}"


def read(pin_root: str | Path, key: str | None = None) -> dict[str, bool] | None:
    """Cached program-probe verdicts for this kernel, or None."""
    d = _dir(pin_root, key or cache_key())
    try:
        names = [p.name for p in d.iterdir()]
    except OSError:
        return None
    out: dict[str, bool] = {}
    for name in names:
        feature, sep, value = name.rpartition("=")
        if sep and value in ("0", "1"):
            out[feature] = value == "1"
    return out if out.get("bcc_compile") else None


def write(pin_root: str | Path, verdicts: dict[str, bool], key: str | None = None) -> bool:
    """Store verdicts (atomically: built aside, then renamed). False when the root is not writable."""
    key = key or cache_key()
    final = _dir(pin_root, key)
    tmp = Path(pin_root) / f"{PREFIX}{key}_tmp{os.getpid()}"
    try:
        Path(pin_root).mkdir(parents=True, exist_ok=True)
        for stale in Path(pin_root).glob(f"{PREFIX}*"):
            if stale.name != final.name:          # another kernel's or probe set's verdicts
                shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        for feature, ok in sorted(verdicts.items()):
            (tmp / f"{feature}={1 if ok else 0}").mkdir()
        os.rename(tmp, final)
        return True
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if final.exists():
            return True                            # a concurrent writer won: same verdicts
        log.warning("probe cache not written under %s: %s", pin_root, exc)
        return False


def discard(pin_root: str | Path) -> None:
    """Drop the cache (and the pin root when nothing else is in it): a node that keeps iptables pins nothing."""
    root = Path(pin_root)
    for d in root.glob(f"{PREFIX}*"):
        shutil.rmtree(d, ignore_errors=True)
    try:
        root.rmdir()
    except OSError:
        pass


def probe_features(pin_root: str | Path,
                   run_probes: Callable[[], dict[str, bool]] | None = None) -> tuple[dict[str, bool], bool]:
    """(features, from_cache): program probes from the cache when present, else run and cache them."""
    cached = read(pin_root)
    if cached is not None:
        return probe.with_cheap_checks(cached), True
    verdicts = (run_probes or probe.probe_programs_isolated)()
    if verdicts.get("bcc_compile"):
        write(pin_root, verdicts)
    return probe.with_cheap_checks(verdicts), False   # a failed compile keeps its reason
