"""Failover as an operation: run an HA container whose node is lost on another node.

Steps: takeover (the target adopts the container, taking its shared volume over
from the lost node at the next generation), start-target, switch (the record
names the target, in one transaction with the step). The fleet checked before
submitting that the lost node's lease has run out (or it was fenced); the
takeover checks it again, since time passed. Before the switch a failure gives
the volume back up on the target (the container stays down, on its record);
after it, only forward. A copy the lost node still holds is cleaned up when it
comes back (Fleet.observe).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Callable

from controller.model import Operation
from controller.operations.engine import OpContext
from controller.operations.params import FailoverParams
from controller.operations.reach import Reach
from controller.operations.steps import StepName
from controller.store.base import Store, StoreWriter
from corral.errors import CorralError, FailedPrecondition, NotFound
from corral.model import Container, ContainerState

REACH_WAIT = 30.0


class FailoverPlan:
    def __init__(self, op: Operation, store: Store, reach: Reach, source_lost: Callable[[str], str | None]) -> None:
        self.name = op.container
        self.op_id = op.id
        self.params = FailoverParams.of(op.params)
        self.store = store
        self.reach = reach
        self._source_lost = source_lost  # None if the node is proven unable to run it, else why not

    async def _record(self) -> Container:
        record = await self.store.get_container(self.name)
        if record is None:
            raise NotFound(f"container {self.name!r} no longer exists")
        return record

    async def run(self, ctx: OpContext) -> dict[str, Any]:
        p = self.params
        record = await self._record()
        if record.node != p.source:
            raise FailedPrecondition(f"{self.name!r} is on {record.node!r} now, not on {p.source!r}")
        why_not = self._source_lost(p.source)
        if why_not is not None:
            raise FailedPrecondition(f"{p.source} is not proven unable to run {self.name!r}: {why_not}")
        target = self.reach.agent(p.target)
        began = time.monotonic()
        await ctx.phase("takeover", f"{p.target} takes the volume of {self.name} over from {p.source}")
        async with ctx.step(StepName.TAKEOVER, detail=p.reason):
            moved = replace(record, node=p.target, volume_generation=p.generation)
            await target.adopt(ctx.op.id, moved, p.generation, takeover_from=p.source)
        await ctx.phase("start-target", f"starting {self.name} on {p.target}")
        async with ctx.step(StepName.START_TARGET):
            await target.start(self.name)
        await ctx.commit_step(StepName.SWITCH, self._move_record)
        await ctx.timing(failover=(time.monotonic() - began) * 1000)
        return {"from": p.source, "to": p.target, "reason": p.reason}

    async def _move_record(self, tx: StoreWriter) -> None:
        record = await tx.get_container(self.name)
        if record is None:
            raise NotFound(f"container {self.name!r} no longer exists")
        await tx.update_container(replace(record, node=self.params.target, volume_generation=self.params.generation,
                                          message=f"failed over from {self.params.source}"))  # fmt: skip
        await tx.observe_container(self.name, self.params.target, ContainerState.RUNNING, 0, time.time(), "")

    async def rollback(self, ctx: OpContext, error: CorralError) -> None:
        if ctx.op.done(StepName.SWITCH) or (await self._record()).node == self.params.target:
            await self._finish(ctx)  # the record names the target: it runs there
            return
        if ctx.op.step(StepName.TAKEOVER) is not None:
            # The target may hold the volume (and may have started it): stop and let go of it there.
            async with ctx.step(StepName.UNDO_ADOPT):
                await self.reach.retrying(self.params.target, self._release_on_target, REACH_WAIT, ctx.log)

    async def _release_on_target(self, agent) -> None:
        try:
            await agent.stop(self.name, True, 0)
            await agent.release(self.op_id, self.name)
        except NotFound:
            pass

    async def _finish(self, ctx: OpContext) -> dict[str, Any]:
        if not ctx.op.done(StepName.SWITCH):
            await ctx.commit_step(StepName.SWITCH, self._move_record)
        return {"from": self.params.source, "to": self.params.target, "reason": self.params.reason}

    async def recover(self, ctx: OpContext) -> dict[str, Any]:
        if (await self._record()).node == self.params.target:
            return await self._finish(ctx)
        if ctx.op.step(StepName.START_TARGET) is not None:
            await self.reach.nodes.wait_ready(self.params.target, REACH_WAIT)
            try:
                on_target = await self.reach.agent(self.params.target).get(self.name, wait_idle=True)
            except NotFound:
                on_target = None
            if on_target is not None and on_target.state == ContainerState.RUNNING:
                return await self._finish(ctx)
        raise FailedPrecondition("the controller restarted during the failover; rolled back")
