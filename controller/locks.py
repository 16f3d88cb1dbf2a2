"""One lock per container, taken by every path that changes it.

A request finding the container held gets a `Conflict` naming the holder at once
(as Incus does: "busy with operation X"), never a silent queue. Entries exist only
while held, so the table cannot grow with names that were never valid.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from corral.errors import Conflict


class ContainerLocks:
    def __init__(self) -> None:
        self._holders: dict[str, str] = {}
        self.changes = 0  # grows with every take and release (for caches of what depends on them)

    def holder(self, name: str) -> str | None:
        """What holds `name` (e.g. "operation mig-... (migrate)"), or None."""
        return self._holders.get(name)

    def take(self, name: str, holder: str) -> None:
        current = self._holders.get(name)
        if current is not None:
            raise Conflict(f"container {name!r} is busy with {current}")
        self._holders[name] = holder
        self.changes += 1

    def release(self, name: str, holder: str) -> None:
        if self._holders.get(name) == holder:
            del self._holders[name]
            self.changes += 1

    @contextlib.contextmanager
    def hold(self, name: str, holder: str) -> Iterator[None]:
        self.take(name, holder)
        try:
            yield
        finally:
            self.release(name, holder)
