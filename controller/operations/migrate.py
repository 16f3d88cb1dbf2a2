"""The migration plan: move a container to another node, cold or live.

Order of steps (each recorded before it is taken):

  cold, local storage   open-channel, precopy-rootfs (passes while it runs), stop-source,
                        final-transfer, adopt, start-target, switch, release-source, close-channel
  cold, shared storage  stop-source, detach-source, adopt (attach at a new generation),
                        start-target, switch, release-source
  live                  preflight (trial dump), open-channel, [precopy-rootfs], checkpoint
                        (freeze+dump+stop), [detach-source], final-transfer (rootfs delta and
                        checkpoint images at once), adopt, restore, switch, release-source,
                        close-channel

"switch" (the fleet's record now says the container lives on the target) is the
point of no return. Before it, any failure rolls back: the target's copy is
removed and the source runs again (restored from its own checkpoint when it
was live). The source's copy is removed only after the target runs it, so the
container runs exactly once at every moment (DESIGN.md rules 1 and 2).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

import asyncssh

from controller.agents import AgentClient, AgentPool
from controller.health.registry import NodeRegistry
from controller.operations.engine import OpContext
from controller.operations.model import Operation
from controller.store.base import Store
from corral.errors import CorralError, FailedPrecondition, NotFound
from corral.model import Container, ContainerState, NodeState
from corral.v1 import agent_pb2 as apb

# Rootfs pre-copy: stop when a pass moves less than this, or stops shrinking, or after this many passes.
PRECOPY_SMALL_DELTA = 1 << 20
PRECOPY_MAX_PASSES = 5
TRANSFER_TIMEOUT = 3600
CHANNEL_TTL = 4 * 3600
# After a controller restart, how long to wait for the nodes involved to report in.
RECOVERY_NODE_WAIT = 30.0

# Storage whose volume is handed over between hosts rather than copied.
SHARED_STORAGES = frozenset({"image", "lvm"})

STOP_AND_COPY = "stop-and-copy"
PRE_COPY = "pre-copy"
POST_COPY = "post-copy"


def choose_strategy(source_strategies: tuple[str, ...], target_strategies: tuple[str, ...], postcopy: bool) -> str:
    """The best memory strategy both hosts support (pure; the reason is in the error)."""
    both = set(source_strategies) & set(target_strategies)
    if postcopy:
        if POST_COPY not in both:
            raise FailedPrecondition("post-copy needs userfaultfd and a raised fs.pipe-max-size on both hosts")
        return POST_COPY
    if PRE_COPY in both:
        return PRE_COPY
    if STOP_AND_COPY in both:
        return STOP_AND_COPY
    raise FailedPrecondition("live migration needs a working CRIU on both hosts")


class MigrationPlan:
    def __init__(self, op: Operation, store: Store, nodes: NodeRegistry, agents: AgentPool) -> None:
        self.op = op
        self.store = store
        self.nodes = nodes
        self.agents = agents
        self.name = op.container
        self.source_name: str = op.params["source"]
        self.target_name: str = op.params["target"]
        self.bytes_sent = 0  # what crossed the network in this run (not counted across a restart)

    # -- helpers ---------------------------------------------------------------------

    def _agent(self, node: str) -> AgentClient:
        n = self.nodes.get(node)
        if n is None:
            raise NotFound(f"node {node!r} is not registered")
        if n.state != NodeState.READY:
            raise FailedPrecondition(f"node {node!r} is {n.state.value}")
        return self.agents.client(n.facts)

    async def _record(self) -> Container:
        record = await self.store.get_container(self.name)
        if record is None:
            raise NotFound(f"container {self.name!r} no longer exists")
        return record

    async def _send(self, ctx: OpContext, content: int, label: str, private_key: str, grant) -> apb.TransferUpdate:
        src = self._agent(self.source_name)
        began = time.monotonic()

        def progress(u: apb.TransferUpdate) -> None:
            ctx.progress(phase=label, bytes_done=u.bytes_done, bytes_total=u.bytes_total,
                         rate_bps=u.rate_bps, eta_s=u.eta_s)  # fmt: skip

        final = await src.send_files(ctx.op.id, self.name, content, grant, private_key, TRANSFER_TIMEOUT, progress)
        self.bytes_sent += final.bytes_sent
        ctx.log.info("transferred", what=label, bytes_sent=final.bytes_sent, literal=final.literal_bytes,
                     ms=round((time.monotonic() - began) * 1000))  # fmt: skip
        return final

    # -- run ------------------------------------------------------------------------------

    async def run(self, ctx: OpContext) -> dict[str, Any]:
        params = ctx.op.params
        record = await self._record()
        src, dst = self._agent(self.source_name), self._agent(self.target_name)
        live = bool(params.get("live"))
        observed = await src.get(self.name, wait_idle=True)
        was_running = observed.state == ContainerState.RUNNING
        await ctx.set_params(was_running=was_running)
        if live and not was_running:
            raise FailedPrecondition(f"container {self.name!r} is not running: migrate it without --live")

        if live:
            await ctx.phase("preflight", "checking that CRIU can dump this container")
            try:
                async with ctx.step("preflight"):
                    trial = await src.checkpoint(ctx.op.id, self.name, apb.CHECKPOINT_MODE_TRIAL)
                await ctx.timing(preflight_pause=trial.frozen_ms or trial.wall_ms)
            except CorralError as exc:
                if not params.get("fallback_cold"):
                    raise FailedPrecondition(f"CRIU cannot live-migrate {self.name!r}: {exc.message}") from None
                ctx.log.warning("pre-flight failed; falling back to a cold migration", error=exc.message)
                live = False
                await ctx.set_params(live=False, fell_back_to_cold=exc.message)

        shared = record.storage in SHARED_STORAGES
        grant = private_key = None
        if not shared or live:
            private_key, public_key = _operation_keypair()
            await ctx.phase("open-channel")
            async with ctx.step("open-channel"):
                grant = await dst.prepare_receive(ctx.op.id, self.name, public_key, CHANNEL_TTL)

        if not shared:
            await ctx.phase("precopy-rootfs", "copying the root filesystem while the container runs")
            began = time.monotonic()
            async with ctx.step("precopy-rootfs"):
                previous = None
                for n in range(1, PRECOPY_MAX_PASSES + 1):
                    ctx.check_cancel()
                    stats = await self._send(ctx, apb.TRANSFER_CONTENT_ROOTFS, f"precopy-rootfs pass {n}", private_key, grant)
                    delta = stats.literal_bytes
                    if delta < PRECOPY_SMALL_DELTA or (previous is not None and delta >= previous):
                        break
                    previous = delta
            await ctx.timing(precopy=(time.monotonic() - began) * 1000)
        ctx.check_cancel()  # the last point where cancelling leaves nothing to undo but a copy

        down_began = time.monotonic()
        if live:
            await ctx.phase("checkpoint", "freezing and dumping the container")
            async with ctx.step("checkpoint"):
                dump = await src.checkpoint(ctx.op.id, self.name, apb.CHECKPOINT_MODE_STOP)
            # Downtime began at the freeze, inside the dump: count from there, not from the call.
            down_began = time.monotonic() - dump.pause_ms / 1000
            await ctx.timing(dump=dump.wall_ms, freeze=dump.pause_ms, criu_frozen=dump.frozen_ms,
                             criu_memdump=dump.memdump_ms)  # fmt: skip
        elif was_running:
            await ctx.phase("stop-source", "stopping the container on the source")
            async with ctx.step("stop-source"):
                await src.stop(self.name, force=False, timeout=30)

        transfer_began = time.monotonic()
        generation = record.volume_generation
        if shared:
            generation = record.volume_generation + 1
            await ctx.set_params(volume_generation=generation)
            await ctx.phase("detach-source", "handing the volume over (no data is copied)")
            async with ctx.step("detach-source"):
                await src.detach_volume(ctx.op.id, self.name)
        else:
            await ctx.phase("final-rootfs", "copying what changed since the last pass")
        # After the freeze the rootfs delta and the checkpoint images are independent: send both at once.
        sends = []
        if not shared:
            sends.append(self._send(ctx, apb.TRANSFER_CONTENT_ROOTFS, "final-rootfs", private_key, grant))
        if live:
            sends.append(self._send(ctx, apb.TRANSFER_CONTENT_CHECKPOINT, "send-checkpoint", private_key, grant))
        if sends:
            async with ctx.step("final-transfer"):
                finals = await asyncio.gather(*sends)
            if not shared:
                await ctx.timing(final_rootfs_bytes=finals[0].literal_bytes)
            images = finals[-1]
        await ctx.timing(transfer=(time.monotonic() - transfer_began) * 1000)

        await ctx.phase("adopt", "installing the container on the target")
        async with ctx.step("adopt"):
            await dst.adopt(ctx.op.id, replace(record, node=self.target_name, volume_generation=generation))
        if live:
            await ctx.phase("restore", "restoring processes on the target")
            restore_began = time.monotonic()
            async with ctx.step("restore"):
                restored = await dst.restore(ctx.op.id, self.name, apb.RESTORE_SOURCE_RECEIVED)
            now = time.monotonic()
            await ctx.timing(restore=(now - restore_began) * 1000, downtime=(now - down_began) * 1000,
                             criu_restore=restored.restore_ms, images_bytes=images.total_size)  # fmt: skip
        elif was_running:
            async with ctx.step("start-target"):
                await dst.start(self.name)
            await ctx.timing(downtime=(time.monotonic() - down_began) * 1000)

        return await self._switch_and_clean(ctx)

    async def _switch_and_clean(self, ctx: OpContext) -> dict[str, Any]:
        """The point of no return, then the source's copy goes."""
        record = await self._record()
        async with ctx.step("switch"):
            state = ContainerState.RUNNING if ctx.op.params.get("was_running") else ContainerState.STOPPED
            generation = ctx.op.params.get("volume_generation", record.volume_generation)
            await self.store.update_container(
                replace(record, node=self.target_name, state=state, volume_generation=generation)
            )
        await ctx.phase("release-source", "removing the source's copy")
        async with ctx.step("release-source"):
            await self._agent(self.source_name).release(ctx.op.id, self.name)
        if ctx.op.step("open-channel") is not None:
            async with ctx.step("close-channel"):
                await self._agent(self.target_name).finish_receive(ctx.op.id, discard=False)
        timings = ctx.op.timings
        return {
            "from": self.source_name,
            "to": self.target_name,
            "live": bool(ctx.op.params.get("live")),
            "strategy": ctx.op.params.get("strategy", "cold"),
            "downtime_ms": timings.get("downtime"),
            "bytes_sent": self.bytes_sent,
        }

    # -- rollback & recovery ---------------------------------------------------------------------

    async def rollback(self, ctx: OpContext, error: CorralError) -> None:
        op = ctx.op
        if op.done("switch"):
            # Past the point of no return: finish instead (the target runs it).
            await self._finish_forward(ctx)
            return
        await ctx.phase("rollback", f"putting {self.name} back on {self.source_name}")
        target_may_run = op.step("restore") is not None or op.step("start-target") is not None
        if target_may_run:
            # Rule 1: the source may run again only once the target's copy is proven gone.
            async with ctx.step("undo-adopt"):
                await self._agent(self.target_name).release(op.id, self.name)
        if op.step("detach-source") is not None:
            # The target must have let go first (its host enforces the ownership marker too).
            if op.step("adopt") is not None and not target_may_run:
                await self._best_effort(ctx, "undo-adopt", self._agent_release_target)
            generation = int(op.params.get("volume_generation", 0)) + 1
            async with ctx.step("reattach-source"):
                await self._agent(self.source_name).attach_volume(op.id, self.name, generation)
            await self._set_generation(generation)
        await self._resume_source(ctx)
        # The target never ran it: cleaning up there is tidiness, not safety.
        if op.step("adopt") is not None and not target_may_run and not ctx.op.done("undo-adopt"):
            await self._best_effort(ctx, "undo-adopt", self._agent_release_target)
        if op.step("open-channel") is not None:
            await self._best_effort(ctx, "undo-channel", self._agent_discard_channel)

    async def _set_generation(self, generation: int) -> None:
        record = await self._record()
        await self.store.update_container(replace(record, volume_generation=generation))

    async def _agent_release_target(self) -> None:
        await self._agent(self.target_name).release(self.op.id, self.name)

    async def _agent_discard_channel(self) -> None:
        await self._agent(self.target_name).finish_receive(self.op.id, discard=True)

    async def _best_effort(self, ctx: OpContext, step: str, action) -> None:
        try:
            async with ctx.step(step):
                await action()
        except CorralError as exc:
            ctx.log.warning("cleanup on the target failed; leftovers stay until it is reachable",
                            step=step, error=exc.message)  # fmt: skip

    async def _resume_source(self, ctx: OpContext) -> None:
        op = ctx.op
        if not op.params.get("was_running"):
            return
        src = self._agent(self.source_name)
        current = await src.get(self.name, wait_idle=True)
        if current.state == ContainerState.RUNNING:
            return
        async with ctx.step("resume-source"):
            if op.step("checkpoint") is not None:
                try:
                    await src.restore(op.id, self.name, apb.RESTORE_SOURCE_LOCAL)
                    return
                except NotFound:
                    pass  # the dump never completed: nothing to restore, start it afresh
            await src.start(self.name)

    async def _finish_forward(self, ctx: OpContext) -> dict[str, Any]:
        if not ctx.op.done("switch"):
            return await self._switch_and_clean(ctx)
        if not ctx.op.done("release-source"):
            async with ctx.step("release-source"):
                await self._agent(self.source_name).release(ctx.op.id, self.name)
        if ctx.op.step("open-channel") is not None and not ctx.op.done("close-channel"):
            async with ctx.step("close-channel"):
                await self._agent(self.target_name).finish_receive(ctx.op.id, discard=False)
        return {"from": self.source_name, "to": self.target_name, "recovered": True,
                "downtime_ms": ctx.op.timings.get("downtime")}  # fmt: skip

    async def recover(self, ctx: OpContext) -> dict[str, Any]:
        """The controller restarted mid-migration: look at the target, then finish or roll back."""
        op = ctx.op
        for node in (self.source_name, self.target_name):
            if not await self.nodes.wait_ready(node, RECOVERY_NODE_WAIT):
                ctx.log.warning("node did not come back in time for recovery", node=node)
        if op.done("switch"):
            return await self._finish_forward(ctx)
        if op.step("restore") is not None or op.step("start-target") is not None:
            try:
                on_target = await self._agent(self.target_name).get(self.name, wait_idle=True)
            except NotFound:
                on_target = None
            if on_target is not None and on_target.state == ContainerState.RUNNING:
                ctx.log.info("target already runs the container: finishing the migration")
                return await self._finish_forward(ctx)
        raise FailedPrecondition("the controller restarted during the migration; rolled back")


def _operation_keypair() -> tuple[str, str]:
    """A fresh key for this operation's transfers: private for the source, public for the target."""
    key = asyncssh.generate_private_key("ssh-ed25519", comment="corral-operation")
    return key.export_private_key().decode(), key.export_public_key().decode().strip()
