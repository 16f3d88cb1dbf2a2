"""The agent's part in migrations: receive, send, checkpoint, restore, adopt, release.

The controller drives; each call here is one step, safe to repeat after a
controller restart, and finished even if the controller goes away mid-call
(shielded), so what the controller later observes is a completed step.

Layout under the agent's state directory:
  staging/<op>/rootfs, staging/<op>/checkpoint   what a destination receives
  staging/<op>/<op>-predump/<n>                  pre-copy: the pre-dumps it received
  checkpoints/<op>/                              a source's own dump (for rollback); post-copy:
                                                 its images without memory, and after a failed
                                                 page transfer a complete checkpoint ("kept")
  checkpoints/<op>-predump/<n>                   pre-copy: the source's memory pre-dumps
  checkpoints/<op>-lazy/                         a failed post-copy dump, kept for its logs
  checkpoints/<op>-tls/, <op>-trial/             one-time TLS files; a pre-flight trial dump's scratch
  checkpoints/<op>.json                          which container the op's dumps are of (sweeps)

Leftovers are swept (sweep_leftovers, at start; sweep_expired, as grants expire): what
no live grant, running CRIU, kept checkpoint or possible rollback still needs.

Post-copy (see agent/postcopy.py): the source's page server and the destination's
page puller authenticate each other with certificates of a CA the source makes for that
one transfer (CRIU's TLS; the client's key reaches the destination through the
controller, as the transfer key does); the images (no memory) go through the
per-operation channel like any other.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import structlog

from agent.containers import ContainerManager
from agent.host_facts import meminfo
from agent.postcopy import LazyCheckpoint, PagesState, PagesStatus, PostCopySource, PostCopyTarget
from agent.postcopy import memory_usage_of, write_tls_files
from agent.records import write_durably
from agent.runtime.checkpoint import DUMP_CONFIG, Checkpointer, CriuTimes, DumpResult, PageServer, RestoreResult
from agent.runtime.checkpoint import TlsFiles as CriuTls
from agent.runtime.criu_pagemap import lazy_bytes
from agent.runtime.freezer import NETLOCKED, PREFROZEN_MARK, read_frozen_at
from agent.runtime.tool_process import tools_under
from agent.transfer.client import PushTarget, TransferProgress, TransferStats, rsync_push, split_address
from agent.transfer.grants import GrantRegistry
from agent.transfer.landing import LandingFile, is_memory_image, landing_size
from agent.transfer.server import TransferServer
from agent.transfer.stream_push import StreamPusher
from agent.transfer import tls_stream
from agent.transfer.tls_stream import ImagesReceiver
from corral import pki
from corral.errors import AlreadyExists, CorralError, FailedPrecondition, InvalidArgument, NotFound
from corral.model import Container
from corral.names import validate_name

log = structlog.get_logger("corral.agent.migration")

ROOTFS = "rootfs"
CHECKPOINT = "checkpoint"
PREDUMP = "predump"
# Post-copy: the page transfer (and the whole lazy dump or restore) must end within this. Long:
# when it passes, the destination's copy dies (its memory is incomplete).
PAGES_DEADLINE = 3600.0
ONE_TIME_TLS_VALIDITY = datetime.timedelta(seconds=PAGES_DEADLINE + 3600)  # a post-copy's page server
KEEP_TIMEOUT = 600.0  # dumping a failed post-copy source to disk (its whole memory)
SOURCE_FINISH_WAIT = 60.0  # release: for the source's CRIU to exit once every page has moved
KEPT_MARK = "corral-kept.json"  # a complete checkpoint a failed post-copy source left
SWEEP_INTERVAL = 60.0  # how often expired grants' staging is looked for
STALE_PREDUMPS = 24 * 3600.0  # pre-dumps this old belong to no migration still running
MAX_LANDING_WAIT = 300.0  # s an AwaitLanding may hold its call, whatever it asks


@dataclass(frozen=True)
class SendAlong:
    """Send with the checkpoint, in one step: the rootfs delta (`rootfs`) while the dump runs,
    the images once they are written, or (`while_dumping`) the memory images as CRIU writes
    them and the rest once it is done. Why: all of it is on the downtime's critical path; the
    container is frozen from the start of the dump, so its rootfs no longer changes then."""

    target: PushTarget
    rootfs: bool
    timeout: float
    while_dumping: bool = False  # the memory images as CRIU writes them (the receiver takes pieces)
    compress: bool = False  # those compressed where it pays (the receiver takes compressed pieces)
    images_port: int = 0  # the destination's TLS endpoint for them (tls_stream.py), if it has one
    images_tls: pki.OneTimeClient | None = None


@dataclass(frozen=True)
class Sent:
    images: TransferStats
    rootfs: TransferStats | None
    after_dump_ms: float  # from the end of the dump until the last byte was sent
    finished_at: float = field(default_factory=time.time)  # when the last byte was sent


@dataclass
class _Sending:
    """The images a checkpoint step is sending along, as they go (for WatchSending)."""

    latest: TransferProgress | None = None
    done: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def update(self, progress: TransferProgress) -> None:
        self.latest = progress
        self.changed.set()

    def finish(self) -> None:
        self.done = True
        self.changed.set()


@dataclass(frozen=True)
class Grant:
    address: str
    user: str
    host_key: str
    images_port: int = 0  # the operation's TLS endpoint for checkpoint images (0: none)
    images_tls: pki.OneTimeClient | None = None


class Migrations:
    def __init__(
        self,
        containers: ContainerManager,
        transfer: TransferServer,
        grants: GrantRegistry,
        checkpointer: Checkpointer,
        state_dir: Path,
        preflight_trial_max_bytes: int = 0,
        images_endpoint: bool = True,
        images_landing: bool = True,
    ) -> None:
        self.containers = containers
        self.preflight_trial_max_bytes = preflight_trial_max_bytes
        self.images_endpoint = images_endpoint
        self.images_landing = images_landing
        self.transfer = transfer
        self.grants = grants
        self.checkpointer = checkpointer
        self.staging_root = grants.staging_root
        self.checkpoints_root = state_dir / "checkpoints"
        self.checkpoints_root.mkdir(parents=True, exist_ok=True)
        self.pusher = StreamPusher()
        self._background: set[asyncio.Task] = set()
        self._sources: dict[str, PostCopySource] = {}
        self._targets: dict[str, PostCopyTarget] = {}
        self._sending: dict[str, _Sending] = {}
        self._receivers: dict[str, ImagesReceiver] = {}

    async def close(self) -> None:
        self.grants.stop_landings()
        await self.pusher.close()
        for op_id in list(self._receivers):
            await self._close_receiver(op_id)

    async def _shielded(self, coro: Awaitable[Any]) -> Any:
        """Run to completion even if the caller (the controller) disconnects."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return await asyncio.shield(task)

    def _checkpoint_dir(self, op_id: str) -> Path:
        return self.checkpoints_root / _op(op_id)

    def _staging(self, op_id: str) -> Path:
        return self.staging_root / _op(op_id)

    def _predumps(self, op_id: str) -> Path:
        return self.checkpoints_root / f"{_op(op_id)}-predump"

    def _page_server_tls_dir(self, op_id: str) -> Path:
        """A post-copy source's one-time TLS files: beside its images, never among them (the
        images are sent to the destination, the server's key must not be)."""
        return self.checkpoints_root / f"{_op(op_id)}-tls"

    # -- destination -------------------------------------------------------------

    async def prepare_receive(self, op_id: str, container: str, public_key: str, ttl: float,
                              expect_image_bytes: int = 0) -> Grant:  # fmt: skip
        """Open receiving for the operation; `expect_image_bytes`: the memory its images will
        hold (as the pre-flight saw it), for which page cache is prepared now (landing.py)."""
        validate_name(container)
        if self.containers.exists(container):
            raise AlreadyExists(f"container {container!r} already exists on node {self.containers.node!r}")
        if not public_key.startswith("ssh-"):
            raise InvalidArgument("the operation's public key must be in OpenSSH format")
        if expect_image_bytes < 0:
            raise InvalidArgument(f"expected image bytes must not be negative, got {expect_image_bytes}")
        grant = self.grants.authorize(_op(op_id), public_key, ttl)
        images_port, client = await self._open_receiver(op_id, ttl)
        landing = await self._prepare_landing(op_id, grant.staging, expect_image_bytes)
        log.info("receive channel open", op=op_id, container=container, user=grant.user, images_port=images_port,
                 landing_bytes=landing)  # fmt: skip
        return Grant(self.transfer.address, grant.user, self.transfer.host_key, images_port, client)

    async def _prepare_landing(self, op_id: str, staging: Path, expected: int) -> int:
        """Start writing the landing file for `expected` bytes of images; its size (0: none)."""
        if not self.images_landing or self.grants.landing(op_id) is not None:
            return 0  # off, or a repeated prepare: the one being written stands
        size = landing_size(expected, (await asyncio.to_thread(meminfo))[1])
        if size:
            landing = LandingFile(staging, size)
            self.grants.attach_landing(op_id, landing)
            landing.start()
        return size

    async def await_landing(self, op_id: str, timeout: float) -> tuple[bool, int]:
        """Wait at most `timeout` s for the operation's landing file to be whole: (whole, size);
        (False, 0) if it has none. One not whole by then is landed on as far as it got."""
        landing = self.grants.landing(_op(op_id))
        if landing is None:
            return False, 0
        try:
            wait = min(max(0.0, timeout), MAX_LANDING_WAIT)
            return await asyncio.wait_for(asyncio.shield(landing.prepared()), wait), landing.size
        except TimeoutError:
            return False, landing.size

    async def _open_receiver(self, op_id: str, ttl: float) -> tuple[int, pki.OneTimeClient | None]:
        """The operation's TLS endpoint for its checkpoint images (tls_stream.py), with a one-time
        CA; (0, None) if it cannot open (the images then come over SSH)."""
        await self._close_receiver(op_id)  # a repeated prepare: a new CA, the old client refused
        if not self.images_endpoint:
            return 0, None
        host = split_address(self.transfer.address)[0]
        try:
            one_time = await asyncio.to_thread(pki.one_time_tls, host, datetime.timedelta(seconds=ttl + 3600),
                                               f"images of {op_id}")  # fmt: skip
            receiver = await asyncio.to_thread(ImagesReceiver.open, host, self._staging(op_id) / CHECKPOINT, one_time,
                                               self.checkpoints_root, op_id, lambda: self.grants.landing(op_id))  # fmt: skip
        except (OSError, CorralError) as e:
            log.warning("no TLS endpoint for the images, they will come over SSH", op=op_id, error=str(e)[:200])
            return 0, None
        receiver.start()
        self._receivers[op_id] = receiver
        return receiver.port, one_time.client()

    async def _close_receiver(self, op_id: str) -> None:
        receiver = self._receivers.pop(op_id, None)
        if receiver is not None:
            await receiver.close()

    async def finish_receive(self, op_id: str, discard: bool) -> None:
        target = self._targets.get(op_id)
        if target is not None and target.state == PagesState.MOVING and not discard:
            raise FailedPrecondition(f"operation {op_id}: pages are still arriving from the source")
        self._targets.pop(op_id, None)
        await self._close_receiver(op_id)
        # Whatever is still in staging was not adopted (or was only needed to restore): it goes.
        await asyncio.to_thread(self.grants.revoke, _op(op_id), remove_staging=True)
        await asyncio.to_thread(shutil.rmtree, self._page_server_tls_dir(op_id), True)
        log.info("receive channel closed", op=op_id, discarded=discard)

    async def adopt(self, op_id: str, container: Container, takeover_from: str = "") -> Container:
        """Make the container from what was received (its rootfs), with its record and config;
        or, on shared storage, from its volume (taken over from a dead node on failover)."""
        staged = self._staging(op_id) / ROOTFS
        return await self._shielded(self.containers.adopt(container, staged, takeover_from=takeover_from))

    async def restore(
        self, op_id: str, name: str, local: bool, lazy_from: tuple[str, int] | None = None,
        lazy_tls: pki.OneTimeClient | None = None,
    ) -> tuple[Container, RestoreResult]:
        images = self._checkpoint_dir(op_id) if local else self._staging(op_id) / CHECKPOINT
        if not (images / "inventory.img").is_file():
            raise NotFound(f"no checkpoint images for {name!r} at {images}")
        if lazy_from is not None:
            if local:
                raise InvalidArgument("a post-copy restore takes the images received from the source")
            return await self._lazy_restore(op_id, name, images, lazy_from, lazy_tls)
        if _is_lazy(images):
            # Its memory is not in it (it was served to the destination): never restore that.
            raise FailedPrecondition(f"the checkpoint at {images} is a post-copy dump without memory")

        async def work():
            async with self.containers.lock(name):
                result = await self.checkpointer.restore(name, images)
                self.containers.intend(name, True)
                log.info("restored", op=op_id, container=name, local=local, ms=round(result.wall_ms, 1))
                if local:  # a rolled-back source runs again: its dumps are stale now
                    await self._forget_dumps(op_id)
            return await self.containers.get(name), result

        return await self._shielded(work())

    async def _lazy_restore(
        self, op_id: str, name: str, images: Path, source: tuple[str, int], client_tls: pki.OneTimeClient | None
    ) -> tuple[Container, RestoreResult]:
        """Post-copy destination: restore, pulling the memory from the source's page server
        with the one-time client certificate the source made for this transfer. Returns once
        the container runs; its pages go on arriving (wait_pages)."""
        if client_tls is None:
            raise InvalidArgument("a post-copy restore needs the page server's one-time TLS: "
                                  "pages never cross the network in clear")  # fmt: skip
        existing = self._targets.get(op_id)
        if existing is not None:  # a repeated step
            return await self.containers.get(name), existing.running
        # Not in staging: the source can write there.
        files = await asyncio.to_thread(write_tls_files, self._page_server_tls_dir(op_id), client_tls.ca, client_tls.cert,
                                        client_tls.key)  # fmt: skip
        server = PageServer(source[0], source[1], files)

        async def work():
            async with self.containers.lock(name):
                lazy = await self.checkpointer.start_lazy_restore(name, images, server, timeout=PAGES_DEADLINE)
                self.containers.intend(name, True)
                running = await lazy.running()
                # Counted once it runs (~30 ms of parsing at 1 GiB, holding the GIL): not while the
                # restore is watched, where it delayed seeing the container run.
                total = await asyncio.to_thread(lazy_bytes, images)
                pid = running.init_pid
                usage = lambda: memory_usage_of(pid) if pid else None  # noqa: E731
                target = PostCopyTarget(op_id, name, lazy, running, total, usage)
                self._targets[op_id] = target
                log.info("post-copy restore running", op=op_id, container=name, ms=round(running.wall_ms, 1),
                         lazy_bytes=total, source=f"{source[0]}:{source[1]}")  # fmt: skip
            return await self.containers.get(name), running

        return await self._shielded(work())

    # -- post-copy, either side ------------------------------------------------------

    async def wait_pages(self, op_id: str, interval: float = 0.5) -> AsyncIterator[PagesStatus]:
        """The page transfer of `op_id` as it goes, ending with its outcome (DONE or FAILED;
        UNKNOWN at once if this agent has none: it restarted, or never had one)."""
        _op(op_id)
        side: PostCopyTarget | PostCopySource | None = self._targets.get(op_id) or self._sources.get(op_id)
        if side is None:
            images = self._checkpoint_dir(op_id)
            if _is_lazy(images) and not (images / KEPT_MARK).exists():
                # Served by a page server an earlier run of this agent started: moving while it
                # runs; how it ended, only the destination can tell.
                while await self.checkpointer.orphaned_dump_running(images):
                    yield PagesStatus(PagesState.MOVING, detail="served by a page server this agent lost track of")
                    await asyncio.sleep(interval)
                yield self._unknown(op_id)
                return
            if (images / KEPT_MARK).is_file():  # kept before this agent restarted
                yield PagesStatus(PagesState.FAILED, detail="kept after a failed page transfer", kept_checkpoint=images)
            else:
                yield self._unknown(op_id)
            return
        while True:
            status = side.status()
            yield status
            if status.state != PagesState.MOVING:
                return
            await side.wait(interval)

    # -- source ------------------------------------------------------------------

    async def send(
        self, op_id: str, name: str, content: str, target: PushTarget, timeout: float,
        progress: Callable[[TransferProgress], None],
    ) -> TransferStats:  # fmt: skip
        dest = content
        if content == ROOTFS:
            source = self.containers.rootfs(name)
        elif content == CHECKPOINT:
            source = self._checkpoint_dir(op_id)
        elif content == PREDUMP:
            # Same name on both sides: the final dump's `parent` link is relative (../<op>-predump/N).
            source = self._predumps(op_id)
            dest = source.name
        else:
            raise InvalidArgument(f"unknown transfer content {content!r}")
        if not source.is_dir():
            raise NotFound(f"nothing to send: {source} does not exist")
        if content == CHECKPOINT:
            return await self._push_images(source, target, timeout)
        self.pusher.warm(target)  # for the images, later, while the container is frozen
        return await rsync_push(source, target, dest, progress=progress, timeout=timeout)

    async def _push_images(self, images: Path, target: PushTarget, timeout: float,
                           progress: Callable[[TransferProgress], None] | None = None) -> TransferStats:  # fmt: skip
        """Checkpoint images: in-process over a connection opened before (flat directory), else
        (a pre-copy dump's `parent` link) by rsync."""
        sent = await self.pusher.push(images, target, CHECKPOINT, timeout=timeout, progress=progress)
        if sent is None:
            sent = await rsync_push(images, target, CHECKPOINT, timeout=timeout, progress=progress)
        return sent

    async def watch_sending(self, op_id: str, wait: float = 600.0) -> AsyncIterator[TransferProgress]:
        """The images operation `op_id`'s checkpoint sends along, as they go: waits (at most
        `wait` s) for that send to begin, ends after its last update."""
        _op(op_id)
        deadline = time.monotonic() + wait
        while op_id not in self._sending:
            if time.monotonic() >= deadline:
                return
            await asyncio.sleep(0.05)
        sending, last = self._sending[op_id], None
        while True:
            sending.changed.clear()
            if sending.latest is not None and sending.latest is not last:
                last = sending.latest
                yield last
            if sending.done:
                return
            await sending.changed.wait()

    async def _dump_and_send(self, op_id: str, name: str, images: Path, dumping: Awaitable[Any],
                             send: SendAlong | None, flat_images: bool = False) -> tuple[Any, Sent | None]:  # fmt: skip
        """Await `dumping` (done once the images are written) and, with `send`, send along (see
        SendAlong). A failed dump sends nothing; a failed send fails the step (the dump stands:
        the controller rolls back from it)."""
        if send is None:
            return await dumping, None
        sending = self._sending[op_id] = _Sending()
        dump = asyncio.ensure_future(dumping)
        rootfs = asyncio.ensure_future(self._rootfs_once_frozen(name, images, dump, send)) if send.rootfs else None
        # The memory images as CRIU writes them, the rest the moment the dump is done, on a stream
        # opened when it starts (`flat_images`: a dump into a fresh flat directory; a pre-copy
        # dump links its parent, and goes by rsync after it).
        following = None
        if send.while_dumping and flat_images:
            following = asyncio.ensure_future(self._push_following(images, send, dump, sending.update))
        try:
            try:
                result = await dump
            except BaseException:
                if following is not None:  # nothing of a failed dump is worth sending
                    following.cancel()
                raise
            dumped = time.monotonic()
            if following is not None:
                images_sent = await following
            else:
                images_sent = await self._push_images(images, send.target, send.timeout, sending.update)
            rootfs_sent = await rootfs if rootfs is not None else None
        finally:
            sending.finish()
            for task in (dump, rootfs, following):
                if task is not None and not task.done():
                    task.cancel()
        return result, Sent(images_sent, rootfs_sent, (time.monotonic() - dumped) * 1000)

    async def _push_following(self, images: Path, send: SendAlong, dump: asyncio.Future,
                              progress: Callable[[TransferProgress], None]) -> TransferStats:  # fmt: skip
        """The images as CRIU writes them: to the destination's TLS endpoint if it has one and
        it answers, else over the SSH connection."""
        if send.images_port and send.images_tls is not None:
            sent = await tls_stream.push_while_writing(
                images, split_address(send.target.address)[0], send.images_port, send.images_tls,
                self.checkpoints_root, writing=dump, grows=is_memory_image, compress=send.compress,
                timeout=send.timeout, progress=progress,
            )  # fmt: skip
            if sent is not None:
                return sent
        return await self.pusher.push_while_writing(images, send.target, CHECKPOINT, writing=dump,
                                                    grows=is_memory_image, timeout=send.timeout,
                                                    progress=progress, compress=send.compress)  # fmt: skip

    async def _rootfs_once_frozen(self, name: str, images: Path, dump: asyncio.Future,
                                  send: SendAlong) -> TransferStats | None:  # fmt: skip
        """The rootfs delta, from the moment the freeze holds (the dump's action script marks it),
        or after the dump if it never says so (the freezing was left to CRIU)."""
        mark = images / PREFROZEN_MARK
        while not dump.done() and not mark.exists():
            await asyncio.sleep(0.002)
        if dump.done() and (dump.cancelled() or dump.exception() is not None):
            return None
        return await rsync_push(self.containers.rootfs(name), send.target, ROOTFS, timeout=send.timeout)

    async def checkpoint(
        self, op_id: str, name: str, trial: bool, parent_predump: int = 0, send: SendAlong | None = None
    ) -> tuple[DumpResult, Sent | None]:
        """The pre-flight (`trial`: nothing stops, see _preflight), or the real dump (stops): for pre-copy, as the delta
        from pre-dump number `parent_predump`; with `send`, sent along (SendAlong)."""
        if trial and send is not None:
            raise InvalidArgument("a trial dump is not sent anywhere")
        self.containers.record(name)
        parent = self._predumps(op_id) / str(parent_predump) if parent_predump else None
        if parent is not None and not (parent / "inventory.img").is_file():
            raise NotFound(f"no pre-dump {parent_predump} of operation {op_id} at {parent}")

        async def work():
            async with self.containers.lock(name):
                if name not in self.containers.runtime.running_names():
                    raise FailedPrecondition(f"container {name!r} is not running")
                if trial:
                    return await self._preflight(op_id, name), None
                images = self._checkpoint_dir(op_id)
                if images.exists():
                    await asyncio.to_thread(shutil.rmtree, images)
                await self._note_container(op_id, name)
                self.containers.intend(name, False)  # the dump stops it: not a crash
                dumping = self.checkpointer.dump(name, images, stop=True, parent=parent)
                result, sent = await self._dump_and_send(op_id, name, images, dumping, send, flat_images=parent is None)
                log.info("checkpointed", op=op_id, container=name, ms=round(result.wall_ms, 1),
                         parent_predump=parent_predump or None,
                         sent_after_ms=round(sent.after_dump_ms, 1) if sent else None)  # fmt: skip
                return result, sent

        return await self._shielded(work())

    async def _preflight(self, op_id: str, name: str) -> DumpResult:
        """Can CRIU dump `name`? A look at its tasks in /proc, which never stops it
        (Checkpointer.inspect); then, only if the host's config asks for it for a container of
        that little memory (`preflight_trial_max_bytes`), a trial dump, which also catches what
        that look cannot see, at the cost of a pause (~200 ms for a small container here)."""
        started_at = time.time()
        verdict = await self.checkpointer.inspect(name)
        log.info("pre-flight inspection", op=op_id, container=name, tasks=verdict.tasks, files=verdict.files,
                 memory_bytes=verdict.memory_bytes, ms=round(verdict.ms, 1), blockers=len(verdict.blockers))  # fmt: skip
        if not verdict.dumpable:
            raise FailedPrecondition(f"CRIU would refuse to dump {name!r}: {verdict.reason()}")
        if self.preflight_trial_max_bytes and verdict.memory_bytes <= self.preflight_trial_max_bytes:
            trial = await self.checkpointer.trial_dump(name, self.checkpoints_root / f"{_op(op_id)}-trial")
            return dataclasses.replace(trial, memory_bytes=verdict.memory_bytes)
        return DumpResult(Path(), verdict.ms, started_at, CriuTimes(), 0, started_at + verdict.ms / 1000,
                          memory_bytes=verdict.memory_bytes)  # fmt: skip

    async def predump(self, op_id: str, name: str, iteration: int) -> DumpResult:
        """Pre-copy: memory pre-dump number `iteration` (1, 2...), each the delta from the one
        before; the container keeps running. Needs the kernel's dirty-memory tracking."""
        if iteration < 1:
            raise InvalidArgument("pre-dump iterations are numbered from 1")
        self.containers.record(name)
        root = self._predumps(op_id)
        images, parent = root / str(iteration), (root / str(iteration - 1) if iteration > 1 else None)

        async def work():
            async with self.containers.lock(name):
                if name not in self.containers.runtime.running_names():
                    raise FailedPrecondition(f"container {name!r} is not running")
                if images.exists():
                    await asyncio.to_thread(shutil.rmtree, images)
                await self._note_container(op_id, name)
                result = await self.checkpointer.predump(name, images, parent)
                log.info("pre-dumped", op=op_id, container=name, iteration=iteration,
                         pages_written=result.criu.pages_written, ms=round(result.wall_ms, 1))  # fmt: skip
                return result

        return await self._shielded(work())

    async def lazy_checkpoint(
        self, op_id: str, name: str, send: SendAlong | None = None
    ) -> tuple[LazyCheckpoint, Sent | None]:
        """Post-copy source: freeze, dump all but the memory, serve the pages from a free port
        of this host's address (TLS). Returns once the images are written and it listens (and,
        with `send`, were sent along)."""
        self.containers.record(name)
        existing = self._sources.get(op_id)
        if existing is not None:  # a repeated step
            if send is None:
                return existing.info, None
            images_sent = await self._push_images(self._checkpoint_dir(op_id), send.target, send.timeout)
            rootfs_sent = (await rsync_push(self.containers.rootfs(name), send.target, ROOTFS, timeout=send.timeout)
                           if send.rootfs else None)  # fmt: skip
            return existing.info, Sent(images_sent, rootfs_sent, 0.0)
        host = split_address(self.transfer.address)[0]

        async def work():
            async with self.containers.lock(name):
                if name not in self.containers.runtime.running_names():
                    raise FailedPrecondition(f"container {name!r} is not running")
                images = self._checkpoint_dir(op_id)
                if images.exists():
                    await asyncio.to_thread(shutil.rmtree, images)
                await self._note_container(op_id, name)
                # Only the holder of this transfer's client certificate may pull the pages: a
                # fleet certificate would let any agent or user read the container's memory.
                one_time = await asyncio.to_thread(pki.one_time_tls, host, ONE_TIME_TLS_VALIDITY, f"pages of {op_id}")
                server_files = await asyncio.to_thread(_write_server_tls, one_time, self._page_server_tls_dir(op_id))
                server = PageServer(host, await asyncio.to_thread(_free_port, host), server_files)
                self.containers.intend(name, False)  # the dump stops it: not a crash
                lazy = await self.checkpointer.start_lazy_dump(name, images, server, timeout=PAGES_DEADLINE,
                                                               keep_source=True)  # fmt: skip

                async def serving() -> LazyCheckpoint:
                    ready = await lazy.images_ready()
                    if not lazy.keeps_source_frozen:
                        # Then a failed transfer would let CRIU thaw the source while the destination runs it.
                        why = lazy.why_source_not_kept()  # read before the images are cleaned up
                        await lazy.abort()
                        await lazy.resume_source()
                        raise FailedPrecondition(f"post-copy of {name!r} refused, the source could not be kept "
                                                 f"stopped if the page transfer failed: {why}")
                    # lazy_bytes 0: the destination counts what it pulls. Here the count (~30 ms of
                    # parsing at 1 GiB, holding the GIL) would delay sending the images: the downtime.
                    info = LazyCheckpoint(ready, server.address, server.port, read_frozen_at(images), 0,
                                          one_time.client())  # fmt: skip
                    # Known before anything is sent: a failed send rolls back through resume_source.
                    self._sources[op_id] = PostCopySource(op_id, name, lazy, info,
                                                          lambda: self._keep_source(op_id, name))  # fmt: skip
                    log.info("post-copy source serving", op=op_id, container=name, port=server.port,
                             images_ms=round(ready.wall_ms, 1))  # fmt: skip
                    return info

                # (A lazy dump writes no page images to follow: the stream only saves opening it later.)
                return await self._dump_and_send(op_id, name, images, serving(), send, flat_images=True)

        return await self._shielded(work())

    async def _keep_source(self, op_id: str, name: str) -> Path:
        """A post-copy source whose page transfer failed (frozen, network locked): dump it whole,
        memory and all, into checkpoints/<op>/ and stop it. It is never resumed from here."""
        images, aside = self._checkpoint_dir(op_id), self.checkpoints_root / f"{_op(op_id)}-lazy"
        if aside.exists():
            await asyncio.to_thread(shutil.rmtree, aside)
        await asyncio.to_thread(images.rename, aside)  # the failed dump's logs say what went wrong
        async with self.containers.lock(name):
            self.containers.intend(name, False)  # the dump stops it: not a crash
            result = await self.checkpointer.dump(name, images, stop=True, resume_on_failure=False,
                                                  timeout=KEEP_TIMEOUT)  # fmt: skip
        mark = {"op": op_id, "container": name, "kept_at": time.time(), "images_bytes": result.images_bytes,
                "frozen_at": read_frozen_at(aside)}  # fmt: skip
        # Durable: it decides whether this checkpoint may ever be resumed (--from-checkpoint).
        await asyncio.to_thread(write_durably, images / KEPT_MARK, json.dumps(mark) + "\n")
        return images

    async def resume_source(self, op_id: str, name: str) -> Container:
        """Post-copy, only once the destination's copy is known to be gone (rollback, or the
        operator's choice after a failure): the source runs on as it was at the freeze, thawed
        if it is still frozen here, whole, else restored from the checkpoint it kept."""
        self.containers.record(name)

        async def work():
            await self._after_step_in_flight(name)
            source = self._sources.get(op_id)
            if source is not None:
                if source.serving:
                    await source.abort()
                await source.wait(KEEP_TIMEOUT)
                if source.kept is None:
                    # Still frozen here, whole (served, or aborted, or not kept): thaw it, unlock it.
                    await source.lazy.resume_source()
                    self._sources.pop(op_id, None)
                    log.info("post-copy source resumed", op=op_id, container=name)
                    await self._forget_dumps(op_id)  # it runs again: its dump without memory is stale
                    return await self.containers.get(name)
            images = self._checkpoint_dir(op_id)
            if await self._orphaned_source(op_id, name):
                # This agent restarted while serving its pages: still frozen here, whole.
                await self.checkpointer.stop_orphaned_dump(name, images)
                await self.checkpointer.resume_frozen(name)
                log.info("post-copy source resumed after an agent restart", op=op_id, container=name)
                await self._forget_dumps(op_id)
                return await self.containers.get(name)
            if name in self.containers.runtime.running_names():
                return await self.containers.get(name)
            if not (images / KEPT_MARK).is_file():
                raise FailedPrecondition(f"{name!r} cannot resume here: no complete checkpoint at {images}")
            async with self.containers.lock(name):
                result = await self.checkpointer.restore(name, images)
                self.containers.intend(name, True)
                # Its network namespace was saved with the failed dump's lock in it.
                await self.checkpointer.unlock_network(name)
            log.info("post-copy source restored from its kept checkpoint", op=op_id, container=name,
                     ms=round(result.wall_ms, 1))  # fmt: skip
            self._sources.pop(op_id, None)
            await self._forget_dumps(op_id)  # it runs again: stale now
            return await self.containers.get(name)

        return await self._shielded(work())

    async def keep_source(self, op_id: str, name: str) -> PagesStatus:
        """Post-copy source whose destination copy is gone: stop serving its pages and keep it
        as a complete checkpoint here, stopped. Never lets it run."""
        self.containers.record(name)
        await self._after_step_in_flight(name)
        source = self._sources.get(op_id)
        if source is not None:
            return await self._shielded(source.stop_and_keep(KEEP_TIMEOUT))
        images = self._checkpoint_dir(op_id)
        if (images / KEPT_MARK).is_file():  # kept before this agent restarted
            return PagesStatus(PagesState.FAILED, detail="kept after a failed page transfer", kept_checkpoint=images)
        if await self._orphaned_source(op_id, name):
            return await self._shielded(self._keep_orphaned_source(op_id, name))
        return self._unknown(op_id)

    async def _orphaned_source(self, op_id: str, name: str) -> bool:
        """A post-copy source an earlier run of this agent was serving: its lazy dump is on disk,
        not kept, and the container is still here (frozen, its network locked by us)."""
        images = self._checkpoint_dir(op_id)
        if op_id in self._sources or not _is_lazy(images) or (images / KEPT_MARK).exists():
            return False
        return (images / NETLOCKED).exists() and name in self.containers.runtime.running_names()

    async def _keep_orphaned_source(self, op_id: str, name: str) -> PagesStatus:
        if not await self.checkpointer.stop_orphaned_dump(name, self._checkpoint_dir(op_id)):
            return PagesStatus(PagesState.FAILED, detail=f"{name} could not be frozen to keep it")
        kept = await self._keep_source(op_id, name)
        log.warning("post-copy source kept after an agent restart", op=op_id, container=name, kept=str(kept))
        return PagesStatus(PagesState.FAILED, detail="kept after a failed page transfer (this agent had restarted)",
                           kept_checkpoint=kept)  # fmt: skip

    def _unknown(self, op_id: str) -> PagesStatus:
        return PagesStatus(PagesState.UNKNOWN, detail=f"no post-copy of operation {op_id} on node {self.containers.node!r}")

    async def _after_step_in_flight(self, name: str) -> None:
        """Wait for a step on `name` still running here (a lazy checkpoint or restore the controller
        sent before it went away holds the container's lock until it has registered itself)."""
        async with self.containers.lock(name):
            pass

    async def release(self, op_id: str, name: str) -> None:
        """The container now lives elsewhere (or never made it here): remove this host's copy."""

        async def work():
            await self._after_step_in_flight(name)
            target = self._targets.pop(op_id, None)
            if target is not None:
                await target.abort()  # kills the page puller with the container
            source = self._sources.pop(op_id, None)
            if source is not None:
                await source.wait(SOURCE_FINISH_WAIT)  # every page has moved: CRIU is about to exit
                if source.state == PagesState.MOVING:
                    log.warning("post-copy source still serving at release; stopping it", op=op_id, container=name)
                    await source.abort()
            elif await self._orphaned_source(op_id, name):
                await self.checkpointer.stop_orphaned_dump(name, self._checkpoint_dir(op_id))
            if self.containers.exists(name):
                await self.containers.release(name)
            self._sending.pop(op_id, None)
            await self._forget_dumps(op_id)

        await self._shielded(work())

    # -- leftovers -------------------------------------------------------------------

    def _dumps_of(self, op_id: str) -> list[Path]:
        """Everything under checkpoints/ that belongs to operation `op_id`."""
        op = _op(op_id)
        return [self._checkpoint_dir(op), self._predumps(op), self.checkpoints_root / f"{op}-lazy",
                self._page_server_tls_dir(op), self.checkpoints_root / f"{op}-trial", self._note(op)]  # fmt: skip

    async def _forget_dumps(self, op_id: str) -> None:
        await asyncio.to_thread(_remove_all, self._dumps_of(op_id))

    def _note(self, op_id: str) -> Path:
        return self.checkpoints_root / f"{_op(op_id)}.json"

    async def _note_container(self, op_id: str, name: str) -> None:
        """Which container this operation's dumps are of: an agent that restarts can then tell
        whether they may still be needed (sweep_leftovers)."""
        await asyncio.to_thread(write_durably, self._note(op_id), json.dumps({"container": name}) + "\n")

    def _noted_container(self, op_id: str) -> str | None:
        try:
            return str(json.loads(self._note(op_id).read_text())["container"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    async def sweep_leftovers(self) -> None:
        """At agent start: remove what failed or finished operations left behind and nothing
        can use any more. Grants live in memory, so none survived the restart: every staging
        directory goes, unless a CRIU still works in it. Under checkpoints/, what stays: a
        checkpoint kept for `--from-checkpoint` (KEPT_MARK) with its logs; a post-copy dump an
        earlier run was serving (its CRIU may still run; its operation's release or resume
        ends it); a stop-and-copy source's dump while that container is here and stopped (a
        rollback restores from it). What goes: trial scratch, dumps of containers no longer
        here or running again, pre-dumps of containers gone or older than STALE_PREDUMPS."""
        removed = await asyncio.to_thread(self._sweep_staging)
        running = self.containers.runtime.running_names()
        doomed: list[Path] = []
        for entry in await asyncio.to_thread(_entries, self.checkpoints_root):
            op, kind = _dump_kind(entry.name)
            if kind is None or await asyncio.to_thread(tools_under, entry):
                continue
            images = self._checkpoint_dir(op) if _valid_op(op) else None
            if images is None:
                continue
            kept = (images / KEPT_MARK).is_file()
            lazy = _is_lazy(images)
            container = self._noted_container(op)
            here = container is not None and self._is_here(container)
            if kind == "trial":
                doomed.append(entry)
            elif kind == "lazy":
                if not images.is_dir():  # the failed dump's logs, without the checkpoint kept beside
                    doomed.append(entry)
            elif kind in ("tls", "note"):
                # In use while the op's dumps are (tls: or a page puller in its staging).
                if not images.is_dir() and not self._predumps(op).is_dir() and \
                        not await asyncio.to_thread(tools_under, self.staging_root / op):  # fmt: skip
                    doomed.append(entry)
            elif kind == "predump":
                age = time.time() - entry.stat().st_mtime
                if (container is not None and not here) or age > STALE_PREDUMPS:
                    doomed.append(entry)
            elif not kept and not lazy and container is not None and (not here or container in running):
                doomed.append(entry)  # the source runs again, or lives elsewhere now
        for entry in list(doomed):  # what goes with them: all of an op's, once its dumps all go
            op, kind = _dump_kind(entry.name)
            dump = self._checkpoint_dir(op)
            if kind == "dump" or (kind == "predump" and (dump in doomed or not dump.exists())):
                doomed += [p for p in self._dumps_of(op) if p not in doomed and (p.exists() or p.is_symlink())]
        await asyncio.to_thread(_remove_all, doomed)
        if removed or doomed:
            log.info("leftovers of earlier operations removed", staging=removed,
                     checkpoints=sorted(p.name for p in doomed))  # fmt: skip

    def _is_here(self, name: str) -> bool:
        try:
            return self.containers.records.load(name) is not None
        except CorralError:  # an unreadable record: count it as here (keep what may be its)
            return True

    def _sweep_staging(self) -> list[str]:
        removed = []
        for entry in _entries(self.staging_root):
            if tools_under(entry):  # a post-copy restore's page puller reads its images there
                continue
            _remove_all([entry])
            removed.append(entry.name)
        return removed

    async def sweep_expired(self) -> list[str]:
        """Revoke the grants that have expired and remove their staging, unless something
        still works in it (a post-copy restore pulling pages): then at a later round."""
        swept = []
        for op_id in self.grants.expired():
            target = self._targets.get(op_id)
            if target is not None and target.state == PagesState.MOVING:
                continue
            if await asyncio.to_thread(tools_under, self.staging_root / op_id):
                continue
            if await asyncio.to_thread(self.grants.revoke_expired, op_id):
                self._targets.pop(op_id, None)
                await self._close_receiver(op_id)
                await asyncio.to_thread(shutil.rmtree, self._page_server_tls_dir(op_id), True)
                swept.append(op_id)
        return swept

    async def run_sweeper(self, interval: float = SWEEP_INTERVAL) -> None:
        """sweep_expired every `interval` s, for as long as the agent runs; a failed round is
        logged, never fatal."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sweep_expired()
            except Exception:
                log.exception("sweeping expired grants failed")


def _op(op_id: str) -> str:
    validate_name(op_id, "operation id")
    return op_id


_COMPANIONS = {"-predump": "predump", "-lazy": "lazy", "-tls": "tls", "-trial": "trial", ".json": "note"}


def _dump_kind(entry_name: str) -> tuple[str, str | None]:
    """(operation id, what) of an entry of checkpoints/: 'dump' for checkpoints/<op> itself."""
    for suffix, kind in _COMPANIONS.items():
        if entry_name.endswith(suffix):
            return entry_name[: -len(suffix)], kind
    return entry_name, "dump" if _valid_op(entry_name) else None


def _valid_op(op_id: str) -> bool:
    try:
        validate_name(op_id, "operation id")
        return True
    except InvalidArgument:
        return False


def _entries(directory: Path) -> list[Path]:
    try:
        return sorted(directory.iterdir())
    except FileNotFoundError:
        return []


def _remove_all(paths: list[Path]) -> None:
    for path in paths:
        if path.is_symlink() or path.is_file():
            path.unlink(missing_ok=True)
        elif path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def _is_lazy(images: Path) -> bool:
    try:
        return "lazy-pages" in (images / DUMP_CONFIG).read_text().split()
    except OSError:
        return False


def _free_port(host: str) -> int:
    """A TCP port free on `host` now, for CRIU's page server to listen on (the kernel picks it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _write_server_tls(tls: pki.OneTimeTls, directory: Path) -> CriuTls:
    """The page server's side of a one-time TLS, as files CRIU reads (private directory)."""
    return write_tls_files(directory, tls.ca_pem, tls.server_cert_pem, tls.server_key_pem)
