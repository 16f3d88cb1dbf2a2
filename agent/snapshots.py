"""Snapshots of a container, kept on this host (`corral ct snapshot create|ls|restore|rm`).

A snapshot is a directory in the container's LXC directory (ContainerManager.snapshots_dir):
`rootfs/`, a file-level copy of its root filesystem (rsync, so it works on every storage
driver), `meta.json`, and for a stateful one `checkpoint/`, its processes (CRIU). A stateful
snapshot is a consistent pair: dump with stop, copy the disk, restore (the workload pauses
that long). A snapshot is written under a hidden name and renamed when whole. Restoring needs
the container stopped; it copies the disk back exactly (every file, --delete), and a stateful one then
restores the processes, running. Snapshots stay on this host: they do not follow a migration
(refused while there are any) and a destroy removes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import time
from pathlib import Path

import structlog

from agent.containers import ContainerManager
from agent.records import write_durably
from agent.runtime.checkpoint import Checkpointer
from agent.stateful import monitor_gone
from corral import proc
from corral.errors import AlreadyExists, CorralError, FailedPrecondition, NotFound
from corral.model import Container, Snapshot
from corral.names import validate_name

log = structlog.get_logger("corral.agent.snapshots")

META = "meta.json"
ROOTFS = "rootfs"
CHECKPOINT = "checkpoint"
COPY_TIMEOUT = 3600.0  # seconds: copying a root filesystem on this host's disk
CRIU_TIMEOUT = 300.0
# Owners as numbers, hard links, ACLs and extended attributes: the tree as it was.
_RSYNC = ["rsync", "-aHAX", "--numeric-ids"]


class Snapshots:
    def __init__(self, containers: ContainerManager, checkpointer: Checkpointer) -> None:
        self.containers = containers
        self.checkpointer = checkpointer

    def _dir(self, name: str, snap: str) -> Path:
        validate_name(snap, "snapshot name")
        return self.containers.snapshots_dir(name) / snap

    def _disk(self, name: str) -> Path:
        """The container's root filesystem, which must be here (a shared volume attached)."""
        record = self.containers.record(name)
        driver = self.containers.storages[record.storage]
        if driver.shared and not driver.is_attached(name):
            raise FailedPrecondition(f"the volume of {name!r} is not attached on node {self.containers.node!r}")
        return driver.rootfs(name)

    async def create(self, name: str, snap: str, *, stateful: bool) -> Snapshot:
        containers = self.containers
        final = self._dir(name, snap)
        async with containers.lock(name):
            rootfs = self._disk(name)
            if final.exists():
                raise AlreadyExists(f"container {name!r} already has a snapshot {snap!r}")
            running = name in containers.runtime.running_names()
            if stateful and not running:
                raise FailedPrecondition(f"container {name!r} is not running: a stateful snapshot saves its "
                                         "processes (take a disk snapshot without --stateful)")  # fmt: skip
            partial = final.with_name(f".{snap}.partial")
            await asyncio.to_thread(shutil.rmtree, partial, True)
            await asyncio.to_thread(partial.mkdir, parents=True)
            bound = log.bind(container=name, snapshot=snap)
            paused_ms = None
            async with contextlib.AsyncExitStack() as undo:
                undo.push_async_callback(asyncio.to_thread, shutil.rmtree, partial, True)
                if stateful:
                    images = partial / CHECKPOINT
                    began = time.perf_counter()
                    containers.intend(name, False)  # the dump stops it: not a crash
                    try:
                        await self.checkpointer.dump(name, images, stop=True, timeout=CRIU_TIMEOUT)
                    except CorralError as exc:
                        containers.intend(name, name in containers.runtime.running_names())
                        raise FailedPrecondition(f"cannot save the processes of {name!r}: {exc.message}") from None
                    # Whatever fails from here, the container runs again from its dump (LIFO: before the rmtree).
                    undo.push_async_callback(self._resume, name, images)
                    await monitor_gone(containers, name)  # else its restore would find LXC's socket taken
                    await _copy(rootfs, partial / ROOTFS)
                    await self._run_again(name, images)
                    undo.pop_all()
                    undo.push_async_callback(asyncio.to_thread, shutil.rmtree, partial, True)
                    paused_ms = round((time.perf_counter() - began) * 1000, 1)
                else:
                    await _copy(rootfs, partial / ROOTFS)
                size = await asyncio.to_thread(_tree_bytes, partial)
                snapshot = Snapshot(snap, time.time(), stateful, size)
                meta = {"name": snap, "created_at": snapshot.created_at, "stateful": stateful, "size_bytes": size,
                        "paused_ms": paused_ms}  # fmt: skip
                await asyncio.to_thread(write_durably, partial / META, json.dumps(meta) + "\n")
                await asyncio.to_thread(partial.rename, final)
                undo.pop_all()
            bound.info("snapshot taken", stateful=stateful, size_bytes=size, paused_ms=paused_ms)
            return snapshot

    async def _run_again(self, name: str, images: Path) -> None:
        await self.checkpointer.restore(name, images, timeout=CRIU_TIMEOUT)
        self.containers.intend(name, True)

    async def _resume(self, name: str, images: Path) -> None:
        """Undo of a stateful snapshot that failed after its dump: the container runs on."""
        try:
            await self._run_again(name, images)
        except Exception as exc:
            log.error("a failed stateful snapshot could not restart the container", container=name, error=str(exc))

    async def list(self, name: str) -> list[Snapshot]:
        self.containers.record(name)
        return await asyncio.to_thread(_read_all, self.containers.snapshots_dir(name))

    async def restore(self, name: str, snap: str) -> Container:
        containers = self.containers
        source = self._dir(name, snap)
        async with containers.lock(name):
            rootfs = self._disk(name)
            if not (source / META).is_file():
                raise NotFound(f"container {name!r} has no snapshot {snap!r}")
            if name in containers.runtime.running_names():
                raise FailedPrecondition(f"container {name!r} is running: stop it before restoring a snapshot")
            meta = await asyncio.to_thread(_read_meta, source)
            await _copy(source / ROOTFS, rootfs, exact=True)
            # Processes a stateful stop saved belong to the disk just replaced.
            await asyncio.to_thread(shutil.rmtree, containers.saved_state_dir(name), True)
            if meta.stateful:
                try:
                    await self._run_again(name, source / CHECKPOINT)
                except CorralError as exc:
                    raise FailedPrecondition(f"the disk of {name!r} is back as snapshot {snap!r} was, but its "
                                             f"processes could not be restored: {exc.message}") from None  # fmt: skip
            log.info("snapshot restored", container=name, snapshot=snap, stateful=meta.stateful)
        return await containers.get(name)

    async def delete(self, name: str, snap: str) -> None:
        containers = self.containers
        target = self._dir(name, snap)
        async with containers.lock(name):
            containers.record(name)
            if not (target / META).is_file():
                raise NotFound(f"container {name!r} has no snapshot {snap!r}")
            aside = target.with_name(f".{snap}.removing")  # gone from the list at once, even if rmtree fails
            await asyncio.to_thread(target.rename, aside)
            await asyncio.to_thread(shutil.rmtree, aside, True)
            log.info("snapshot removed", container=name, snapshot=snap)


