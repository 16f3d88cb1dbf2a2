"""Who may mount a shared volume: the ownership record and the rules that guard it.

The controller decides which host owns a shared volume and records an ownership
*generation*, raised at every handover; it passes that generation to `attach`.
The host enforces the decision with a record next to the volume on the shared
storage (a JSON marker file for `image`, LV tags for `lvm`), read and changed
under a lock every host honours (`volume_lock`), so two hosts can never both
believe they hold the volume, whatever order their requests arrive in:

- a generation lower than the recorded one is a stale order from the past;
- a generation names one owner: the same generation for another host is refused;
- a volume another host holds attached is refused, unless the caller states
  that host was fenced (`takeover_from`, failover) and brings a newer generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import structlog

from corral.errors import AlreadyExists, DeadlineExceeded, InvalidArgument, NotFound, PermissionDenied, RuntimeFailure

log = structlog.get_logger("agent.storage.ownership")

LOCK_TIMEOUT = 30.0


@dataclass(frozen=True)
class Ownership:
    node: str  # the host that holds (or last held) the volume
    generation: int  # the controller's ownership generation it was given
    attached: bool  # whether that host has it mounted (or is about to)
    updated_at: str  # ISO-8601 UTC, for people reading the marker

    @classmethod
    def now(cls, node: str, generation: int, attached: bool) -> "Ownership":
        stamp = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return cls(node, generation, attached, stamp)


def check_attach(volume: str, current: Ownership | None, node: str, generation: int,
                 takeover_from: str | None = None) -> None:
    """Raise PermissionDenied unless `node` may attach `volume` at `generation`."""
    if isinstance(generation, bool) or not isinstance(generation, int) or generation < 0:
        raise InvalidArgument(f"invalid ownership generation {generation!r} for volume {volume}")
    if current is None:
        return  # nobody has ever held it (a volume made before markers, or half made)
    if generation < current.generation:
        raise PermissionDenied(
            f"stale order for volume {volume}: generation {generation} is older than generation "
            f"{current.generation}, held by {current.node}")
    if current.node == node:
        return  # ours already: re-attach, or a newer generation for us
    if current.attached:
        if takeover_from == current.node and generation > current.generation:
            return  # failover: the controller proved `current.node` cannot use it any more
        raise PermissionDenied(
            f"volume {volume} is attached on {current.node} (generation {current.generation}); "
            f"it must be detached there first")
    if generation == current.generation:
        raise PermissionDenied(
            f"generation {generation} of volume {volume} was given to {current.node}, not {node}; "
            "a handover needs a newer generation")


def check_destroy(volume: str, current: Ownership | None, node: str) -> None:
    if current is not None and current.attached and current.node != node:
        raise PermissionDenied(f"volume {volume} is attached on {current.node}; it cannot be destroyed from {node}")


class MarkerFile:
    """The ownership record of one volume as a JSON file on the shared storage.
    Written atomically (temporary file, fsync, rename, fsync of the directory), so a
    reader on any host sees the old record or the new one, never a torn one."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> Ownership | None:
        try:
            data = json.loads(self.path.read_text())
            return Ownership(node=str(data["node"]), generation=int(data["generation"]),
                             attached=bool(data["attached"]), updated_at=str(data.get("updated_at", "")))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as e:
            # Never guess who owns a volume: a damaged record stops everyone until a person looks.
            raise RuntimeFailure(f"ownership marker {self.path} is unreadable ({e}); fix or remove it by hand") from e

    def write(self, ownership: Ownership) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{ownership.node}.{os.getpid()}.tmp")
        data = (json.dumps(asdict(ownership), indent=None) + "\n").encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        _fsync_dir(self.path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.asynccontextmanager
async def volume_lock(path: Path, *, timeout: float = LOCK_TIMEOUT, create: bool = False) -> AsyncIterator[int]:
    """Hold an exclusive flock(2) on `path` (the volume's image file: it exists for as
    long as the volume does, on the storage every host shares; on NFS flock is
    carried as a byte-range lock, seen by every client). Yields the open descriptor.
    `create`: make the file, AlreadyExists if it exists (a new volume).
    Raises NotFound if the file does not exist or is removed while we wait.

    Every call on the shared storage (open, flock, fstat, close) runs in a worker thread:
    a hung NFS server then holds up this request only, never the agent's event loop (its
    gRPC, its heartbeats). A request that gives up (deadline, cancel) leaves a stuck call
    behind in its thread; that thread closes the descriptor itself once the call returns,
    so no lock is ever left held, nor a reused descriptor number unlocked by mistake."""
    abandon = threading.Event()
    acquiring = asyncio.ensure_future(asyncio.to_thread(_acquire, path, create, timeout, abandon))
    try:
        # The thread keeps its own deadline; this one is for a call stuck in the kernel.
        async with asyncio.timeout(timeout + STUCK_GRACE):
            fd = await asyncio.shield(acquiring)
    except BaseException as exc:
        abandon.set()
        acquiring.add_done_callback(_close_acquired)  # should it get the lock after all, let go
        if isinstance(exc, TimeoutError):
            raise DeadlineExceeded(f"volume {path}: the shared storage did not answer within "
                                   f"{timeout + STUCK_GRACE:g} s") from None  # fmt: skip
        raise
    try:
        yield fd
    finally:
        await asyncio.shield(asyncio.to_thread(os.close, fd))  # also releases the lock


STUCK_GRACE = 10.0  # beyond the lock's own timeout, for an open/flock/fstat stuck on the storage
_POLL = 0.02  # between non-blocking flock attempts: a blocking flock would pin a thread forever


def _acquire(path: Path, create: bool, timeout: float, abandon: threading.Event) -> int:
    """volume_lock's work, in a worker thread: open, flock (polled), check the file is still there."""
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if create else 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileNotFoundError:
        raise NotFound(f"volume {path} does not exist") from None
    except FileExistsError:
        raise AlreadyExists(f"volume {path} already exists") from None
    try:
        deadline = time.monotonic() + timeout
        while True:
            if abandon.is_set():
                raise DeadlineExceeded(f"volume {path}: the request gave up waiting for its lock")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise DeadlineExceeded(f"volume {path} stayed locked by another host or request "
                                           f"for {timeout:g} s") from None
                time.sleep(_POLL)
        if os.fstat(fd).st_nlink == 0:
            raise NotFound(f"volume {path} was removed")  # destroyed while we waited
        if abandon.is_set():  # the caller is gone: nobody would ever unlock it
            raise DeadlineExceeded(f"volume {path}: the request gave up waiting for its lock")
        return fd
    except BaseException:
        os.close(fd)
        raise


def _close_acquired(acquiring: asyncio.Future) -> None:
    """An abandoned acquisition that got its descriptor after all: close it (in a thread: the
    close of a file on NFS can hang too)."""
    if not acquiring.cancelled() and acquiring.exception() is None:
        threading.Thread(target=os.close, args=(acquiring.result(),), daemon=True).start()
