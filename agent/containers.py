"""The host's containers: the agent's domain logic between the API and LXC.

Every action on one container holds that container's lock, so two requests
can never interleave on it. Multi-step actions register their undo as they go
(AsyncExitStack) and keep it only on failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import time
from collections import defaultdict
from pathlib import Path
from typing import AsyncIterator, Mapping, Sequence

import structlog

from agent.records import ContainerRecord, RecordStore, write_durably
from agent.runtime.cgroups import CgroupLayout, container_cgroups, read_counters
from agent.runtime.lxc import LxcRuntime
from agent.runtime.lxc_config import LxcConfig
from agent.runtime.templates import template_named
from agent.storage.base import StorageDriver
from corral import proc
from corral.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from corral.model import Container, ContainerState, ContainerStats, Limits, NetworkAttachment
from corral.names import validate_name

SELF_FENCED = "self-fenced"  # an intent: killed when this host's lease ran out

log = structlog.get_logger("corral.agent.containers")

SAVED_STATE = "corral-saved"  # in the container's LXC directory: its processes, saved by a stateful stop
SNAPSHOTS = "corral-snapshots"  # in the container's LXC directory: one directory a snapshot
_TOMBSTONE = ".destroying"  # beside the records: a destroy whose volume is still being removed
DEFAULT_STOP_TIMEOUT = 30
DEFAULT_EXEC_TIMEOUT = proc.EXEC_DEFAULT_TIMEOUT
MAX_EXEC_TIMEOUT = proc.EXEC_MAX_TIMEOUT


class ContainerManager:
    def __init__(
        self,
        *,
        node: str,
        runtime: LxcRuntime,
        storages: Mapping[str, StorageDriver],
        records: RecordStore,
        bridge: str,
        template_cache: Path,
        cgroups: CgroupLayout,
    ) -> None:
        self.node = node
        self.runtime = runtime
        self.storages = storages
        self.records = records
        self.bridge = bridge
        self.template_cache = template_cache
        self.cgroups = cgroups
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        # What this agent last did to each container: started it or found it running (True), or
        # stopped, killed or dumped it (False). One it started that is stopped now stopped unasked;
        # one it knows nothing of (stopped before this agent started: a power cut, a fence) is
        # left alone, since a host coming back restarts nothing by itself.
        self._intent: dict[str, bool | str] = {}  # True, False, or SELF_FENCED
        self._removing: set[asyncio.Task] = set()  # volumes of destroyed containers being removed

    # -- queries ---------------------------------------------------------

    def exists(self, name: str) -> bool:
        return self.runtime.exists(name) or self.records.load(name) is not None

    def lock(self, name: str) -> asyncio.Lock:
        """The lock every action on `name` holds (migration steps take it too)."""
        return self._locks[name]

    def record(self, name: str) -> ContainerRecord:
        return self._record(name)

    def rootfs(self, name: str) -> Path:
        record = self._record(name)
        return self.storages[record.storage].rootfs(name)

    def saved_state_dir(self, name: str) -> Path:
        """Where a stateful stop keeps the container's processes (CRIU images) until its next
        start. In its LXC directory: a destroy or a release removes it with the container."""
        return self.runtime.container_dir(name) / SAVED_STATE

    def stateful_stopped(self, name: str) -> bool:
        return (self.saved_state_dir(name) / "inventory.img").is_file()

    def snapshots_dir(self, name: str) -> Path:
        return self.runtime.container_dir(name) / SNAPSHOTS

    def _record(self, name: str) -> ContainerRecord:
        validate_name(name)
        record = self.records.load(name)
        if record is None or not self.runtime.exists(name):
            raise NotFound(f"container {name!r} does not exist on node {self.node!r}")
        return record

    def _container(self, record: ContainerRecord, state: ContainerState, pid: int, message: str = "") -> Container:
        return Container(
            name=record.name,
            node=self.node,
            template=record.template,
            state=state,
            limits=record.limits,
            network=record.network,
            storage=record.storage,
            init_pid=pid,
            created_at=record.created_at,
            message=message,
            stateful_stopped=state == ContainerState.STOPPED and self.stateful_stopped(record.name),
        )

    async def get(self, name: str, wait_idle: bool = False) -> Container:
        if wait_idle:
            async with self._locks[name]:
                return await self.get(name)
        record = self._record(name)
        status = await self.runtime.status(name)
        return self._container(record, status.state, status.init_pid)

    async def list(self) -> list[Container]:
        running = self.runtime.running_names()
        out = []
        for record in self.records.all():
            if not self.runtime.exists(record.name):
                continue
            if record.name in running:
                status = await self.runtime.status(record.name)
                out.append(self._container(record, status.state, status.init_pid))
            else:
                out.append(self._container(record, ContainerState.STOPPED, 0))
        return out

    async def stats(self, names: Sequence[str] = ()) -> list[ContainerStats]:
        """What these containers (none: all of this host's) use and how often they hit their
        limits: the counters of their cgroups (running ones) and their disk usage. Files are read
        off the event loop, the containers measured concurrently."""
        records = [self._record(n) for n in names] if names else \
            [r for r in self.records.all() if self.runtime.exists(r.name)]  # fmt: skip
        running = self.runtime.running_names()
        return list(await asyncio.gather(*(self._stats(r, r.name in running) for r in records)))

    async def _stats(self, record: ContainerRecord, running: bool) -> ContainerStats:
        state, counters, missing = ContainerState.STOPPED, {}, []
        if running:
            status = await self.runtime.status(record.name)
            state = status.state
            dirs = await asyncio.to_thread(container_cgroups, status.init_pid) if status.init_pid else {}
            counters, missing = await asyncio.to_thread(read_counters, dirs, self.cgroups.v1)
        try:
            counters["disk_used_bytes"] = await self.storages[record.storage].usage(record.name)
        except Exception as exc:  # a shared volume not attached here, a tree changing under the walk
            missing.append(f"disk ({exc})")
        return ContainerStats(
            record.name, self.node, state, time.time(), disk_limit_bytes=record.limits.disk_bytes,
            message=f"not measured: {', '.join(missing)}" if missing else "", **counters,
        )  # fmt: skip

    # -- lifecycle -------------------------------------------------------

    async def create(
        self, name: str, template: str, limits: Limits, network: NetworkAttachment, storage: str
    ) -> Container:
        validate_name(name)
        tmpl = template_named(template, self.template_cache)
        driver = self.storages.get(storage or "dir")
        if driver is None:
            raise InvalidArgument(f"unknown storage {storage!r} (this node has: {', '.join(self.storages)})")
        async with self._locks[name]:
            if self.runtime.exists(name) or self.records.load(name) is not None:
                raise AlreadyExists(f"container {name!r} already exists on node {self.node!r}")
            bound = log.bind(container=name)
            async with contextlib.AsyncExitStack() as undo:
                rootfs = await driver.create_volume(name, limits.disk_bytes)
                undo.push_async_callback(driver.destroy_volume, name)
                await tmpl.populate(rootfs, name)
                record = ContainerRecord(name, template, driver.name, limits, network, time.time())
                ct_dir = self.runtime.container_dir(name)
                ct_dir.mkdir(parents=True, exist_ok=False)
                undo.push_async_callback(asyncio.to_thread, shutil.rmtree, ct_dir, True)
                await self._write_config(record, tmpl.halt_signal)
                await asyncio.to_thread(self.records.save, record)
                undo.pop_all()
            message = ""
            if limits.disk_bytes and not driver.enforces_disk_limit:
                message = f"disk size is accounted, not enforced, on {driver.name} storage"
            bound.info("container created", template=template, storage=driver.name)
            return self._container(record, ContainerState.STOPPED, 0, message)

    async def _write_config(self, record: ContainerRecord, halt_signal: str | None = None) -> None:
        if halt_signal is None:
            halt_signal = template_named(record.template, self.template_cache).halt_signal
        config = LxcConfig(
            name=record.name,
            rootfs=self.storages[record.storage].rootfs(record.name),
            bridge=self.bridge,
            network=record.network,
            limits=record.limits,
            halt_signal=halt_signal,
            log_file=self.runtime.container_dir(record.name) / "lxc.log",
        )
        path = self.runtime.config_file(record.name)
        await asyncio.to_thread(_write_atomic, path, config.render(self.cgroups))

    async def start(self, name: str) -> Container:
        async with self._locks[name]:
            record = self._record(name)
            if name in self.runtime.running_names():
                status = await self.runtime.status(name)
            else:
                began = time.perf_counter()
                status = await self.runtime.start(name)
                took = round((time.perf_counter() - began) * 1000, 1)
                log.info("container started", container=name, pid=status.init_pid, ms=took)
            self._intent[name] = True
            return self._container(record, status.state, status.init_pid)

    def intend(self, name: str, running: bool) -> None:
        """Note what this agent is doing to a container outside start/stop (a checkpoint, a restore)."""
        self._intent[name] = running

    async def stopped_unasked(self, name: str) -> bool:
        """Stopped, though this agent started it (or found it running) and did nothing since that
        stops it, and no request is acting on it."""
        if self._intent.get(name) is not True or self._locks[name].locked():
            return False
        if self.records.load(name) is None or not self.runtime.exists(name):
            return False
        return name not in self.runtime.running_names()

    def self_fenced(self, name: str) -> bool:
        """Killed by this host's self-fencing (its lease ran out) and not touched since."""
        return self._intent.get(name) == SELF_FENCED and not self._locks[name].locked()

    async def restart_after_fence(self, name: str) -> bool:
        """Start again a container this host fenced, once the fleet places it here again (the lease
        is back and nothing took it over): its shared volume taken again at the generation it held.
        False if another host owns the volume now."""
        async with self._locks[name]:
            if self._intent.get(name) != SELF_FENCED:
                return False
            record = self._record(name)
            driver = self.storages[record.storage]
            if driver.shared:
                owner = await asyncio.to_thread(driver.ownership, name)
                if owner is None or owner.node != self.node:
                    self._intent[name] = False
                    log.warning("not restarting a fenced container: its volume has another owner now",
                                container=name, owner=owner.node if owner else None)  # fmt: skip
                    return False
                await driver.attach(name, owner.generation)
            if name not in self.runtime.running_names():
                await self.runtime.start(name)
            self._intent[name] = True
            log.warning("container fenced here started again: the lease is back and the fleet places it here",
                        container=name)  # fmt: skip
            return True

    async def stop(self, name: str, *, force: bool, timeout: int) -> Container:
        async with self._locks[name]:
            record = self._record(name)
            self._intent[name] = False
            await self.runtime.stop(name, force=force, timeout=timeout or DEFAULT_STOP_TIMEOUT)
            log.info("container stopped", container=name, force=force)
            return self._container(record, ContainerState.STOPPED, 0)

    async def destroy(self, name: str, *, force: bool) -> None:
        """A local volume is removed after the reply (its rmtree is most of a destroy): the
        container is gone once its config and record are, a tombstone written first finishes the
        removal after a crash (`reconcile`), and the container's lock is held until the volume is
        gone, so a create of the same name waits for it. A shared volume is released at once."""
        lock = self._locks[name]
        await lock.acquire()
        handed_over = False
        try:
            record = self._record(name)
            status = await self.runtime.status(name)
            if status.state != ContainerState.STOPPED:
                if not force:
                    raise FailedPrecondition(f"container {name!r} is {status.state.value}; stop it first or use --force")
                await self.runtime.stop(name, force=True, timeout=10)
            driver = self.storages[record.storage]
            if driver.shared:
                await driver.destroy_volume(name)
            else:
                await asyncio.to_thread(_write_durably, self._tombstone(name), record.storage)
            await asyncio.to_thread(shutil.rmtree, self.runtime.container_dir(name), True)
            await asyncio.to_thread(self.records.delete, name)
            if not driver.shared:
                task = asyncio.get_running_loop().create_task(self._remove_volume(name, driver, lock))
                self._removing.add(task)
                task.add_done_callback(self._removing.discard)
                handed_over = True
            log.info("container destroyed", container=name)
        finally:
            if not handed_over:
                lock.release()

    def _tombstone(self, name: str) -> Path:
        return self.records.dir / f"{name}{_TOMBSTONE}"

    async def _remove_volume(self, name: str, driver: StorageDriver, lock: asyncio.Lock | None = None) -> None:
        """The last step of a destroy: the volume, then its tombstone."""
        try:
            await driver.destroy_volume(name)
            await asyncio.to_thread(self._tombstone(name).unlink, True)
        except Exception as exc:  # the tombstone stays: the next agent start tries again
            log.error("removing a destroyed container's volume failed", container=name, error=str(exc))
        finally:
            if lock is not None:
                lock.release()

    async def exec(
        self, name: str, argv: Sequence[str], env: Mapping[str, str], stdin: bytes, timeout: int
    ) -> AsyncIterator[proc.Output | proc.Exited]:
        """Run a command in a running container: its output as it comes (bounded pieces; the
        caller's pace holds the command up), then how it ended."""
        validate_name(name)
        proc.validate_command(argv, env)
        if timeout < 0 or timeout > MAX_EXEC_TIMEOUT:
            raise InvalidArgument(f"exec timeout must be between 0 and {MAX_EXEC_TIMEOUT} seconds")
        self._record(name)
        if name not in self.runtime.running_names():
            raise FailedPrecondition(f"container {name!r} is not running")
        attached = self.runtime.attach(name, argv, env=env, stdin=stdin, timeout=timeout or DEFAULT_EXEC_TIMEOUT)
        async with contextlib.aclosing(attached) as events:
            async for event in events:
                yield event

    async def set_limits(self, name: str, limits: Limits) -> Container:
        async with self._locks[name]:
            record = self._record(name)
            updated = ContainerRecord(
                record.name, record.template, record.storage, record.limits.merged(limits), record.network, record.created_at
            )
            running = name in self.runtime.running_names()
            if running:
                # Apply to the live cgroups first: if the kernel refuses, nothing is saved.
                for key, value in self.cgroups.limit_files(limits):
                    await self.runtime.set_cgroup(name, key, value)
            await self._write_config(updated)
            await asyncio.to_thread(self.records.save, updated)
            log.info("limits set", container=name, limits=updated.limits)
        return await self.get(name)

    async def adopt(self, container: Container, staged_rootfs: Path, *, takeover_from: str = "") -> Container:
        """Install a container that is moving here (migration target).

        Local storage: its rootfs was received into `staged_rootfs`. Shared
        storage: its volume is attached here at the generation the controller
        recorded (the host refuses if another host still holds it).
        """
        name = validate_name(container.name)
        driver = self.storages.get(container.storage)
        if driver is None:
            raise InvalidArgument(f"this node has no {container.storage!r} storage")
        async with self._locks[name]:
            record = ContainerRecord(
                name, container.template, driver.name, container.limits, container.network, container.created_at
            )
            existing = self.records.load(name)
            if existing is not None and self.runtime.exists(name):
                if existing == record:
                    return await self.get(name)  # adopted already (a repeated step)
                raise AlreadyExists(f"container {name!r} already exists on node {self.node!r}")
            async with contextlib.AsyncExitStack() as undo:
                if driver.shared:
                    await driver.attach(name, container.volume_generation, takeover_from=takeover_from or None)
                    undo.push_async_callback(driver.detach, name)
                else:
                    if not staged_rootfs.is_dir():
                        raise NotFound(f"no received root filesystem for {name!r} at {staged_rootfs}")
                    rootfs = await driver.create_volume(name, container.limits.disk_bytes)
                    undo.push_async_callback(driver.destroy_volume, name)
                    await asyncio.to_thread(_replace_dir, staged_rootfs, rootfs)
                ct_dir = self.runtime.container_dir(name)
                ct_dir.mkdir(parents=True, exist_ok=True)
                undo.push_async_callback(asyncio.to_thread, shutil.rmtree, ct_dir, True)
                await self._write_config(record)
                await asyncio.to_thread(self.records.save, record)
                undo.pop_all()
            log.info("container adopted", container=name, storage=driver.name, generation=container.volume_generation)
            return self._container(record, ContainerState.STOPPED, 0)

    async def release(self, name: str) -> None:
        """Remove this host's copy of a container that now lives elsewhere.

        A shared volume is only detached (it is the container's one disk, now
        used by its new host); a local copy is deleted.
        """
        async with self._locks[name]:
            record = self.records.load(name)
            if self.runtime.exists(name) and name in self.runtime.running_names():
                await self.runtime.stop(name, force=True, timeout=10)
            if record is not None:
                driver = self.storages[record.storage]
                if driver.shared:
                    if driver.is_attached(name):
                        await driver.detach(name)
                else:
                    await driver.destroy_volume(name)
            await asyncio.to_thread(shutil.rmtree, self.runtime.container_dir(name), True)
            await asyncio.to_thread(self.records.delete, name)
            log.info("container released", container=name)

    async def fence(self, names: list[str]) -> None:
        """Self-fencing (agent/lease.py): kill these containers and let go of their shared volumes,
        now. A request holding a container's lock gets 2 s to finish; then it is killed regardless."""
        for name in names:
            async with self._urgently(name):
                try:
                    record = self.records.load(name)
                    if record is None:
                        continue  # not here (any more)
                    if name in self.runtime.running_names():
                        # Only what it kills now may start again with the lease back: a container
                        # already stopped (a power cut, an agent restarted late) stays stopped.
                        self._intent[name] = SELF_FENCED
                    await self.runtime.stop(name, force=True, timeout=0)
                    driver = self.storages.get(record.storage)
                    if driver is not None and driver.shared and driver.is_attached(name):
                        await driver.detach(name)
                    log.error("container fenced", container=name)
                except Exception:
                    log.exception("fencing a container failed", container=name)

    async def kill(self, name: str) -> None:
        """Kill a container whose volume this host lost (agent/storage/beacons.py), now."""
        async with self._urgently(name):
            self._intent[name] = False
            if self.runtime.exists(name) and name in self.runtime.running_names():
                await self.runtime.stop(name, force=True, timeout=0)
                log.error("container killed: this host lost its volume", container=name)

    @contextlib.asynccontextmanager
    async def _urgently(self, name: str):
        """The container's lock if a request holding it lets go within 2 s; else go on without it."""
        lock = self._locks[name]
        try:
            async with asyncio.timeout(2):
                await lock.acquire()
        except TimeoutError:
            log.warning("acting on a busy container without its lock", container=name)
            yield
            return
        try:
            yield
        finally:
            lock.release()

    async def detach_volume(self, name: str) -> None:
        async with self._locks[name]:
            record = self._record(name)
            driver = self.storages[record.storage]
            if not driver.shared:
                raise FailedPrecondition(f"{record.storage} storage is local; it is moved by copying")
            if name in self.runtime.running_names():
                raise FailedPrecondition(f"container {name!r} is running; stop it before detaching its volume")
            await driver.detach(name)

    async def attach_volume(self, name: str, generation: int) -> None:
        async with self._locks[name]:
            record = self._record(name)
            driver = self.storages[record.storage]
            if not driver.shared:
                raise FailedPrecondition(f"{record.storage} storage is local; it is moved by copying")
            await driver.attach(name, generation)

    async def reconcile(self) -> list[Container]:
        """On agent start: finish the destroys a crash interrupted, take stock of what runs;
        LXC containers we never made are left alone."""
        for tombstone in sorted(self.records.dir.glob(f"*{_TOMBSTONE}")):
            name = tombstone.name[: -len(_TOMBSTONE)]
            driver = self.storages.get(tombstone.read_text().strip())
            log.warning("finishing the destroy of a container", container=name)
            await asyncio.to_thread(shutil.rmtree, self.runtime.container_dir(name), True)
            await asyncio.to_thread(self.records.delete, name)
            if driver is not None:
                await self._remove_volume(name, driver)
        known = {r.name for r in self.records.all()}
        for stray in set(self.runtime.names()) - known:
            log.warning("LXC container without a corral record left alone", container=stray)
        for name in known - set(self.runtime.names()):
            log.warning("record without an LXC container dropped", container=name)
            self.records.delete(name)
        containers = await self.list()
        for ct in containers:
            if ct.state == ContainerState.RUNNING:
                self._intent[ct.name] = True
        log.info("reconciled", running=sum(c.state == ContainerState.RUNNING for c in containers), total=len(containers))
        return containers


def _write_atomic(path: Path, text: str) -> None:
    # Durable too: after a power loss an empty LXC config would leave a container that cannot start.
    write_durably(path, text, path.with_suffix(".tmp"))


def _write_durably(path: Path, text: str) -> None:
    write_durably(path, text)


def _replace_dir(source: Path, target: Path) -> None:
    """Move a received tree into place: a rename where possible (same filesystem)."""
    target.rmdir()  # the empty directory the storage driver made
    try:
        source.rename(target)
    except OSError:  # another filesystem: copy with owners, modes, links, devices
        subprocess.run(["cp", "-a", "--", str(source), str(target)], check=True, capture_output=True)
        shutil.rmtree(source)
