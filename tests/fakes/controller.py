"""One life of the controller over the fake hosts: store, node registry, engine, fleet.

A crash ends a life (its engine is stopped, its store closed, its agent pool dead); the
next life opens the same SQLite file, registers the same hosts again and lets the engine
recover what was active, as `corral-controller` does when restarted.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from controller.fleet import Fleet
from controller.health.registry import NodeRegistry
from controller.model import Operation
from controller.network.ipam import AddressPool
from controller.operations import operation_plans
from controller.operations.engine import Engine
from controller.store.sqlite import SqliteStore

from fakes.crash import BEFORE, ControllerCrash, CrashingStore
from fakes.hosts import FakeAgentPool, FakeWorld

ADDRESSES = ("10.77.0.0/24", "10.77.0.1", "10.77.0.10", "10.77.0.200")
# Generous: an operation on fake hosts takes milliseconds; waiting this long means it hangs.
OP_DEADLINE = 20.0


class ControllerLife:
    def __init__(self, world: FakeWorld, db: Path, crash_at: int | None = None, mode: str = BEFORE) -> None:
        self.world = world
        self.store = CrashingStore(SqliteStore(db), crash_at, mode)
        self.agents = FakeAgentPool(world, lambda: ControllerCrash("a dead controller made an agent call"))
        self.nodes = NodeRegistry(self.store, 5.0)
        self.engine = Engine(self.store, operation_plans(self.store, self.nodes, self.agents))
        self.fleet = Fleet(self.store, self.nodes, self.agents, AddressPool.parse(*ADDRESSES), self.engine)

    async def open(self) -> "ControllerLife":
        await self.store.open()
        await self.nodes.load()
        for name in self.world.hosts:
            await self.nodes.register(self.world.facts(name))  # every host reports in again
        return self

    async def recover(self) -> list[Operation]:
        """The restarted controller picks up what its previous life left; waits for all of it."""
        await self.engine.start()
        return [await self.wait(op.id) for op in list(self.engine._active.values())]

    async def idle(self) -> None:
        """Until the engine has nothing left running (its operations' tasks have ended)."""
        while self.engine._tasks:
            await asyncio.gather(*list(self.engine._tasks), return_exceptions=True)

    async def wait(self, op_id: str) -> Operation:
        async with asyncio.timeout(OP_DEADLINE):
            return await self.engine.wait(op_id)

    async def die(self) -> None:
        """The process is gone: its tasks stop, its store closes, its agent pool is dead."""
        self.agents.alive = False
        self.store.dead = True
        await self.engine.close()
        for task in list(self.fleet._tasks):
            task.cancel()
        await self.store.close()

    async def close(self) -> None:
        await self.engine.close()
        await self.store.close()

    async def until_crash(self, coro) -> bool:
        """Run `coro` (a request to this controller); True if the controller crashed meanwhile
        (then the request is abandoned, as its caller's connection would be)."""
        task = asyncio.ensure_future(coro)
        crashed = asyncio.ensure_future(self.store.crashed.wait())
        try:
            async with asyncio.timeout(OP_DEADLINE):
                await asyncio.wait({task, crashed}, return_when=asyncio.FIRST_COMPLETED)
                if not crashed.done():
                    # The caller has its answer; the operation may still write its last records.
                    await self.idle()
        finally:
            crashed.cancel()
        if self.store.crashed.is_set():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return True
        task.result()  # the request's own error, if any
        return False
