"""`image` storage: one ext4 filesystem image per container on shared storage,
loop-mounted on the host that owns it (the idea of OpenVZ's ploop).

    shared_dir/images/<name>.img     the filesystem, a sparse file of the volume's size
    shared_dir/images/<name>.owner   who holds it (ownership.py), JSON
    shared_dir/hosts/<node>.beacon   each host's beacon: what it has mounted (beacons.py)
    mount_root/<name>/rootfs         where it is mounted on the owning host

The size is real: writing past it fails with ENOSPC. Moving a container between
hosts moves no bytes: one host detaches (unmount, release), the next attaches
(take ownership, mount) the very same file. Every step that reads or changes
ownership holds an flock on the image file, so hosts racing for a volume are
serialised wherever they run. A host re-checks the ownership of what it has
mounted every second (`watch`) and lets go of what another host claimed; a
takeover from a holder that never released the volume mounts only once the
holder's beacon shows it let go, or stood still (beacons.py).

Mounts are made in the agent's own mount namespace: on a real host that is the
host's; in the lab each host has one pinned namespace (lab/hostns.py),
so a volume mounted there stays mounted across agent restarts and is seen by
that host only. Loop devices are global to the kernel: each is set up with
autoclear (and direct I/O, so the host keeps no second, possibly stale, copy of
the image in its page cache), so the unmount that drops the last user frees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Awaitable, Callable

import structlog

from agent.storage.blockfs import (
    Mount,
    check_ext4,
    find_mount,
    make_ext4,
    mount_ext4,
    remove_mount_dirs,
    shutdown_ext4,
    sync_ext4,
    unmount,
    used_bytes,
    volume_name,
    volume_size,
)
from agent.storage.beacons import GIVE_UP, INTERVAL, Beacons
from agent.storage.ownership import MarkerFile, Ownership, check_attach, check_destroy, volume_lock
from corral.errors import (
    CorralError,
    DeadlineExceeded,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    RuntimeFailure,
)
from corral.proc import run

log = structlog.get_logger("agent.storage.image")

_LOSETUP_TIMEOUT = 30.0
_AUTOCLEAR_SETTLE = 1.0  # how long a freed loop device may take to let go of its file
_RECHECK_TIMEOUT = 5.0  # one read of an ownership record on the shared storage
RELEASE_TIMEOUT = 30.0  # a takeover waits this long for a live holder to let go
RELEASE_POLL = 0.2


class ImageStorage:
    name = "image"
    enforces_disk_limit = True
    shared = True

    def __init__(self, shared_dir: Path, mount_root: Path, node: str) -> None:
        self.images_dir = shared_dir / "images"
        self.mount_root = mount_root
        self.node = node
        self.beacons = Beacons(shared_dir / "hosts", node)

    # --- the fence at the data ----------------------------------------------------------

    async def watch(self, kill: Callable[[str], Awaitable[None]]) -> None:
        """For the agent's lifetime: every INTERVAL, re-check the ownership of each volume mounted
        here and let go of those another host has claimed; then write this host's beacon (what it
        still has mounted) and read the peers'. A host that cannot write its beacon for GIVE_UP
        lets go of everything. `kill(container)` stops a container at once."""
        last_mounted: list[str] = []
        while True:
            unwritten = self.beacons.unwritten_for()
            # Off the loop, and bounded: it stats the images on the shared storage, which can hang
            # (NFS); then the last list stands, so that GIVE_UP still lets go of what it names.
            try:
                async with asyncio.timeout(_RECHECK_TIMEOUT):
                    mounted = await asyncio.to_thread(self.mounted_here)
            except TimeoutError:
                mounted = last_mounted
            last_mounted = mounted
            for name in mounted:
                if unwritten >= GIVE_UP:
                    await self.let_go(name, kill, f"this host could not write its beacon for {unwritten:.1f} s")
                    continue
                try:
                    async with asyncio.timeout(_RECHECK_TIMEOUT):
                        owner = await asyncio.to_thread(self.marker(name).read)
                except (TimeoutError, CorralError) as e:
                    log.warning("cannot re-check a volume's ownership", container=name, error=str(e) or "timed out")
                    continue  # the beacon's GIVE_UP covers storage that stays unreachable
                if owner is not None and owner.node != self.node:
                    await self.let_go(name, kill, f"{owner.node} took it over at generation {owner.generation}")
            await self.beacons.beat(self.mounted_here)
            await self.beacons.observe()
            await asyncio.sleep(INTERVAL)

    def mounted_here(self) -> list[str]:
        """The volumes of this driver mounted on this host."""
        try:
            names = [d.name for d in self.mount_root.iterdir()]
        except FileNotFoundError:
            return []
        return [n for n in names if find_mount(self.mount_root / n / "rootfs") is not None
                and self.image_path(n).exists()]  # fmt: skip

    async def let_go(self, container: str, kill: Callable[[str], Awaitable[None]], why: str) -> None:
        """Stop using a volume this host may no longer hold, leaving the ownership record to its
        new owner. While this host's beacon is fresh the new owner is still waiting for it (it
        mounts only once the beacon no longer lists the volume): the container is killed and its
        last writes flushed, so that none is lost. Past GIVE_UP the new owner may already have it:
        the filesystem is shut down first, writing nothing more (not even its journal)."""
        rootfs = self.rootfs(container)
        log.error("letting go of a volume this host no longer holds", container=container, node=self.node, why=why)
        killed = flushed = False
        if self.beacons.unwritten_for() < GIVE_UP:
            killed = await self._kill(container, kill)
            flushed = await sync_ext4(rootfs, within=GIVE_UP - self.beacons.unwritten_for())
        if not flushed:
            try:
                await shutdown_ext4(rootfs)
            except CorralError as e:
                log.error("cannot shut the volume's filesystem down", container=container, error=e.message)
        if not killed:
            await self._kill(container, kill)
        try:
            await unmount(rootfs)
            # Its loop device too, before the beacon says this host let go of the volume.
            await self._busy_loops(self.image_path(container), settle=_AUTOCLEAR_SETTLE)
        except CorralError as e:
            log.error("cannot unmount a lost volume", container=container, error=e.message)

    @staticmethod
    async def _kill(container: str, kill: Callable[[str], Awaitable[None]]) -> bool:
        try:
            await kill(container)
        except Exception:
            log.exception("killing the container of a lost volume failed", container=container)
        return True

    # --- where things are ------------------------------------------------------------

    def image_path(self, container: str) -> Path:
        return self.images_dir / f"{volume_name(container)}.img"

    def marker(self, container: str) -> MarkerFile:
        return MarkerFile(self.images_dir / f"{volume_name(container)}.owner")

    def rootfs(self, container: str) -> Path:
        return self.mount_root / volume_name(container) / "rootfs"

    def ownership(self, container: str) -> Ownership | None:
        """The ownership record on the shared storage (None: no record)."""
        return self.marker(container).read()

    def is_attached(self, container: str) -> bool:
        return find_mount(self.rootfs(container)) is not None

    # --- lifecycle -------------------------------------------------------------------

    async def create_volume(self, container: str, size_bytes: int) -> Path:
        size = volume_size(size_bytes)
        image, marker, rootfs = self.image_path(container), self.marker(container), self.rootfs(container)
        bound = log.bind(container=container, node=self.node)
        await asyncio.to_thread(self.images_dir.mkdir, parents=True, exist_ok=True)
        # Creating the file exclusively is what claims the name among all hosts.
        async with volume_lock(image, create=True) as fd, contextlib.AsyncExitStack() as undo:
            undo.push_async_callback(asyncio.to_thread, _unlink, image)  # shared storage: off the loop
            await asyncio.to_thread(os.ftruncate, fd, size)  # sparse: takes no space yet
            await asyncio.to_thread(marker.write, Ownership.now(self.node, 0, attached=True))
            undo.push_async_callback(asyncio.to_thread, marker.remove)
            await make_ext4(image, prezeroed=True)
            await self._mount(image, rootfs)
            undo.push_async_callback(self._unmount, image, rootfs)
            undo.pop_all()
        bound.info("volume created", size_bytes=size, image=str(image))
        return rootfs

    async def destroy_volume(self, container: str) -> None:
        image, marker, rootfs = self.image_path(container), self.marker(container), self.rootfs(container)
        try:
            async with volume_lock(image):
                check_destroy(container, await asyncio.to_thread(marker.read), self.node)
                await self._unmount(image, rootfs)
                await asyncio.to_thread(_unlink, image)
                await asyncio.to_thread(marker.remove)
        except NotFound:
            # No image (already destroyed, or a create that died early): tidy what is left here,
            # but leave another host's marker alone (it may be creating the volume right now).
            if find_mount(rootfs) is not None:
                await unmount(rootfs)
            left = await asyncio.to_thread(marker.read)
            if left is not None and left.node == self.node:
                await asyncio.to_thread(marker.remove)
        await asyncio.to_thread(remove_mount_dirs, rootfs)
        log.info("volume destroyed", container=container, node=self.node)

    async def attach(self, container: str, generation: int, *, takeover_from: str | None = None) -> Path:
        image, marker = self.image_path(container), self.marker(container)
        bound = log.bind(container=container, node=self.node, generation=generation)
        async with volume_lock(image):
            current = await asyncio.to_thread(marker.read)
            check_attach(container, current, self.node, generation, takeover_from)
            holder = current.node if current is not None and current.attached and current.node != self.node else ""
            if not holder:
                return await self._mount_claimed(container, generation, current, bound)
            # A takeover from a host that never released it: claim it now, so that the holder's
            # re-check lets go of it, and mount only once the holder shows it did (beacons.py).
            await asyncio.to_thread(marker.write, Ownership.now(self.node, generation, attached=True))
            claimed_seen = self.beacons.latest(holder)
        await self._await_release(container, holder, claimed_seen, bound)
        async with volume_lock(image):
            now = await asyncio.to_thread(marker.read)
            if now is None or (now.node, now.generation) != (self.node, generation):
                raise PermissionDenied(f"volume {container} was claimed by {now.node if now else 'nobody'} while "
                                       f"{holder} was letting go of it; generation {generation} is not ours any more")
            return await self._mount_claimed(container, generation, current, bound)

    async def _await_release(self, container: str, holder: str, claimed_seen, bound) -> None:
        """Wait until `holder` shows, in a beacon written after our claim, that it has `container`
        unmounted, or its beacon stood still for GONE_AFTER (it is off, or has lost the storage)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RELEASE_TIMEOUT
        while True:
            await self.beacons.observe()
            latest = self.beacons.latest(holder)
            if latest is not None and latest != claimed_seen and container not in latest.mounted:
                bound.info("previous holder let go of the volume", holder=holder)
                return
            if self.beacons.gone(holder):
                bound.warning("previous holder's beacon stood still: it uses the storage no more", holder=holder,
                              silent_for=round(self.beacons.silent_for(holder), 1))  # fmt: skip
                return
            if loop.time() > deadline:
                raise DeadlineExceeded(
                    f"{holder} still has volume {container} mounted: its beacon on the shared storage moves, yet it "
                    f"did not let go within {RELEASE_TIMEOUT:g} s. Is its agent stuck? Fence {holder} first")
            await asyncio.sleep(RELEASE_POLL)

    async def _mount_claimed(self, container: str, generation: int, current: Ownership | None, bound) -> Path:
        """attach's work under the volume's lock; `current`: the ownership before this attach."""
        image, marker, rootfs = self.image_path(container), self.marker(container), self.rootfs(container)
        async with contextlib.AsyncExitStack() as undo:
            claimed = Ownership.now(self.node, generation, attached=True)
            mounted = find_mount(rootfs)
            if mounted is not None and current is not None and current.node != self.node:
                # A mount left from before another host held the volume: its cached view
                # of the filesystem is stale. Drop it, writing nothing, and mount afresh.
                bound.warning("dropping a stale mount", holder=current.node)
                await shutdown_ext4(rootfs)
                await self._unmount(image, rootfs)
                mounted = None
            if mounted is not None:
                # Already mounted here (a repeated order, or a restarted agent): keep it.
                self._check_is_image(mounted, image)
                if current is None or (current.generation, current.attached) != (generation, True):
                    await asyncio.to_thread(marker.write, claimed)
                return rootfs
            # Taken from a host that just let go: its loop device may take a moment to be freed.
            settle = _AUTOCLEAR_SETTLE if current is not None and current.node != self.node else 0
            if await self._busy_loops(image, settle=settle):
                raise FailedPrecondition(f"volume {container} is still in use on this host (a loop device "
                                         "backing it is held open); it cannot be mounted again")
            await asyncio.to_thread(marker.write, claimed)
            undo.push_async_callback(asyncio.to_thread, _restore_marker, marker, current)
            if current is not None and current.attached:
                # Its last holder never released it (a crash, a failover): check before use.
                bound.warning("volume was not released cleanly, checking it", previous=current.node)
                await check_ext4(image)
            await self._mount(image, rootfs)
            undo.pop_all()
        if current is not None and current.attached and current.node != self.node:
            bound.warning("volume taken over", from_node=current.node, from_generation=current.generation)
        bound.info("volume attached")
        return rootfs

    async def detach(self, container: str) -> None:
        image, marker, rootfs = self.image_path(container), self.marker(container), self.rootfs(container)
        try:
            async with volume_lock(image):
                current = await asyncio.to_thread(marker.read)
                ours = current is None or current.node == self.node
                if ours:
                    await self._unmount(image, rootfs)
                    await asyncio.to_thread(_fsync_file, image)  # everything on shared storage before release
                    if current is not None and current.attached:
                        await asyncio.to_thread(marker.write, Ownership.now(self.node, current.generation, False))
                elif find_mount(rootfs) is not None:
                    # Another host owns it now (taken over while we were cut off): our view of it is
                    # stale, so let go of it here writing nothing more to it.
                    await shutdown_ext4(rootfs)
                    await unmount(rootfs)
        except NotFound:
            if find_mount(rootfs) is not None:
                await unmount(rootfs)
        await asyncio.to_thread(remove_mount_dirs, rootfs)
        log.info("volume detached", container=container, node=self.node)

    async def usage(self, container: str) -> int:
        rootfs = self.rootfs(container)
        if find_mount(rootfs) is not None:
            return await asyncio.to_thread(used_bytes, rootfs)
        try:  # not mounted here: what the image takes on the shared storage
            return (await asyncio.to_thread(os.stat, self.image_path(container))).st_blocks * 512
        except FileNotFoundError:
            raise NotFound(f"no image volume for {container!r}") from None

    # --- mounting --------------------------------------------------------------------

    async def _mount(self, image: Path, rootfs: Path) -> None:
        await asyncio.to_thread(rootfs.mkdir, parents=True, exist_ok=True)
        done = await run(["losetup", "--find", "--show", "--direct-io=on", str(image)],
                         timeout=_LOSETUP_TIMEOUT, what="losetup")
        device = done.stdout.decode().strip()
        try:
            await mount_ext4(device, rootfs)
        finally:
            # Mounted: this only marks the device autoclear, so the unmount that drops
            # its last user frees it. Not mounted (failed): frees it now.
            await run(["losetup", "--detach", device], timeout=_LOSETUP_TIMEOUT, check=False)

    async def _unmount(self, image: Path, rootfs: Path) -> None:
        """Unmount here and make sure nothing else on this host still has the
        filesystem (a running container keeps its own reference to the mount):
        if something does, mount it back and refuse."""
        mounted = find_mount(rootfs)
        if mounted is not None:
            self._check_is_image(mounted, image)
            await unmount(rootfs)
        busy = await self._busy_loops(image, settle=_AUTOCLEAR_SETTLE if mounted else 0)
        if busy:
            if mounted is not None:
                await mount_ext4(busy[0], rootfs)  # the same superblock again: back as it was
            raise FailedPrecondition(
                f"{image.name} is still in use on this host through {', '.join(busy)} "
                "(is its container still running?)")

    async def _busy_loops(self, image: Path, *, settle: float) -> list[str]:
        """Loop devices backing `image` that something still holds open. Idle ones
        (left by an agent killed between losetup and mount) are freed on the way."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settle
        while True:
            devices = await _loops_of(image)
            for device in devices:
                # An idle device is freed; one in use is only (again) marked autoclear.
                await run(["losetup", "--detach", device], timeout=_LOSETUP_TIMEOUT, check=False)
            devices = await _loops_of(image) if devices else []
            if not devices or loop.time() >= deadline:
                return devices
            await asyncio.sleep(0.05)

    @staticmethod
    def _check_is_image(mounted: Mount, image: Path) -> None:
        if not _loop_backs(mounted.source, image):
            raise RuntimeFailure(f"{mounted.mount_point} has {mounted.source} ({mounted.fstype}) mounted, "
                                 f"not the image {image}; unmount it by hand")


async def _loops_of(image: Path) -> list[str]:
    done = await run(["losetup", "--list", "--noheadings", "--output", "NAME", "--associated", str(image)],
                     timeout=_LOSETUP_TIMEOUT, what="losetup --list")
    return done.stdout.decode().split()


def _loop_backs(device: str, image: Path) -> bool:
    """Is loop `device` (/dev/loopN) backed by `image` (the same file, by inode)?"""
    try:
        backing = Path("/sys/block", Path(device).name, "loop", "backing_file").read_text().strip()
        a, b = os.stat(backing), os.stat(image)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _restore_marker(marker: MarkerFile, previous: Ownership | None) -> None:
    if previous is None:
        marker.remove()
    else:
        marker.write(previous)


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
