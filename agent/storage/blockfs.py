"""Pieces shared by the block-volume drivers (image, lvm): ext4, mounts, sizes."""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import os
import re
from dataclasses import dataclass
from pathlib import Path

import structlog

from corral.errors import FailedPrecondition, InvalidArgument, RuntimeFailure
from corral.names import validate_name
from corral.proc import run

#: Size of a fixed-size volume when the container has no disk limit.
DEFAULT_VOLUME_BYTES = 1 << 30
#: Smallest fixed-size volume: below this ext4's journal and metadata leave little room.
MIN_VOLUME_BYTES = 16 << 20


def volume_size(size_bytes: int) -> int:
    """The size of a fixed-size volume for a container's `disk_bytes` limit
    (0 = no limit: the default size), rounded up to whole 4 KiB blocks."""
    if isinstance(size_bytes, bool) or not isinstance(size_bytes, int) or size_bytes < 0:
        raise InvalidArgument(f"invalid volume size {size_bytes!r}: expected a number of bytes >= 0")
    if size_bytes == 0:
        return DEFAULT_VOLUME_BYTES
    if size_bytes < MIN_VOLUME_BYTES:
        raise InvalidArgument(
            f"volume size {size_bytes} bytes is too small: at least {MIN_VOLUME_BYTES >> 20} MiB is needed")
    return -(-size_bytes // 4096) * 4096


def volume_name(container: str) -> str:
    """Validate a container name before it becomes part of a path or volume name."""
    return validate_name(container)


# --- Helpers shared by the block-volume drivers (image, lvm) -----------------------

_MKFS_TIMEOUT = 300.0
_MOUNT_TIMEOUT = 60.0
_FSCK_TIMEOUT = 1800.0  # a full check of a big damaged filesystem takes long


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo, the fields we use."""

    mount_point: Path
    source: str
    fstype: str
    device: str  # "major:minor"


def find_mount(mount_point: Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> Mount | None:
    """What is mounted on `mount_point` in this process's mount namespace (the
    topmost mount when several are stacked), or None."""
    target = os.path.realpath(mount_point)  # mountinfo shows paths with symlinks resolved
    found = None
    for line in mountinfo.read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        if _unescape(fields[4]) == target:
            found = Mount(Path(target), _unescape(fields[sep + 2]), fields[sep + 1], fields[2])
    return found


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


async def make_ext4(device: str | Path, *, prezeroed: bool) -> None:
    """An ext4 filesystem on `device`. `prezeroed`: the device reads as zeros (a new
    sparse file), so mke2fs need not zero the journal and inode tables at all:
    ~5 ms for any size and no writes to the shared storage beyond the metadata.
    No reserved blocks: the container's root would use them anyway, and the
    usable size should be what the user asked for."""
    extended = "assume_storage_prezeroed=1,nodiscard" if prezeroed else "lazy_itable_init=1,nodiscard"
    await run(["mkfs.ext4", "-F", "-q", "-m", "0", "-E", extended, str(device)],
              timeout=_MKFS_TIMEOUT, what="mkfs.ext4")


async def check_ext4(device: str | Path) -> None:
    """`e2fsck -p` (replays the journal, fixes what is safe to fix) before using a
    filesystem whose last host did not release it cleanly; refuses to go on when
    it finds damage that needs a person."""
    done = await run(["e2fsck", "-p", str(device)], timeout=_FSCK_TIMEOUT, check=False, what="e2fsck")
    if done.returncode & ~0b11:  # 1: errors fixed, 2: fixed, reboot advised; 4 and up: not fixed
        raise RuntimeFailure(f"e2fsck -p {device} found errors it could not fix (exit {done.returncode}): "
                             f"{done.output[-2000:]}; run e2fsck by hand")


async def mount_ext4(device: str | Path, target: Path) -> None:
    await run(["mount", "-t", "ext4", str(device), str(target)], timeout=_MOUNT_TIMEOUT, what="mount")


async def unmount(target: Path) -> None:
    """Unmount `target` (never lazily: a lazy unmount would let the volume be handed
    over while something here still writes to it)."""
    done = await run(["umount", str(target)], timeout=_MOUNT_TIMEOUT, check=False, what="umount")
    if done.returncode != 0:
        if find_mount(target) is None:
            return
        raise FailedPrecondition(f"cannot unmount {target}: {done.output} (is the container still running?)")


# EXT4_IOC_SHUTDOWN = _IOR('X', 125, __u32); EXT4_GOING_FLAGS_NOLOGFLUSH = 2.
_EXT4_IOC_SHUTDOWN = 0x8004587D
_GOING_NOLOGFLUSH = 2
_SHUTDOWN_TIMEOUT = 10.0


async def shutdown_ext4(target: Path) -> bool:
    """Stop all I/O to the ext4 filesystem mounted at `target` at once, writing nothing
    more (not even its journal): every later read or write there fails with EIO, and
    its unmount writes nothing. For a volume another host now owns: our cached view of
    it is stale, and flushing it would damage the new owner's filesystem. False if
    nothing is mounted there (or the call did not answer in time)."""
    if find_mount(target) is None:
        return False
    try:
        async with asyncio.timeout(_SHUTDOWN_TIMEOUT):
            await asyncio.to_thread(_shutdown, target)
    except TimeoutError:
        return False
    return True


async def sync_ext4(target: Path, within: float) -> bool:
    """syncfs(2) the filesystem mounted at `target`; False if it did not finish `within` seconds
    (the call goes on in its thread: a hung storage holds that thread only)."""
    if within <= 0:
        return False
    try:
        async with asyncio.timeout(within):
            await asyncio.to_thread(_syncfs, target)
    except TimeoutError:
        return False
    return True


def _syncfs(target: Path) -> None:
    fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise RuntimeFailure(f"syncfs {target}: {os.strerror(err)}")
    finally:
        os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)


def _shutdown(target: Path) -> None:
    fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _EXT4_IOC_SHUTDOWN, _GOING_NOLOGFLUSH.to_bytes(4, "little"))
    except OSError as e:
        raise RuntimeFailure(f"cannot shut the filesystem at {target} down: {e.strerror}") from None
    finally:
        os.close(fd)


def used_bytes(mounted: Path) -> int:
    """Bytes in use on the filesystem mounted at `mounted`."""
    st = os.statvfs(mounted)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def remove_mount_dirs(rootfs: Path) -> None:
    """Remove an unused mount point and its container directory. Only rmdir: never
    delete through a mount, nor files someone wrote under an unmounted point."""
    for d in (rootfs, rootfs.parent):
        try:
            d.rmdir()
        except FileNotFoundError:
            pass
        except OSError as e:
            structlog.get_logger("agent.storage").warning(
                "mount point directory left in place", path=str(d), error=e.strerror)
            return
