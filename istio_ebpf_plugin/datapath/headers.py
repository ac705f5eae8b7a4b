"""Kernel header discovery for BCC, with an error that says what to do."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import KernelError

#: Checked in order; the DaemonSet mounts the host's /lib/modules and /usr/src.
ENV_OVERRIDE = "ISTIO_EBPF_KERNEL_HEADERS"


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
            return path
    tried = ", ".join(str(c) for c in candidates)
    raise KernelError(
        f"no kernel headers for {release}: looked in {tried}. Install the headers package for this "
        f"kernel (Debian: linux-headers-$(uname -r), or linux-headers-amd64 linked there by "
        f"'scripts/setup.sh host'); in Kubernetes mount the host's /lib/modules and /usr/src"
    )
