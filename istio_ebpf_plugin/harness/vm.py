"""Boot a Debian kernel with virtme-ng against this machine's own filesystem.

The kernel and its headers come from ``scripts/fetch-kernel.sh`` (a cache outside the clone),
virtme-ng from ``scripts/fetch-virtme.sh``. The guest sees the host's files read-only with
writable overlays, plus:

* the kernel's cache directory at :data:`GUEST_KERNEL_DIR` (virtme-ng hides ``/var/cache``), so
  the guest links ``/lib/modules/<release>`` there: ``modprobe`` finds the modules and BCC finds
  the guest kernel's own headers through the ``build`` link;
* one read-write directory through which results come back.

KVM is used when a guest actually boots with it (checked once per process with a short
timeout); otherwise TCG. On this VM kind KVM fails at once (``failed to set MSR 0x10a``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import KernelError

REPO = Path(__file__).resolve().parents[2]
GUEST_KERNEL_DIR = "/run/istio-ebpf-kernel"
KVM_CHECK_SECONDS = 45.0
_MARKER = "istio-ebpf-kvm-boot-ok"
_accel_cache: dict[str, str] = {}


@dataclass(frozen=True)
class GuestKernel:
    """An extracted Debian kernel: ``path/modules/boot/vmlinuz-<release>`` and its module tree."""

    release: str
    path: Path

    @property
    def image(self) -> Path:
        # virtme-ng derives the release (and so the module tree) from this file name
        return self.path / "modules" / "boot" / f"vmlinuz-{self.release}"


def _script(name: str, *args: str, timeout: float = 900) -> str:
    proc = subprocess.run(["bash", str(REPO / "scripts" / name), *args], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise KernelError(f"scripts/{name} {' '.join(args)} failed: {proc.stderr.strip()[-600:]}")
    return proc.stdout.strip().splitlines()[-1]


def fetch_kernel(suite: str) -> GuestKernel:
    """Download (once) and extract the newest kernel of a Debian suite."""
    path = Path(_script("fetch-kernel.sh", suite))
    return GuestKernel((path / "release").read_text().strip(), path)


def fetch_vng() -> Path:
    return Path(_script("fetch-virtme.sh"))


def _vng_argv(vng: Path, kernel: GuestKernel, command: str, accel: str, rwdir: Path | None,
              cpus: int, memory: str) -> list[str]:
    argv = [str(vng), "--run", str(kernel.image), "--cpus", str(cpus), "--memory", memory, "--verbose",
            "--rodir", f"{GUEST_KERNEL_DIR}={kernel.path}"]
    if rwdir is not None:
        argv += ["--rwdir", str(rwdir)]
    if accel == "tcg":
        argv.append("--disable-kvm")
    return argv + ["--exec", command]


def _run(argv: list[str], log_path: Path, timeout: float) -> tuple[int | None, float]:
    """Run virtme-ng in its own session; kill that session (only it) on timeout."""
    env = dict(os.environ, PATH=f"{Path(argv[0]).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    started = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                cwd=str(REPO), env=env, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    return rc, time.monotonic() - started


def detect_accel(vng: Path, kernel: GuestKernel, work: Path) -> str:
    """"kvm" when a KVM guest boots and runs a command within KVM_CHECK_SECONDS, else "tcg"."""
    if kernel.release in _accel_cache:
        return _accel_cache[kernel.release]
    accel = "tcg"
    if os.path.exists("/dev/kvm") and os.environ.get("ISTIO_EBPF_VM_ACCEL") != "tcg":
        log = work / "kvm-check.log"
        _run(_vng_argv(vng, kernel, f"echo {_MARKER}", "kvm", None, 1, "512M"), log, KVM_CHECK_SECONDS)
        if _MARKER in log.read_text(errors="replace").split("virtme-ng-init: starting script")[-1]:
            accel = "kvm"
    _accel_cache[kernel.release] = accel
    return accel


def boot(vng: Path, kernel: GuestKernel, command: str, *, rwdir: Path, accel: str, timeout: float,
         log_path: Path, cpus: int = 2, memory: str = "3G") -> tuple[int | None, float]:
    """Boot ``kernel``, run ``command`` (a shell line) as root, power off.

    Returns (virtme-ng's exit code or None on timeout, seconds). The command's own verdict must
    come back through ``rwdir``: virtme-ng's exit code is not the command's on every version.
    """
    return _run(_vng_argv(vng, kernel, command, accel, rwdir, cpus, memory), log_path, timeout)
