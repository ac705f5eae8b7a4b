"""Kernel release parsing and the capture-mode rule.

One rule, used by the node agent (with feature probes on top) and by the
installer's rollout plan (from ``status.nodeInfo.kernelVersion``):

* ``cookie``      kernel >= 5.15: netns/socket cookie helpers exist in sockops,
                  sk_msg and cgroup getsockopt, so map keys carry the netns cookie.
* ``podip``       5.9 <= kernel < 5.15: the connect hook binds the app socket to
                  the pod IP (``bpf_bind``) so tuples are unique per node.
* ``unsupported`` below 5.9: inbound capture needs sk_lookup (5.9), and hiding
                  the redirect from applications (getpeername/getsockname as
                  under iptables) needs the cgroup getpeername/getsockname
                  hooks (5.8). A 5.7/5.8 kernel keeps iptables rather than
                  show applications loopback addresses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import UsageError

MODES = ("cookie", "podip", "unsupported")
COOKIE_MIN = (5, 15)
PODIP_MIN = (5, 9)

# major.minor[.patch[.extra]] followed by anything a distribution appends
# ("-1034-aws", ".el8_8.x86_64", "+", "-microsoft-standard-WSL2").
_RELEASE = re.compile(r"^\s*v?(\d{1,3})\.(\d{1,3})(?:\.(\d{1,6}))?(?:\.\d{1,6})?(?=$|[-+._~\s])")


@dataclass(frozen=True)
class KernelVersion:
    major: int
    minor: int
    patch: int
    release: str

    @property
    def tuple(self) -> tuple[int, int, int]:
        return (self.major, self.minor, self.patch)

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


def parse_release(release: str) -> KernelVersion:
    """Parse a ``uname -r`` style string; :class:`UsageError` when it is not one."""
    if not isinstance(release, str) or len(release) > 256:
        raise UsageError(f"unparseable kernel release: {str(release)[:60]!r}")
    m = _RELEASE.match(release)
    if not m:
        raise UsageError(f"unparseable kernel release: {release[:60]!r}")
    major, minor = int(m.group(1)), int(m.group(2))
    patch = int(m.group(3) or 0)
    if major == 0 or major > 99:
        raise UsageError(f"unparseable kernel release: {release[:60]!r}")
    return KernelVersion(major, minor, patch, release.strip())


def mode_for_version(version: KernelVersion) -> str:
    """The version rule alone (no probing)."""
    if version.tuple[:2] >= COOKIE_MIN:
        return "cookie"
    if version.tuple[:2] >= PODIP_MIN:
        return "podip"
    return "unsupported"


def mode_for_release(release: str) -> str:
    return mode_for_version(parse_release(release))


def validate_mode(mode: str, allow_auto: bool = True) -> str:
    allowed = MODES + (("auto",) if allow_auto else ())
    if mode not in allowed:
        raise UsageError(f"unknown mode {mode!r}: choose one of {', '.join(allowed)}")
    return mode
