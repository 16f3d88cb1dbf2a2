"""A controller that dies at a chosen durable write.

CrashingStore wraps a SqliteStore (same interface, delegating) and counts its durable
writes: every transaction commit and every single-write method. At write number `crash_at`
it raises ControllerCrash, either instead of the write (nothing of it lands: `mode="before"`)
or right after it has committed (`mode="after"`). From then on the controller is dead:
every further write raises too, so nothing the dying process still tries reaches the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator

from controller.store.sqlite import SqliteStore

BEFORE, AFTER = "before", "after"


class ControllerCrash(BaseException):
    """The controller process died here (a BaseException: no plan may catch it as an error)."""


class CrashingStore:
    def __init__(self, inner: SqliteStore, crash_at: int | None = None, mode: str = BEFORE) -> None:
        self.inner = inner
        self.crash_at = crash_at
        self.mode = mode
        self.armed = False  # writes are counted only once the scenario begins
        self.writes = 0
        self.dead = False
        self.crashed = asyncio.Event()
        self.log: list[str] = []  # what each counted write was ("put_operation switch:done", ...)

    def arm(self) -> None:
        self.armed, self.writes, self.log = True, 0, []

    def _die(self) -> ControllerCrash:
        self.dead = True
        self.crashed.set()
        return ControllerCrash(f"controller crashed at durable write {self.writes} ({self.mode} it landed)")

    def _before_write(self, what: str) -> bool:
        """Count a write; raise if the controller dies instead of it. True if it must die after."""
        if self.dead:
            raise ControllerCrash("the controller is dead")
        if not self.armed:
            return False
        self.writes += 1
        self.log.append(what)
        if self.writes == self.crash_at:
            if self.mode == BEFORE:
                raise self._die()
            return True
        return False

    async def _write(self, method: str, *args: Any) -> Any:
        die_after = self._before_write(_describe(method, args))
        result = await getattr(self.inner, method)(*args)
        if die_after:
            raise self._die()
        return result

    # -- writes ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        if self.dead:
            raise ControllerCrash("the controller is dead")
        die_after = False
        async with self.inner.transaction() as tx:
            noted = _Noting(tx)
            yield noted
            die_after = self._before_write("transaction(" + ", ".join(noted.writes) + ")")  # raising: rolled back
        if die_after:
            raise self._die()

    async def put_node(self, facts):
        return await self._write("put_node", facts)

    async def insert_container(self, container):
        return await self._write("insert_container", container)

    async def update_container(self, container):
        return await self._write("update_container", container)

    async def observe_container(self, name, node, state, init_pid, at, message=None):
        return await self._write("observe_container", name, node, state, init_pid, at, message)

    async def delete_container(self, name, revision):
        return await self._write("delete_container", name, revision)

    async def put_operation(self, op):
        return await self._write("put_operation", op)

    async def put_unmanaged(self, node, name, network, seen_at):
        return await self._write("put_unmanaged", node, name, network, seen_at)

    async def forget_unmanaged(self, node, name):
        return await self._write("forget_unmanaged", node, name)

    # -- the rest ------------------------------------------------------------------------

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def get_container(self, name):
        return await self.inner.get_container(name)

    async def list_nodes(self):
        return await self.inner.list_nodes()

    async def list_containers(self, node=None):
        return await self.inner.list_containers(node)

    async def list_unmanaged(self):
        return await self.inner.list_unmanaged()

    @property
    def changes(self) -> int:
        return self.inner.changes

    async def cordoned_nodes(self):
        return await self.inner.cordoned_nodes()

    async def set_cordoned(self, node, cordoned):
        return await self._write("set_cordoned", node, cordoned)

    async def get_operation(self, op_id):
        return await self.inner.get_operation(op_id)

    async def list_operations(self, container=None, active_only=False):
        return await self.inner.list_operations(container, active_only)


def _describe(method: str, args: tuple) -> str:
    if method == "put_operation":
        op = args[0]
        last = op.steps[-1] if op.steps else None
        step = f" {last.name}:{last.state.value}" if last is not None else ""
        return f"put_operation {op.kind} {op.state.value}{step}"
    return method


class _Noting:
    """A transaction's writer that notes what it writes (for the crash log)."""

    def __init__(self, tx: Any) -> None:
        self._tx = tx
        self.writes: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._tx, name)
        if name.startswith(("put_", "insert_", "update_", "observe_", "delete_", "forget_")):

            async def noted(*args: Any, **kwargs: Any) -> Any:
                self.writes.append(_describe(name, args))
                return await attr(*args, **kwargs)

            return noted
        return attr
