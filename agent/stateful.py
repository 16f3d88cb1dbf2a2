"""Stateful stop and start (`corral ct stop --stateful`, then `ct start`), as `vzctl chkpnt`/
`restore` and Incus's stateful stop do.

A stateful stop dumps the running container with CRIU, stopping it, into its saved-state
directory on this host (ContainerManager.saved_state_dir); the next start restores from it
(the processes go on where they were, same PIDs) and then removes it. A dump CRIU cannot make
leaves the container running and says why. A failed restore keeps the images and says why;
a stateless start drops them and boots afresh. The saved state lives on this host only.
"""

from __future__ import annotations

import asyncio
import shutil

import structlog

from agent.containers import ContainerManager
from agent.runtime.checkpoint import Checkpointer
from corral.errors import CorralError, FailedPrecondition
from corral.model import Container

log = structlog.get_logger("corral.agent.stateful")

DUMP_TIMEOUT = 300.0  # seconds: CRIU writing the whole memory to the host's disk
RESTORE_TIMEOUT = 300.0
# After a stopping dump of a restored container, its LXC monitor (lxc-checkpoint -r's) lingers
# a few milliseconds with its command socket open: LXC still calls it running until it exits.
MONITOR_EXIT_WAIT = 10.0


class StatefulLifecycle:
    """Start and stop of the host's containers, stateful where asked (see the module)."""

    def __init__(self, containers: ContainerManager, checkpointer: Checkpointer) -> None:
        self.containers = containers
        self.checkpointer = checkpointer

    async def stop(self, name: str, *, force: bool, timeout: int, stateful: bool) -> Container:
        if not stateful:
            return await self.containers.stop(name, force=force, timeout=timeout)
        if force:
            raise FailedPrecondition("--stateful saves the processes; it cannot be combined with --force")
        return await self._save(name)

    async def _save(self, name: str) -> Container:
        containers = self.containers
        async with containers.lock(name):
            containers.record(name)
            bound = log.bind(container=name)
            if name not in containers.runtime.running_names():
                if containers.stateful_stopped(name):
                    return await containers.get(name)  # saved already (a repeated request)
                raise FailedPrecondition(f"container {name!r} is not running: it has no processes to save")
            images = containers.saved_state_dir(name)
            await asyncio.to_thread(shutil.rmtree, images, True)  # a stale one (its container ran since)
            containers.intend(name, False)  # the dump stops it: not a crash
            try:
                result = await self.checkpointer.dump(name, images, stop=True, timeout=DUMP_TIMEOUT)
            except BaseException as exc:
                # CRIU undid its freeze (or never began): the container runs on, as it was.
                running = name in containers.runtime.running_names()
                containers.intend(name, running)
                await asyncio.to_thread(shutil.rmtree, images, True)
                if not isinstance(exc, CorralError):
                    raise
                bound.warning("stateful stop failed", error=exc.message, running=running)
                raise FailedPrecondition(
                    f"cannot save the processes of {name!r} ({exc.message}); "
                    + ("it keeps running" if running else "it is stopped; start it afresh with `corral ct start`")
                ) from None
            if not await self._monitor_gone(name):
                bound.warning("the container's LXC monitor outlived its stopping dump", wait_s=MONITOR_EXIT_WAIT)
            bound.info("container stopped with its processes saved", ms=round(result.wall_ms, 1),
                       images_bytes=result.images_bytes)  # fmt: skip
            return await containers.get(name)

    async def _monitor_gone(self, name: str) -> bool:
        return await monitor_gone(self.containers, name)

    async def start(self, name: str, *, stateless: bool = False) -> Container:
        containers = self.containers
        containers.record(name)
        if not containers.stateful_stopped(name):
            return await containers.start(name)
        async with containers.lock(name):
            images = containers.saved_state_dir(name)
            if stateless or not await self._monitor_gone(name):
                # Dropped at the operator's word, or stale (it runs: these processes are older).
                await asyncio.to_thread(shutil.rmtree, images, True)
                log.info("saved processes dropped", container=name, stateless=stateless)
            elif containers.stateful_stopped(name):
                try:
                    result = await self.checkpointer.restore(name, images, timeout=RESTORE_TIMEOUT)
                except CorralError as exc:
                    log.warning("stateful start failed", container=name, error=exc.message, images=str(images))
                    raise FailedPrecondition(
                        f"cannot restore the saved processes of {name!r}: {exc.message} (CRIU's log: "
                        f"{images / 'restore.log'}); they are kept: `corral ct start --stateless {name}` drops "
                        "them and starts it afresh"
                    ) from None
                containers.intend(name, True)
                await asyncio.to_thread(shutil.rmtree, images, True)
                log.info("container started with its saved processes", container=name, pid=result.init_pid,
                         ms=round(result.wall_ms, 1))  # fmt: skip
                return await containers.get(name)
        return await containers.start(name)


async def monitor_gone(containers: ContainerManager, name: str) -> bool:
    """Wait (MONITOR_EXIT_WAIT at most) until LXC no longer calls the container running."""
    deadline = asyncio.get_running_loop().time() + MONITOR_EXIT_WAIT
    while name in containers.runtime.running_names():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True
