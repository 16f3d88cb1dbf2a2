"""Post-copy migrations in flight on this agent, one object per operation and side.

Source (PostCopySource): the lazy dump has frozen the container, written its images
(without memory) and serves the pages over TLS. When the page server's peer closes,
CRIU leaves the source frozen, network locked (LazyDump keep_source): that happens
when every page has moved, but also when the destination's container died, so the
source is stopped only once the controller says the destination has everything
(release), and kept otherwise. "Kept": dumped whole into a checkpoint on disk and
stopped, never run again by itself (the destination may have run the container
meanwhile, DESIGN.md rule 1), so that it can be started again from its state at the
freeze once its destination copy is known to be gone. A transfer that breaks (CRIU
fails) is kept at once, controller or not.

Destination (PostCopyTarget): `criu lazy-pages` pulls the pages while the restored
container runs. If the transfer fails the container is killed (LazyRestore does it):
its missing memory cannot come back.

Both are watched by a task of their own, so that the outcome is known (and the
source's checkpoint kept) whether or not the controller is there to ask.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

import structlog

from agent.runtime.checkpoint import LazyDump, LazyDumpReady, LazyRestore, RestoreResult
from agent.runtime.checkpoint import TlsFiles as CriuTls
from corral import pki
from corral.errors import CorralError

log = structlog.get_logger("corral.agent.postcopy")


class PagesState(enum.Enum):
    MOVING = "moving"
    DONE = "done"
    FAILED = "failed"
    UNKNOWN = "unknown"  # no post-copy of that operation here


@dataclass(frozen=True)
class PagesStatus:
    state: PagesState
    bytes_done: int = 0
    bytes_total: int = 0
    pages_done_at: float | None = None
    detail: str = ""
    kept_checkpoint: Path | None = None


def write_tls_files(directory: Path, ca: bytes, cert: bytes, key: bytes) -> CriuTls:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    files = CriuTls(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    for path, data in ((files.cacert, ca), (files.cert, cert), (files.key, key)):
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return files


@dataclass(frozen=True)
class LazyCheckpoint:
    """What the controller needs of a post-copy source: where its pages are served, and the
    one certificate that may pull them."""

    ready: LazyDumpReady
    address: str
    port: int
    frozen_at: float | None  # when our freezer script froze it (the start of the downtime)
    lazy_bytes: int
    client_tls: pki.OneTimeClient  # for the destination: the one certificate that may pull the pages


def _describe(exc: BaseException) -> str:
    return exc.message if isinstance(exc, CorralError) else repr(exc)


class PostCopySource:
    """States: serving (CRIU serves pages), served (its peer closed the connection: every page
    moved, or the destination's tasks are gone; the source is frozen, awaiting the verdict),
    failed (the transfer broke: kept as a checkpoint on disk, or frozen if that failed too).
    PagesStatus reports serving as MOVING, served as DONE, failed as FAILED."""

    def __init__(self, op_id: str, name: str, lazy: LazyDump, info: LazyCheckpoint,
                 keep_checkpoint: Callable[[], Awaitable[Path]]) -> None:  # fmt: skip
        self.op_id, self.name, self.lazy, self.info = op_id, name, lazy, info
        self._keep_checkpoint = keep_checkpoint
        self._log = log.bind(op=op_id, container=name, side="source")
        self.state = PagesState.MOVING
        self.detail = ""
        self.kept: Path | None = None
        self.done_at: float | None = None
        self._keeping = asyncio.Lock()
        self._aborted = False
        self.task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        try:
            dump = await self.lazy.finished()
        except Exception as exc:  # noqa: BLE001 - any failure: keep what can be kept
            if self._aborted:
                return  # stopped on purpose (rollback): the caller resumes it
            await self.keep(f"the page transfer failed: {_describe(exc)}")
            return
        self.done_at = dump.finished_at
        self.state = PagesState.DONE
        self._log.info("post-copy source served its pages; it waits frozen", s=round(dump.wall_ms / 1000, 2))

    async def keep(self, why: str) -> None:
        """Dump the frozen source whole into a checkpoint on disk and stop it (never run it)."""
        async with self._keeping:
            if self.state == PagesState.FAILED:
                return
            self.detail = why
            self._log.warning("keeping the post-copy source as a checkpoint", why=why)
            try:
                self.kept = await self._keep_checkpoint()
                self._log.info("post-copy source kept as a checkpoint", path=str(self.kept))
            except Exception as exc:  # noqa: BLE001
                self.detail += f"; keeping a checkpoint of the source failed ({_describe(exc)}): it stays frozen here"
                self._log.error("could not keep a checkpoint of the post-copy source", error=_describe(exc))
            self.state = PagesState.FAILED

    @property
    def serving(self) -> bool:
        return not self.task.done() and not self._aborted

    def status(self) -> PagesStatus:
        if self.state == PagesState.MOVING or self._keeping.locked():
            return PagesStatus(PagesState.MOVING)
        return PagesStatus(self.state, pages_done_at=self.done_at, detail=self.detail, kept_checkpoint=self.kept)

    async def wait(self, timeout: float) -> None:
        """Until the page server has ended (and a failed source is kept), at most `timeout` s."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.shield(self.task)
                async with self._keeping:
                    pass

    async def abort(self) -> None:
        """Stop serving pages (the destination never ran the container). The source stays
        frozen, its network locked: the caller resumes it (LazyDump.resume_source)."""
        self._aborted = True
        await self.lazy.abort()
        with contextlib.suppress(Exception):
            await self.task

    async def stop_and_keep(self, timeout: float) -> PagesStatus:
        """The destination's copy is gone: keep the source as a checkpoint, stopped. If CRIU still
        serves (a destination that died without closing its connection), stop it first."""
        if self.serving:
            self._log.warning("destination gone: stopping the page server, keeping the source")
            await self.lazy.abort()  # frozen first, then CRIU killed: the watcher sees the failure and keeps it
        await self.wait(timeout)
        if self.state == PagesState.DONE:
            await self.keep("the destination's copy ended before it had every page")
        return self.status()


class PostCopyTarget:
    def __init__(self, op_id: str, name: str, lazy: LazyRestore, running: RestoreResult, bytes_total: int,
                 memory_usage: Callable[[], int | None]) -> None:  # fmt: skip
        self.op_id, self.name, self.lazy, self.running = op_id, name, lazy, running
        self.bytes_total = bytes_total
        self._memory_usage = memory_usage
        self._baseline = memory_usage() or 0
        self._log = log.bind(op=op_id, container=name, side="destination")
        self.state = PagesState.MOVING
        self.detail = ""
        self.done_at: float | None = None
        self._aborted = False
        self.task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        try:
            self.done_at = await self.lazy.finished()
        except Exception as exc:  # noqa: BLE001
            if self._aborted:
                return
            self.detail = f"{_describe(exc)} (the container was killed here: its memory is incomplete)"
            self.state = PagesState.FAILED
            self._log.warning("post-copy page transfer failed", error=self.detail)
            return
        if not _alive(self.running.init_pid):
            # criu lazy-pages also ends well when the restored tasks are all gone (killed, say).
            self.detail = "the container's processes ended before every page had arrived"
            self.state = PagesState.FAILED
            self._log.warning("post-copy page transfer ended without the container", error=self.detail)
            return
        self.state = PagesState.DONE
        after = round((self.done_at - self.running.finished_at) * 1000)
        self._log.info("post-copy pages all here", ms_after_running=after)

    def status(self) -> PagesStatus:
        if self.state == PagesState.DONE:
            return PagesStatus(PagesState.DONE, self.bytes_total, self.bytes_total, self.done_at)
        if self.state == PagesState.FAILED:
            return PagesStatus(PagesState.FAILED, detail=self.detail)
        # Progress: what the container's memory grew by since it resumed (the pulled pages
        # are charged to its cgroup); an estimate, capped at the lazy total.
        usage = self._memory_usage()
        done = max(0, (usage or 0) - self._baseline)
        return PagesStatus(PagesState.MOVING, min(done, self.bytes_total), self.bytes_total)

    async def wait(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.shield(self.task)

    async def abort(self) -> None:
        """Kill the restored container and the page puller (rollback, or a release)."""
        self._aborted = True
        await self.lazy.abort()
        self.task.cancel()
        with contextlib.suppress(BaseException):
            await self.task


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def memory_usage_of(pid: int) -> int | None:
    """Bytes charged to the memory cgroup of `pid` (cgroup v1 or v2), None if unknown."""
    try:
        cgroups = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    v1 = next((line.split(":", 2)[2] for line in cgroups if "memory" in line.split(":", 2)[1].split(",")), None)
    v2 = next((line.split(":", 2)[2] for line in cgroups if line.startswith("0::")), None)
    for line in mounts:
        pre, _, post = line.partition(" - ")
        fstype, _source, options = (post.split() + ["", "", ""])[:3]
        mount_point = Path(pre.split()[4])
        if v1 is not None and fstype == "cgroup" and "memory" in options.split(","):
            path = mount_point / v1.lstrip("/") / "memory.usage_in_bytes"
        elif v1 is None and v2 is not None and fstype == "cgroup2":
            path = mount_point / v2.lstrip("/") / "memory.current"
        else:
            continue
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            return None
    return None

