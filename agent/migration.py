"""The agent's part in migrations: receive, send, checkpoint, restore, adopt, release.

The controller drives; each call here is one step, safe to repeat after a
controller restart, and finished even if the controller goes away mid-call
(shielded), so what the controller later observes is a completed step.

Layout under the agent's state directory:
  staging/<op>/rootfs, staging/<op>/checkpoint   what a destination receives
  checkpoints/<op>/                              a source's own dump (for rollback)
"""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import structlog

from agent.containers import ContainerManager
from agent.runtime.checkpoint import Checkpointer, DumpResult, RestoreResult
from agent.transfer.client import PushTarget, TransferProgress, TransferStats, rsync_push
from agent.transfer.grants import GrantRegistry
from agent.transfer.server import TransferServer
from corral.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from corral.model import Container
from corral.names import validate_name

log = structlog.get_logger("corral.agent.migration")

ROOTFS = "rootfs"
CHECKPOINT = "checkpoint"


@dataclass(frozen=True)
class Grant:
    address: str
    user: str
    host_key: str


class Migrations:
    def __init__(
        self,
        containers: ContainerManager,
        transfer: TransferServer,
        grants: GrantRegistry,
        checkpointer: Checkpointer,
        state_dir: Path,
    ) -> None:
        self.containers = containers
        self.transfer = transfer
        self.grants = grants
        self.checkpointer = checkpointer
        self.staging_root = grants.staging_root
        self.checkpoints_root = state_dir / "checkpoints"
        self.checkpoints_root.mkdir(parents=True, exist_ok=True)
        self._background: set[asyncio.Task] = set()

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

    # -- destination -------------------------------------------------------------

    async def prepare_receive(self, op_id: str, container: str, public_key: str, ttl: float) -> Grant:
        validate_name(container)
        if self.containers.exists(container):
            raise AlreadyExists(f"container {container!r} already exists on node {self.containers.node!r}")
        if not public_key.startswith("ssh-"):
            raise InvalidArgument("the operation's public key must be in OpenSSH format")
        grant = self.grants.authorize(_op(op_id), public_key, ttl)
        log.info("receive channel open", op=op_id, container=container, user=grant.user)
        return Grant(self.transfer.address, grant.user, self.transfer.host_key)

    async def finish_receive(self, op_id: str, discard: bool) -> None:
        # Whatever is still in staging was not adopted (or was only needed to restore): it goes.
        await asyncio.to_thread(self.grants.revoke, _op(op_id), remove_staging=True)
        log.info("receive channel closed", op=op_id, discarded=discard)

    async def adopt(self, op_id: str, container: Container) -> Container:
        """Make the container from what was received (its rootfs), with its record and config."""
        return await self._shielded(self.containers.adopt(container, self._staging(op_id) / ROOTFS))

    async def restore(self, op_id: str, name: str, local: bool) -> tuple[Container, RestoreResult]:
        images = self._checkpoint_dir(op_id) if local else self._staging(op_id) / CHECKPOINT
        if not (images / "inventory.img").is_file():
            raise NotFound(f"no checkpoint images for {name!r} at {images}")

        async def work():
            async with self.containers.lock(name):
                result = await self.checkpointer.restore(name, images)
                log.info("restored", op=op_id, container=name, local=local, ms=round(result.wall_ms, 1))
            return await self.containers.get(name), result

        return await self._shielded(work())

    # -- source ------------------------------------------------------------------

    async def send(
        self, op_id: str, name: str, content: str, target: PushTarget, timeout: float,
        progress: Callable[[TransferProgress], None],
    ) -> TransferStats:  # fmt: skip
        if content == ROOTFS:
            source = self.containers.rootfs(name)
        elif content == CHECKPOINT:
            source = self._checkpoint_dir(op_id)
        else:
            raise InvalidArgument(f"unknown transfer content {content!r}")
        if not source.is_dir():
            raise NotFound(f"nothing to send: {source} does not exist")
        return await rsync_push(source, target, content, progress=progress, timeout=timeout)

    async def checkpoint(self, op_id: str, name: str, trial: bool) -> DumpResult:
        self.containers.record(name)

        async def work():
            async with self.containers.lock(name):
                if name not in self.containers.runtime.running_names():
                    raise FailedPrecondition(f"container {name!r} is not running")
                if trial:
                    scratch = self.checkpoints_root / f"{_op(op_id)}-trial"
                    return await self.checkpointer.trial_dump(name, scratch)
                images = self._checkpoint_dir(op_id)
                if images.exists():
                    await asyncio.to_thread(shutil.rmtree, images)
                result = await self.checkpointer.dump(name, images, stop=True)
                log.info("checkpointed", op=op_id, container=name, ms=round(result.wall_ms, 1))
                return result

        return await self._shielded(work())

    async def release(self, op_id: str, name: str) -> None:
        """The container now lives elsewhere (or never made it here): remove this host's copy."""

        async def work():
            if self.containers.exists(name):
                await self.containers.release(name)
            images = self._checkpoint_dir(op_id)
            if images.exists():
                await asyncio.to_thread(shutil.rmtree, images)

        await self._shielded(work())


def _op(op_id: str) -> str:
    validate_name(op_id, "operation id")
    return op_id


