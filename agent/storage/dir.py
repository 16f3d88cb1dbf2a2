"""`dir` storage: a plain directory per container on the host's local disk.

Fast and simple; moved between hosts with rsync. It cannot enforce a disk size
(the size is accounted for placement only). Local: there is nothing to attach or
detach, the volume is where it was made.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from corral.errors import AlreadyExists, FailedPrecondition, NotFound

_LOCAL = "dir storage is local; it is moved by copying"


class DirStorage:
    name = "dir"
    enforces_disk_limit = False
    shared = False

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
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        # The volume's own directory is root's alone (privileged containers: README, Privileges);
        # the rootfs keeps the mode a container's / has.
        self.volume_dir(container).mkdir(mode=0o700)
        rootfs.mkdir(mode=0o755)
        return rootfs

    async def destroy_volume(self, container: str) -> None:
        path = self.volume_dir(container)
        if path.exists():
            # Removing a rootfs can take seconds: not on the event loop.
            await asyncio.to_thread(shutil.rmtree, path)

    async def attach(self, container: str, generation: int, *, takeover_from: str | None = None) -> Path:
        raise FailedPrecondition(_LOCAL)

    async def detach(self, container: str) -> None:
        raise FailedPrecondition(_LOCAL)

    def is_attached(self, container: str) -> bool:
        return self.rootfs(container).is_dir()

    async def usage(self, container: str) -> int:
        path = self.volume_dir(container)
        if not path.is_dir():
            raise NotFound(f"no dir volume for {container!r}")
        return await asyncio.to_thread(_disk_usage, path)


def _disk_usage(root: Path) -> int:
    """Bytes allocated under `root`, like `du -s -B1 -x`: blocks, not apparent sizes;
    hard links counted once; symlinks not followed; other filesystems not entered."""
    seen: set[tuple[int, int]] = set()
    total = 0
    root_dev = os.lstat(root).st_dev
    stack = [os.fspath(root)]
    while stack:
        directory = stack.pop()
        try:
            entries = os.scandir(directory)
        except OSError:
            continue  # vanished or unreadable: a running container changes its tree
        with entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if st.st_dev != root_dev:
                    continue
                if st.st_nlink > 1:
                    key = (st.st_dev, st.st_ino)
                    if key in seen:
                        continue
                    seen.add(key)
                total += st.st_blocks * 512
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
    return total + os.lstat(root).st_blocks * 512
