"""Evacuation and rebalancing as operations: a plan of moves carried out one by one.

The plan is made before the operation starts (controller/scheduler/maintenance.py)
and stored in its params, so `ops show` tells what it will do. Each move is a
migration operation of its own, a step here (`move:NAME`) waits for it before the
next. A move that fails is recorded and the others go on; the operation fails at
the end if any did. A cancel stops it between moves. After a controller restart
it goes on with the moves not done yet (a migration under way resumes by itself
as its own operation, and is waited for).
"""

from __future__ import annotations

from typing import Any, Protocol

from controller.model import Operation, OpState
from controller.operations.engine import OpContext
from controller.operations.params import MaintenanceParams
from controller.operations.steps import OpKind, move_step
from controller.store.base import Store
from corral.errors import CorralError, FailedPrecondition


class Mover(Protocol):
    """What the plan needs of the fleet: start one migration, and wait for an operation."""

    async def migrate(self, name: str, target: str, *, live: bool, postcopy: bool, fallback_cold: bool,
                      from_checkpoint: str = "") -> Operation: ...  # fmt: skip


class MovesPlan:
    def __init__(self, op: Operation, store: Store, mover: Mover, engine) -> None:
        self.params = MaintenanceParams.of(op.params)
        self.store = store
        self.mover = mover
        self.engine = engine

    async def run(self, ctx: OpContext) -> dict[str, Any]:
        failed: dict[str, str] = {}
        total = len(self.params.moves)
        for i, move in enumerate(self.params.moves):
            name, target, live = move["container"], move["target"], bool(move["live"])
            step = move_step(name)
            if ctx.op.done(step):
                continue
            ctx.check_cancel()
            await ctx.phase("move", f"{i + 1}/{total}: {name} to {target} ({'live' if live else 'cold'})")
            try:
                async with ctx.step(step, detail=f"{move['source']} -> {target} ({'live' if live else 'cold'})"):
                    await self._move(name, target, live)
            except CorralError as exc:
                failed[name] = exc.message  # recorded on its step; the other moves go on
        if failed:
            raise FailedPrecondition(f"{len(failed)} of {total} move(s) failed: "
                                     + "; ".join(f"{n}: {why}" for n, why in failed.items()))  # fmt: skip
        return {"moved": total, "stuck": len(self.params.stuck)}

    async def _move(self, name: str, target: str, live: bool) -> None:
        record = await self.store.get_container(name)
        if record is None or record.node == target:
            return  # gone, or already there (a restart after the move)
        running = self.engine.active_for(name)
        if running is not None and running.kind == OpKind.MIGRATE:
            op = running  # resumed after a controller restart: wait for it
        else:
            op = await self.mover.migrate(name, target, live=live, postcopy=False, fallback_cold=False)
        done = await self.engine.wait(op.id)
        if done.state != OpState.SUCCEEDED:
            raise FailedPrecondition(f"migration {op.id} {done.state.value}: {done.error}")

    async def rollback(self, ctx: OpContext, error: CorralError) -> None:
        pass  # each move is its own operation, finished or rolled back on its own

    async def recover(self, ctx: OpContext) -> dict[str, Any]:
        return await self.run(ctx)
