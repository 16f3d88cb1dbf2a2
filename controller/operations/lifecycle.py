"""Create and destroy as operations (DESIGN rule 3).

create   the record is written with the operation (placed, address taken), then
         create-on-node, [start]. Rolled back: what the host may have made is removed
         (the reply may have been lost, so it is asked even after a failure), then the
         record goes and its address and capacity with it.
destroy  destroy-on-node; the record goes with the step's end, in one transaction.

Recovery after a controller restart asks the host what it holds, never the
operation's memory of what it was about to do.
"""

from __future__ import annotations

import time
from typing import Any

from controller.model import Operation
from controller.operations.engine import OpContext
from controller.operations.params import CreateParams, DestroyParams
from controller.operations.reach import Reach
from controller.operations.steps import StepName
from controller.store.base import Store, StoreWriter
from corral.errors import CorralError, FailedPrecondition, NotFound
from corral.model import Container, ContainerState, DesiredState

# How long a rollback or a recovery keeps trying a node it cannot reach.
REACH_WAIT = 60.0


class CreatePlan:
    def __init__(self, op: Operation, store: Store, reach: Reach) -> None:
        self.name = op.container
        self.params = CreateParams.of(op.params)
        self.store = store
        self.reach = reach

    async def _record(self) -> Container:
        record = await self.store.get_container(self.name)
        if record is None:
            raise NotFound(f"container {self.name!r} no longer exists")
        return record

    async def run(self, ctx: OpContext) -> dict[str, Any]:
        record = await self._record()
        agent = self.reach.agent(record.node)
        await ctx.phase("create", f"creating {self.name} on {record.node}")
        made: list[Container] = []

        async def seen(tx: StoreWriter) -> None:
            await tx.observe_container(self.name, record.node, made[0].state, 0, time.time(), made[0].message)

        async with ctx.step(StepName.CREATE_ON_NODE, then=seen):
            made.append(await agent.create(self.name, record.template, record.limits, record.network, record.storage))
        return await self._start_if_asked(ctx, record)

    async def _start_if_asked(self, ctx: OpContext, record: Container) -> dict[str, Any]:
        if record.desired_state == DesiredState.RUNNING and not ctx.op.done(StepName.START):
            await ctx.phase("start", f"starting {self.name}")
            ran: list[Container] = []

            async def seen(tx: StoreWriter) -> None:
                await tx.observe_container(self.name, record.node, ran[0].state, ran[0].init_pid, time.time())

            async with ctx.step(StepName.START, then=seen):
                ran.append(await self.reach.agent(record.node).start(self.name))
        return {"node": record.node}

    async def rollback(self, ctx: OpContext, error: CorralError) -> None:
        record = await self.store.get_container(self.name)
        if record is None:
            return
        if ctx.op.step(StepName.CREATE_ON_NODE) is not None:
            # Asked even when the call failed: its reply may be what was lost.
            try:
                async with ctx.step(StepName.UNDO_CREATE):
                    await self.reach.retrying(record.node, self._destroy_on_node, REACH_WAIT, ctx.log)
            except CorralError as exc:
                note = (f"create failed and {record.node} could not be reached to remove what it made "
                        f"({exc.message}); `corral ct destroy {self.name}` once it is back")  # fmt: skip
                await self.store.observe_container(self.name, record.node, ContainerState.ERROR, 0, time.time(), note)
                raise
        await ctx.commit_step(StepName.DELETE_RECORD, lambda tx: _delete(tx, self.name))

    async def _destroy_on_node(self, agent) -> None:
        try:
            await agent.destroy(self.name, True)
        except NotFound:
            pass

    async def recover(self, ctx: OpContext) -> dict[str, Any]:
        record = await self.store.get_container(self.name)
        if record is None:
            return {}
        await self.reach.nodes.wait_ready(record.node, REACH_WAIT)
        try:
            held = await self.reach.agent(record.node).get(self.name, wait_idle=True)
        except NotFound:
            raise FailedPrecondition("the controller restarted before the host made the container") from None
        await self.store.observe_container(self.name, record.node, held.state, held.init_pid, time.time(), "")
        if held.state == ContainerState.RUNNING:
            return {"node": record.node}
        return await self._start_if_asked(ctx, record)


class DestroyPlan:
    def __init__(self, op: Operation, store: Store, reach: Reach) -> None:
        self.name = op.container
        self.params = DestroyParams.of(op.params)
        self.store = store
        self.reach = reach

    async def run(self, ctx: OpContext) -> dict[str, Any]:
        record = await self.store.get_container(self.name)
        if record is None:
            return {}
        await ctx.phase("destroy", f"destroying {self.name} on {record.node}")
        # The record goes in the same transaction as the step's end: never one without the other.
        async with ctx.step(StepName.DESTROY_ON_NODE, then=lambda tx: _delete(tx, self.name)):
            try:
                await self.reach.agent(record.node).destroy(self.name, self.params.force)
            except NotFound:
                ctx.log.warning("container already gone from its node", node=record.node)
        return {"node": record.node}

    async def rollback(self, ctx: OpContext, error: CorralError) -> None:
        pass  # the host refused or was not reached (nothing changed), or it is done and the record gone

    async def recover(self, ctx: OpContext) -> dict[str, Any]:
        record = await self.store.get_container(self.name)
        if record is None:
            return {}
        await self.reach.nodes.wait_ready(record.node, REACH_WAIT)
        return await self.run(ctx)


async def _delete(tx: StoreWriter, name: str) -> None:
    record = await tx.get_container(name)
    if record is not None:
        await tx.delete_container(name, record.revision)
