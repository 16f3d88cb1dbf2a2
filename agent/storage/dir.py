"""`dir` storage: a plain directory per container on the host's local disk.

Fast and simple; moved between hosts with rsync. It cannot enforce a disk size
(the size is accounted for placement only).
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from corral.errors import AlreadyExists


class DirStorage:
    name = "dir"
    enforces_disk_limit = False

    def __init__(self, root: Path) -> None:
        self.root = root

    def volume_dir(self, container: str) -> Path:
        return self.root / container

    def rootfs(self, container: str) -> Path:
        return self.volume_dir(container) / "rootfs"

    async def create_volume(self, container: str, size_bytes: int) -> Path:
        rootfs = self.rootfs(container)
        if self.volume_dir(container).exists():
            raise AlreadyExists(f"storage for {container!r} already exists at {self.volume_dir(container)}")
        rootfs.mkdir(parents=True, mode=0o755)
        return rootfs

    async def destroy_volume(self, container: str) -> None:
        path = self.volume_dir(container)
        if path.exists():
            # Removing a rootfs can take seconds: not on the event loop.
            await asyncio.to_thread(shutil.rmtree, path)
