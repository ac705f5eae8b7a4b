"""A dict-backed stand-in for the datapath's BPF maps (``pod_entries.MapAccess``), no root needed.

Keys and values are stored as their bytes, as the kernel does, so the ctypes mirrors go
through the same copy in and copy out. A map given a capacity refuses a new key once full
with the kernel's errno (hash maps E2BIG, the LPM trie ``pod_cidrs`` ENOSPC); ``fail_update``
makes one chosen later update fail, to walk a failure through every step of a write.
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Any

from istio_ebpf_plugin.datapath.pod_entries import PodTable

#: The errno a full kernel map of this name returns (LPM tries: ENOSPC; hash maps: E2BIG).
FULL_ERRNO = {"pod_cidrs": errno.ENOSPC}


class FakeMaps:
    def __init__(self, capacity: dict[str, int] | None = None) -> None:
        self.tables: dict[str, dict[bytes, bytes]] = {}
        self.capacity = dict(capacity or {})
        self.updates = 0                              # update calls so far (failed ones too)
        self._fail_at: tuple[int, int] | None = None  # (update number, errno)

    def fail_update(self, nth: int, err: int = errno.ENOSPC) -> None:
        """The ``nth`` update from now (0: the next one) raises OSError(err), once."""
        self._fail_at = (self.updates + nth, err)

    def keys(self, name: str, key_type: Any) -> list[Any]:   # a ctypes type
        return [key_type.from_buffer_copy(raw) for raw in self.tables.get(name, {})]

    def lookup(self, name: str, key: Any, value: Any) -> bool:
        raw = self.tables.get(name, {}).get(bytes(key))
        if raw is None:
            return False
        ctypes.memmove(ctypes.addressof(value), raw, len(raw))
        return True

    def update(self, name: str, key: Any, value: Any) -> None:
        number = self.updates
        self.updates += 1
        if self._fail_at is not None and self._fail_at[0] == number:
            err = self._fail_at[1]
            self._fail_at = None
            raise OSError(err, f"map update: {os.strerror(err)}")
        table = self.tables.setdefault(name, {})
        raw = bytes(key)
        if raw not in table and len(table) >= self.capacity.get(name, 1 << 30):
            err = FULL_ERRNO.get(name, errno.E2BIG)
            raise OSError(err, f"map update: {os.strerror(err)}")
        table[raw] = bytes(value)

    def delete(self, name: str, key: Any) -> bool:
        return self.tables.get(name, {}).pop(bytes(key), None) is not None

    def snapshot(self) -> dict[str, dict[bytes, bytes]]:
        """Every non-empty map's entries (a copy: compare before and after)."""
        return {name: dict(table) for name, table in self.tables.items() if table}


def pod_table(fake: FakeMaps) -> PodTable:
    """A PodTable over the fake (mypy checks here that FakeMaps is a MapAccess)."""
    return PodTable(fake)
