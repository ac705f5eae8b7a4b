"""What the edit/revert hooks work on: one injector ConfigMap's ``config``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class InjectorEdit:
    """One injector ConfigMap's ``config`` on its way through the edit/revert hooks."""
    name: str
    namespace: str
    revision: str
    original: str
    config: str

    @property
    def changed(self) -> bool:
        return self.config != self.original

    def where(self) -> str:
        return f"ConfigMap {self.namespace + '/' if self.namespace else ''}{self.name}"
