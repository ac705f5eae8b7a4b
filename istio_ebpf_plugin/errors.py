"""Error classes shared by every front end.

The CLI turns :class:`UsageError` into a one-line message and exit code 2;
kopf-style, API errors are classified as permanent (do not retry) or temporary
(retry with back-off).
"""


class IstioEbpfError(Exception):
    """Base class: every error we raise on purpose."""


class UsageError(IstioEbpfError):
    """Bad input from the user (arguments, files, manifests). Exit code 2."""


class PermanentError(IstioEbpfError):
    """Retrying cannot help (forbidden, not found, invalid object)."""


class TemporaryError(IstioEbpfError):
    """Retrying may help (conflict, timeout, 5xx, connection refused)."""

    def __init__(self, message: str, delay: float = 1.0) -> None:
        super().__init__(message)
        self.delay = delay


class KernelError(IstioEbpfError):
    """The kernel cannot do what was asked (missing headers, feature, permission)."""
