"""`lvm` storage: one logical volume per container in a volume group every host
sees (a SAN LUN, iSCSI, a shared disk), ext4 on it, mounted on the owning host.

    /dev/<vg>/corral-<name>     the volume, exclusively active on its owner
    mount_root/<name>/rootfs    where it is mounted there

Same contract as `image` (see base.py and ownership.py): the ownership record is
kept as LV tags, `corral_owner_<node>_<generation>` and, while a host has it
mounted, `corral_attached`; a tag change is one metadata update (atomic).

Exclusive activation (`lvchange -aey`) is what keeps a second host off the
volume, and it does so across hosts ONLY in a shared VG under lvmlockd
(`vgcreate --shared`, with sanlock or dlm as lock manager, `lvmlockd` running on
every host and `vgchange --lockstart VG` done at boot). There `-aey` takes a cluster-wide lock, so attach activates first
and only then reads and changes the tags: the activation is the lock around the
record. Without lvmlockd exclusive activation is local to each host and LVM
metadata written by two hosts at once can be corrupted: then only the tags
guard the volume, with a race between reading and writing them. Use lvmlockd.
After a host is lost, its lock is held until the lock manager lets it go (a
sanlock lease expires, or dlm fences the host); a takeover waits for that.

Needs device-mapper in the kernel (`unavailable_reason` says why not).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import structlog

from agent.storage.blockfs import (
    check_ext4,
    find_mount,
    make_ext4,
    mount_ext4,
    remove_mount_dirs,
    unmount,
    used_bytes,
    volume_name,
    volume_size,
)
from agent.storage.ownership import Ownership, check_attach, check_destroy
from corral.errors import AlreadyExists, FailedPrecondition, NotFound, PermissionDenied, RuntimeFailure
from corral import programs
from corral.proc import Completed, run

log = structlog.get_logger("agent.storage.lvm")

_LVM_TIMEOUT = 120.0
_OWNER_TAG = "corral_owner_"
_ATTACHED_TAG = "corral_attached"


async def unavailable_reason() -> str | None:
    """Why LVM volumes cannot be used on this host, or None if they can."""
    missing = programs.why_unavailable(programs.STORAGE_LVM)
    if missing:
        return missing
    try:
        misc = Path("/proc/misc").read_text()
    except OSError:
        misc = ""
    if "device-mapper" not in misc.split():
        return "this kernel has no device-mapper (not listed in /proc/misc)"
    done = await run(["dmsetup", "version"], timeout=10, check=False)
    if done.returncode != 0:
        return f"device-mapper does not answer: {done.output.splitlines()[0] if done.output else done.returncode}"
    return None


def owner_tags(ownership: Ownership) -> list[str]:
    """The LV tags that record `ownership` (node names have no '_', so they parse back)."""
    tags = [f"{_OWNER_TAG}{ownership.node}_{ownership.generation}"]
    return [*tags, _ATTACHED_TAG] if ownership.attached else tags


def ownership_from_tags(tags: list[str]) -> Ownership | None:
    owners = [t[len(_OWNER_TAG):].rsplit("_", 1) for t in tags if t.startswith(_OWNER_TAG)]
    if not owners:
        return None
    if len(owners) > 1 or not owners[0][-1].isdigit():
        raise RuntimeFailure(f"conflicting or damaged ownership tags {tags}; fix them by hand (lvchange --deltag)")
    node, generation = owners[0]
    return Ownership(node, int(generation), _ATTACHED_TAG in tags, updated_at="")


class LvmStorage:
    name = "lvm"
    enforces_disk_limit = True
    shared = True

    def __init__(self, volume_group: str, mount_root: Path, node: str) -> None:
        self.volume_group = volume_group
        self.mount_root = mount_root
        self.node = node
        # Within this agent, one action at a time per volume (hosts are kept apart by lvmlockd).
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def lv_name(self, container: str) -> str:
        return f"corral-{volume_name(container)}"

    def lv_path(self, container: str) -> str:
        return f"{self.volume_group}/{self.lv_name(container)}"

    def device(self, container: str) -> Path:
        return Path("/dev", self.volume_group, self.lv_name(container))

    def rootfs(self, container: str) -> Path:
        return self.mount_root / volume_name(container) / "rootfs"

    def is_attached(self, container: str) -> bool:
        return find_mount(self.rootfs(container)) is not None

    async def ownership(self, container: str) -> Ownership | None:
        return (await self._state(container)).ownership

    # --- lifecycle -------------------------------------------------------------------

    async def create_volume(self, container: str, size_bytes: int) -> Path:
        size = volume_size(size_bytes)
        rootfs, device = self.rootfs(container), self.device(container)
        owner = Ownership.now(self.node, 0, attached=True)
        async with self._locks[container], contextlib.AsyncExitStack() as undo:
            tags = [arg for tag in owner_tags(owner) for arg in ("--addtag", tag)]
            done = await _lvm(["lvcreate", "--yes", "--name", self.lv_name(container), "--size", f"{size}b",
                               "--activate", "ey", "--wipesignatures", "y", *tags, self.volume_group], check=False)
            if done.returncode != 0:
                if "already exists" in done.output:
                    raise AlreadyExists(f"logical volume {self.lv_path(container)} already exists")
                raise RuntimeFailure(f"lvcreate {self.lv_path(container)} failed: {done.output[-2000:]}")
            undo.push_async_callback(_lvm, ["lvremove", "--yes", self.lv_path(container)])
            await make_ext4(device, prezeroed=False)
            await asyncio.to_thread(rootfs.mkdir, parents=True, exist_ok=True)
            await mount_ext4(device, rootfs)
            undo.push_async_callback(unmount, rootfs)
            undo.pop_all()
        log.info("volume created", container=container, node=self.node, size_bytes=size, lv=self.lv_path(container))
        return rootfs

    async def destroy_volume(self, container: str) -> None:
        rootfs = self.rootfs(container)
        async with self._locks[container]:
            try:
                state = await self._state(container)
            except NotFound:
                state = None
            if state is not None:
                check_destroy(container, state.ownership, self.node)
                await self._unmount(container)
                await _lvm(["lvremove", "--yes", self.lv_path(container)])
            elif find_mount(rootfs) is not None:
                await unmount(rootfs)
        await asyncio.to_thread(remove_mount_dirs, rootfs)
        log.info("volume destroyed", container=container, node=self.node)

    async def attach(self, container: str, generation: int, *, takeover_from: str | None = None) -> Path:
        rootfs, device = self.rootfs(container), self.device(container)
        bound = log.bind(container=container, node=self.node, generation=generation)
        async with self._locks[container], contextlib.AsyncExitStack() as undo:
            # A cheap refusal first (and a clear message when the activation is refused).
            check_attach(container, (await self._state(container)).ownership, self.node, generation, takeover_from)
            if find_mount(rootfs) is None:
                activated = await _lvm(["lvchange", "--activate", "ey", self.lv_path(container)], check=False)
                if activated.returncode != 0:
                    holder = (await self._state(container)).ownership
                    raise PermissionDenied(f"cannot activate {self.lv_path(container)} exclusively"
                                           f"{f' (held by {holder.node})' if holder else ''}: {activated.output}")
                undo.push_async_callback(_lvm, ["lvchange", "--activate", "n", self.lv_path(container)])
            # Active exclusively: now the record is ours to read and change.
            current = (await self._state(container)).ownership
            check_attach(container, current, self.node, generation, takeover_from)
            claimed = Ownership.now(self.node, generation, attached=True)
            if current is None or (current.node, current.generation, current.attached) != (self.node, generation, True):
                await self._retag(container, current, claimed)
                undo.push_async_callback(self._retag, container, claimed, current)
            if find_mount(rootfs) is None:
                if current is not None and current.attached:
                    bound.warning("volume was not released cleanly, checking it", previous=current.node)
                    await check_ext4(device)
                await asyncio.to_thread(rootfs.mkdir, parents=True, exist_ok=True)
                await mount_ext4(device, rootfs)
            undo.pop_all()
        bound.info("volume attached")
        return rootfs

    async def detach(self, container: str) -> None:
        rootfs = self.rootfs(container)
        async with self._locks[container]:
            try:
                current = (await self._state(container)).ownership
            except NotFound:
                if find_mount(rootfs) is not None:
                    await unmount(rootfs)
                return
            if current is None or current.node == self.node:
                await self._unmount(container)
                if current is not None and current.attached:
                    await self._retag(container, current, Ownership.now(self.node, current.generation, False))
                await _lvm(["lvchange", "--activate", "n", self.lv_path(container)])  # releases the lock last
            else:
                # Another host holds it now (taken over while we were cut off): let go here.
                if find_mount(rootfs) is not None:
                    await unmount(rootfs)
                await _lvm(["lvchange", "--activate", "n", self.lv_path(container)], check=False)
        await asyncio.to_thread(remove_mount_dirs, rootfs)
        log.info("volume detached", container=container, node=self.node)

    async def usage(self, container: str) -> int:
        rootfs = self.rootfs(container)
        if find_mount(rootfs) is not None:
            return await asyncio.to_thread(used_bytes, rootfs)
        return (await self._state(container)).size_bytes  # not mounted here: the space it takes in the VG

    # --- LVM -------------------------------------------------------------------------

    async def _state(self, container: str) -> "_LvState":
        done = await _lvm(["lvs", "--noheadings", "--separator", "|", "--units", "b", "--nosuffix",
                           "-o", "lv_tags,lv_active,lv_device_open,lv_size", self.lv_path(container)], check=False)
        if done.returncode != 0:
            if "Failed to find" in done.output or "not found" in done.output:
                raise NotFound(f"no logical volume {self.lv_path(container)}")
            raise RuntimeFailure(f"lvs {self.lv_path(container)} failed: {done.output[-2000:]}")
        tags, active, is_open, size = (f.strip() for f in done.stdout.decode().strip().split("|"))
        return _LvState(ownership_from_tags([t for t in tags.split(",") if t]),
                        active=bool(active), open=bool(is_open), size_bytes=int(size or 0))

    async def _retag(self, container: str, old: Ownership | None, new: Ownership | None) -> None:
        drop = owner_tags(old) if old else []
        add = owner_tags(new) if new else []
        args = [*(a for t in drop if t not in add for a in ("--deltag", t)),
                *(a for t in add if t not in drop for a in ("--addtag", t))]
        if args:
            await _lvm(["lvchange", *args, self.lv_path(container)])

    async def _unmount(self, container: str) -> None:
        """Unmount here; refuse (mounted back as it was) if the device stays open,
        e.g. a running container still has the filesystem."""
        rootfs, device = self.rootfs(container), self.device(container)
        mounted = find_mount(rootfs)
        if mounted is not None:
            await unmount(rootfs)
        if (await self._state(container)).open:
            if mounted is not None:
                await mount_ext4(device, rootfs)
            raise FailedPrecondition(f"{self.lv_path(container)} is still in use on this host "
                                     "(is its container still running?)")


@dataclass(frozen=True)
class _LvState:
    ownership: Ownership | None
    active: bool
    open: bool  # the device is held open (mounted somewhere on this host)
    size_bytes: int


async def _lvm(argv: list[str], *, check: bool = True) -> Completed:
    # LVM warns about every inherited descriptor; ours are closed on exec anyway.
    env = dict(os.environ, LVM_SUPPRESS_FD_WARNINGS="1")
    return await run(argv, timeout=_LVM_TIMEOUT, check=check, env=env, what=argv[0])