async def _copy(source: Path, target: Path, *, exact: bool = False) -> None:
    """`exact` (a restore onto the container's disk): files not in `source` are deleted, and every
    file is copied whatever its size and time say (rsync's quick check would keep a file changed
    within the same second, or with its time set back, as it is)."""
    argv = [*_RSYNC, *(["--delete", "--ignore-times"] if exact else []), f"{source}/", f"{target}/"]
    await proc.run(argv, timeout=COPY_TIMEOUT, what=f"copying {source}")


def _read_meta(path: Path) -> Snapshot:
    data = json.loads((path / META).read_text())
    return Snapshot(data["name"], float(data["created_at"]), bool(data["stateful"]), int(data["size_bytes"]))


def _read_all(root: Path) -> list[Snapshot]:
    if not root.is_dir():
        return []
    out = []
    for path in root.iterdir():
        if path.name.startswith(".") or not (path / META).is_file():
            continue  # being written or removed
        with contextlib.suppress(OSError, ValueError, KeyError):
            out.append(_read_meta(path))
    return sorted(out, key=lambda s: (s.created_at, s.name))


def _tree_bytes(path: Path) -> int:
    """Bytes the tree's files hold (a hard-linked file counted once)."""
    seen, total = set(), 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(root, f))
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
    return total
