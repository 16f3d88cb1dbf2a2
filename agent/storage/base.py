"""The one interface every storage driver implements."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class StorageDriver(Protocol):
    #: The name users pick with `--storage` and that is recorded per container.
    name: str
    #: Whether `disk_bytes` limits are enforced (a fixed-size volume) or only accounted.
    enforces_disk_limit: bool

    async def create_volume(self, container: str, size_bytes: int) -> Path:
        """Make an empty root filesystem for `container`; returns where it is mounted."""
        ...

    def rootfs(self, container: str) -> Path:
        """Where the container's root filesystem is visible on this host."""
        ...

    async def destroy_volume(self, container: str) -> None:
        """Remove the container's root filesystem and everything it holds."""
        ...
