"""Kernel header discovery for BCC, with an error that says what to do."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import KernelError

#: Checked in order; the DaemonSet mounts the host's /lib/modules and /usr/src.
ENV_OVERRIDE = "ISTIO_EBPF_KERNEL_HEADERS"
BCC_ENV = "BCC_KERNEL_SOURCE"


def find_kernel_headers(release: str | None = None, root: str = "/") -> Path:
    """Return the kernel build directory BCC will use, or raise KernelError.

    BCC looks in /lib/modules/<release>/build; the programs need only UAPI
    headers (linux/bpf.h, linux/in.h ...), so any recent header tree works.
    """
    release = release or os.uname().release
    override = os.environ.get(ENV_OVERRIDE)
    candidates = [Path(override)] if override else []
    candidates.append(Path(root) / "lib/modules" / release / "build")
    for path in candidates:
        if (path / "include" / "uapi" / "linux" / "bpf.h").exists() or \
                (path / "include" / "linux" / "bpf.h").exists() or \
                (path.resolve() / "include").is_dir():
            if override and path == candidates[0]:
                # BCC itself only reads /lib/modules/<release>/build or $BCC_KERNEL_SOURCE.
                os.environ.setdefault(BCC_ENV, str(path))
            return path
    tried = ", ".join(str(c) for c in candidates)
    raise KernelError(
        f"no kernel headers for {release}: looked in {tried}. Install the headers package for this "
        f"kernel (Debian: linux-headers-$(uname -r), or linux-headers-amd64 linked there by "
        f"'scripts/setup.sh host'); in Kubernetes mount the host's /lib/modules and /usr/src"
    )
