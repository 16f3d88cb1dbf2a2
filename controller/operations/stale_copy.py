"""Removing a stale copy as an operation: a node came back holding a stopped copy of a
shared-storage container that was failed over while it was lost.

One step, release-stale: the node removes its copy (its LXC config and record; the
volume, which the container's new host uses, is only let go of). The copy is asked
for first: a running one is never removed here (the fleet put the container in doubt).
Recorded like every change to a container, so a controller restart resumes it.
"""

from __future__ import annotations

from typing import Any

from controller.model import Operation
from controller.operations.engine import OpContext
from controller.operations.params import StaleCopyParams
from controller.operations.reach import Reach
from controller.operations.steps import StepName
from controller.store.base import Store
from corral.errors import CorralError, FailedPrecondition, NotFound
from corral.model import ContainerState

REACH_WAIT = 30.0


class StaleCopyPlan:
    def __init__(self, op: Operation, store: Store, reach: Reach) -> None:
        self.name = op.container
        self.params = StaleCopyParams.of(op.params)
        self.store = store
        self.reach = reach

    async def run(self, ctx: OpContext) -> dict[str, Any]:
        node = self.params.node
        record = await self.store.get_container(self.name)
        if record is not None and record.node == node:
            raise FailedPrecondition(f"the copy of {self.name} on {node} is the one its record names: not stale")
        agent = self.reach.agent(node)
        try:
            copy = await agent.get(self.name)
        except NotFound:
            return {"node": node, "removed": False}
        if copy.state != ContainerState.STOPPED:
            raise FailedPrecondition(f"the copy of {self.name} on {node} is {copy.state.value}: only a stopped "
                                     "copy is removed (a running one puts the container in doubt)")  # fmt: skip
        await ctx.phase("release-stale", f"removing the stopped copy of {self.name} left on {node}")
        async with ctx.step(StepName.RELEASE_STALE, detail=node):
            await agent.release(ctx.op.id, self.name)
        lives = f"it lives on {record.node}" if record is not None else "it has no record any more"
        ctx.event("stale-copy", f"removed the stopped copy of {self.name} left on {node} ({lives})", node=node)
        return {"node": node, "removed": True}

    async def rollback(self, ctx: OpContext, error: CorralError) -> None:
        pass  # a release changes nothing until it is done; the next report of the copy tries again

    async def recover(self, ctx: OpContext) -> dict[str, Any]:
        await self.reach.nodes.wait_ready(self.params.node, REACH_WAIT)
        return await self.run(ctx)
