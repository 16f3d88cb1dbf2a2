"""The migration plan: move a container to another node, cold or live.

Order of steps (each recorded before it is taken):

  cold, local storage   open-channel, precopy-rootfs (passes while it runs), stop-source,
                        final-transfer, adopt, start-target, switch, release-source, close-channel
  cold, shared storage  stop-source, detach-source, adopt (attach at a new generation),
                        start-target, switch, release-source
  live, stop-and-copy   preflight (can CRIU dump it?), open-channel, [precopy-rootfs], checkpoint
                        (freeze+dump+stop; the source sends the rootfs delta and the memory
                        images while it dumps, the other images right after, in the same
                        step), [detach-source],
                        adopt, restore, switch, release-source, close-channel
  live, pre-copy        as stop-and-copy, with precopy-memory (memory pre-dumps, each sent,
                        until the dirty set stops shrinking) before the checkpoint, which then
                        dumps only what changed since the last pre-dump
  live, post-copy       preflight, open-channel, precopy-rootfs, lazy-checkpoint (freeze, dump
                        all but the memory, serve it, send as above), adopt, lazy-restore
                        (runs on the target: the downtime ends), switch, wait-pages (the
                        target pulls the rest of the memory), release-source, close-channel
  from a kept checkpoint   (after a failed post-copy: back to its source) stop-target,
                        restore-kept, switch, release-target

"switch" (the fleet's record now says the container lives on the target) is the
point of no return. Before it, any failure rolls back: the target's copy is
removed and the source runs again (restored from its own checkpoint when it
was live). The source's copy is removed only after the target runs it, so the
container runs exactly once at every moment (DESIGN.md rules 1 and 2).
Post-copy's point of no return comes earlier, when the target resumes
(lazy-restore): see controller/operations/postcopy.py.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

import asyncssh

from controller.agents import AgentClient, AgentPool
from controller.health.registry import NodeRegistry
from controller.operations import postcopy
from controller.operations.engine import OpContext
from controller.model import Operation
from controller.operations import migration_decisions as decide
from controller.operations.migration_decisions import Next, Resume, RollbackPlan
from controller.operations.params import MigrateParams, Strategy
from controller.operations.postcopy import SideReport
from controller.operations.reach import Reach
from controller.operations.steps import StepName
from controller.store.base import Store, StoreWriter
from corral.errors import CorralError, FailedPrecondition, NotFound, RuntimeFailure, Unavailable
from corral.model import Container, ContainerState
from corral.v1 import agent_pb2 as apb

# Rootfs pre-copy: stop when a pass moves less than this, or stops shrinking, or after this many passes.
PRECOPY_SMALL_DELTA = 1 << 20
PRECOPY_MAX_PASSES = 5
# Memory pre-copy: stop when a pre-dump writes fewer pages than this, or no fewer than the one before.
PREDUMP_SMALL_PAGES = 256
PREDUMP_MAX_PASSES = 8
TRANSFER_TIMEOUT = 3600
CHANNEL_TTL = 4 * 3600
# After a controller restart, how long to wait for the nodes involved to report in.
RECOVERY_NODE_WAIT = 30.0
# Post-copy: how long every page may take to move (the agents kill the transfer after an hour too).
PAGES_DEADLINE = 3600.0
# Post-copy, after one side reported a failure: how long to wait to reach a target that does not
# answer, and for a source to notice by itself that its destination is gone.
TARGET_REACH_WAIT = 60.0
SOURCE_NOTICE_WAIT = 10.0
RETRY_INTERVAL = 1.0

# Storage whose volume is handed over between hosts rather than copied.
SHARED_STORAGES = frozenset({"image", "lvm"})

STOP_AND_COPY = Strategy.STOP_AND_COPY
PRE_COPY = Strategy.PRE_COPY
LANDING_WAIT = 15.0  # s, at most, for the target's page cache for the images (~2.5 s a GB here)
POST_COPY = Strategy.POST_COPY
FROM_CHECKPOINT = Strategy.FROM_CHECKPOINT


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
        self.reach = Reach(nodes, agents)
        self.name = op.container
        params = MigrateParams.of(op.params)
        self.source_name: str = params.source
        self.target_name: str = params.target
        self.bytes_sent = 0  # what crossed the network in this run (not counted across a restart)
        self.down_began: float | None = None  # monotonic, the freeze (not known across a restart)
        self.lazy_bytes = 0  # post-copy: the memory the target pulls (its own count)

    # -- helpers ---------------------------------------------------------------------

    def _agent(self, node: str) -> AgentClient:
        # Not gated on heartbeats: one missed beat must not fail a step (each call has its deadline).
        return self.reach.agent(node)

    _client = _agent

    @staticmethod
    def _params(ctx: OpContext) -> MigrateParams:
        return MigrateParams.of(ctx.op.params)

    async def _record(self) -> Container:
        record = await self.store.get_container(self.name)
        if record is None:
            raise NotFound(f"container {self.name!r} no longer exists")
        return record

    async def _await_landing(self, ctx: OpContext, dst: AgentClient) -> None:
        """Let the target finish the page cache it writes for the images (agent/transfer/landing.py)
        while the container still runs: their writing then costs the downtime a fraction. Bounded;
        a target that cannot say (an older agent) is not waited for."""
        began = time.monotonic()
        try:
            landing = await dst.await_landing(ctx.op.id, LANDING_WAIT)
        except CorralError as exc:
            ctx.log.info("the target prepares no landing for the images", error=exc.message)
            return
        await ctx.timing(landing=(time.monotonic() - began) * 1000)
        if not landing.ready and landing.bytes:
            ctx.log.info("the landing for the images was not ready in time", bytes=landing.bytes)

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

    async def _refuse_what_stays(self, src: AgentClient, observed: Container) -> None:
        """Saved processes (`ct stop --stateful`) and snapshots live on the source node only: a
        move would leave them behind, so it is refused before anything is touched."""
        if observed.stateful_stopped:
            raise FailedPrecondition(
                f"container {self.name!r} is stopped with its processes saved on node {self.source_name!r}, which "
                f"a migration would leave behind: `corral ct start {self.name}` (resume them there) or "
                f"`corral ct start --stateless {self.name}` (drop them) first"
            )
        if snaps := await src.list_snapshots(self.name):
            raise FailedPrecondition(
                f"container {self.name!r} has {len(snaps)} snapshot(s) on node {self.source_name!r}, which stay "
                f"there: a migration would lose them. Remove them first (`corral ct snapshot ls {self.name}`, "
                f"`corral ct snapshot rm {self.name} SNAPSHOT`)"
            )

    # -- run ------------------------------------------------------------------------------

    async def run(self, ctx: OpContext) -> dict[str, Any]:
        params = self._params(ctx)
        if params.from_checkpoint:
            return await self._run_from_checkpoint(ctx)
        record = await self._record()
        src, dst = self._agent(self.source_name), self._agent(self.target_name)
        live = params.live
        strategy = params.strategy if live else "cold"
        observed = await src.get(self.name, wait_idle=True)
        await self._refuse_what_stays(src, observed)
        was_running = observed.state == ContainerState.RUNNING
        await ctx.set_params(replace(self._params(ctx), was_running=was_running))
        if live and not was_running:
            raise FailedPrecondition(f"container {self.name!r} is not running: migrate it without --live")
        shared = record.storage in SHARED_STORAGES
        if strategy == POST_COPY and shared:
            raise FailedPrecondition(f"post-copy cannot move {record.storage} storage (see fleet.migrate)")

        image_bytes = 0  # what the memory images will hold, for the destination to prepare room
        if live:
            await ctx.phase("preflight", "checking that CRIU can dump this container, without stopping it")
            try:
                async with ctx.step(StepName.PREFLIGHT):
                    trial = await src.checkpoint(ctx.op.id, self.name, apb.CHECKPOINT_MODE_TRIAL)
                if strategy == Strategy.STOP_AND_COPY:  # not pre-copy's diffs, nor post-copy's lazy pages
                    image_bytes = trial.memory_bytes
                # The pre-flight looks at the container without stopping it (pause 0), and trial-dumps
                # only a small one: pause_ms is what the workload stood still.
                await ctx.timing(preflight=trial.wall_ms, preflight_pause=trial.pause_ms)
            except CorralError as exc:
                if not params.fallback_cold:
                    raise FailedPrecondition(f"CRIU cannot live-migrate {self.name!r}: {exc.message}") from None
                ctx.log.warning("pre-flight failed; falling back to a cold migration", error=exc.message)
                live, strategy = False, "cold"
                await ctx.set_params(replace(self._params(ctx), live=False, strategy=Strategy.COLD,
                                             fell_back_to_cold=exc.message))  # fmt: skip

        grant = private_key = None
        if not shared or live:
            private_key, public_key = _operation_keypair()
            await ctx.phase("open-channel")
            async with ctx.step(StepName.OPEN_CHANNEL):
                grant = await dst.prepare_receive(ctx.op.id, self.name, public_key, CHANNEL_TTL, image_bytes)

        if not shared:
            await ctx.phase("precopy-rootfs", "copying the root filesystem while the container runs")
            began = time.monotonic()
            async with ctx.step(StepName.PRECOPY_ROOTFS):
                previous = None
                for n in range(1, PRECOPY_MAX_PASSES + 1):
                    ctx.check_cancel()
                    stats = await self._send(ctx, apb.TRANSFER_CONTENT_ROOTFS, f"precopy-rootfs pass {n}", private_key, grant)
                    delta = stats.literal_bytes
                    if delta < PRECOPY_SMALL_DELTA or (previous is not None and delta >= previous):
                        break
                    previous = delta
            await ctx.timing(precopy=(time.monotonic() - began) * 1000)
        predumps = 0
        if strategy == PRE_COPY:
            await ctx.phase("precopy-memory", "copying memory while the container runs")
            began = time.monotonic()
            async with ctx.step(StepName.PRECOPY_MEMORY):
                predumps = await self._precopy_memory(ctx, src, private_key, grant)
            await ctx.set_params(replace(self._params(ctx), predumps=predumps))
            await ctx.timing(precopy_memory=(time.monotonic() - began) * 1000)
        ctx.check_cancel()  # the last point where cancelling leaves nothing to undo but a copy

        if strategy == POST_COPY:
            return await self._run_postcopy(ctx, record, src, dst, private_key, grant)

        if image_bytes:
            await self._await_landing(ctx, dst)
        down_began = time.monotonic()
        if live:
            what = "freezing and dumping the container, sending " + ("its images" if shared else "it")
            await ctx.phase("checkpoint", what)
            async with ctx.step(StepName.CHECKPOINT):
                watching = asyncio.ensure_future(self._watch_sending(ctx, src))
                try:
                    dump = await src.checkpoint(ctx.op.id, self.name, apb.CHECKPOINT_MODE_STOP, predumps,
                                                send=self._send_along(grant, private_key, rootfs=not shared,
                                                                      while_dumping=grant.takes_pieces))  # fmt: skip
                finally:
                    watching.cancel()
            # Downtime began at the freeze, inside the dump: count from there, not from the call.
            down_began = time.monotonic() - (dump.pause_ms + dump.sent_ms + dump.reply_after_ms) / 1000
            await self._sent_along(ctx, dump, shared)
            await ctx.timing(dump=dump.wall_ms, freeze=dump.pause_ms, criu_frozen=dump.frozen_ms,
                             criu_memdump=dump.memdump_ms)  # fmt: skip
        elif was_running:
            await ctx.phase("stop-source", "stopping the container on the source")
            async with ctx.step(StepName.STOP_SOURCE):
                await src.stop(self.name, force=False, timeout=30)

        generation = record.volume_generation
        if shared:
            generation = record.volume_generation + 1
            await ctx.set_params(replace(self._params(ctx), volume_generation=generation))
            await ctx.phase("detach-source", "handing the volume over (no data is copied)")
            async with ctx.step(StepName.DETACH_SOURCE):
                await src.detach_volume(ctx.op.id, self.name)
        elif not live:
            await ctx.phase("final-rootfs", "copying what changed since the last pass")
            transfer_began = time.monotonic()
            await self._final_transfer(ctx, private_key, grant)
            await ctx.timing(transfer=(time.monotonic() - transfer_began) * 1000)

        await ctx.phase("adopt", "installing the container on the target")
        async with ctx.step(StepName.ADOPT):
            await dst.adopt(ctx.op.id, replace(record, node=self.target_name, volume_generation=generation))
        if live:
            await ctx.phase("restore", "restoring processes on the target")
            restore_began = time.monotonic()
            async with ctx.step(StepName.RESTORE):
                restored = await dst.restore(ctx.op.id, self.name, apb.RESTORE_SOURCE_RECEIVED)
                # Downtime ends when the target runs it, not when its agent's reply (after some
                # bookkeeping) arrives here: the agent measures that gap on its own clock.
                now = time.monotonic() - restored.reply_after_ms / 1000
            await ctx.timing(restore=(now - restore_began) * 1000, downtime=(now - down_began) * 1000,
                             criu_restore=restored.restore_ms)  # fmt: skip
        elif was_running:
            async with ctx.step(StepName.START_TARGET):
                await dst.start(self.name)
            await ctx.timing(downtime=(time.monotonic() - down_began) * 1000)

        return await self._switch_and_clean(ctx)

    async def _final_transfer(self, ctx: OpContext, private_key: str, grant) -> None:
        """Cold, local storage: the rootfs delta once the container has stopped."""
        async with ctx.step(StepName.FINAL_TRANSFER):
            final = await self._send(ctx, apb.TRANSFER_CONTENT_ROOTFS, "final-rootfs", private_key, grant)
        await ctx.timing(final_rootfs_bytes=final.literal_bytes)

    @staticmethod
    def _send_along(grant: apb.ReceiveGrant, private_key: str, *, rootfs: bool,
                    while_dumping: bool = False) -> apb.SendAlong:  # fmt: skip
        """`while_dumping` only where the destination takes pieces; compressed where it takes those."""
        return apb.SendAlong(address=grant.address, user=grant.user, host_key=grant.host_key, private_key=private_key,
                             rootfs=rootfs, timeout_seconds=TRANSFER_TIMEOUT, while_dumping=while_dumping,
                             compress=while_dumping and grant.takes_compressed,
                             images_port=grant.images_port if while_dumping else 0,
                             images_tls=grant.images_tls if while_dumping and grant.images_port else None)  # fmt: skip

    async def _watch_sending(self, ctx: OpContext, src: AgentClient) -> None:
        """The images' progress while the checkpoint step sends them (for `ops watch`); a report,
        never a reason to fail the step."""

        def progress(u: apb.TransferUpdate) -> None:
            ctx.progress(phase="send-checkpoint", bytes_done=u.bytes_done, bytes_total=u.bytes_total,
                         rate_bps=u.rate_bps, eta_s=u.eta_s)  # fmt: skip

        try:
            await src.watch_sending(ctx.op.id, progress, TRANSFER_TIMEOUT)
        except CorralError as exc:
            ctx.log.info("no progress for the images sent with the checkpoint", error=exc.message)

    async def _sent_along(self, ctx: OpContext, dump: apb.CheckpointResult, shared: bool) -> None:
        """What a checkpoint sent along (the rootfs delta during the dump, the images after it)."""
        self.bytes_sent += dump.bytes_sent
        # images_bytes: what crossed the network (the memory compressed where it paid); images_size: on disk.
        await ctx.timing(transfer=dump.sent_ms, images_bytes=dump.images_sent_bytes, images_size_bytes=dump.images_bytes)
        if not shared:
            await ctx.timing(final_rootfs_bytes=dump.rootfs_delta_bytes)
        ctx.log.info("sent along with the checkpoint", bytes_sent=dump.bytes_sent,
                     rootfs_delta=dump.rootfs_delta_bytes, images=dump.images_sent_bytes,
                     after_dump_ms=round(dump.sent_ms, 1))  # fmt: skip

    async def _precopy_memory(self, ctx: OpContext, src: AgentClient, private_key: str, grant) -> int:
        """Pre-dump the memory while the container runs, sending each pre-dump, until the dirty
        set stops shrinking; returns the number of the last pre-dump."""
        previous = None
        n = 0
        for n in range(1, PREDUMP_MAX_PASSES + 1):
            ctx.check_cancel()
            result = await src.checkpoint(ctx.op.id, self.name, apb.CHECKPOINT_MODE_PREDUMP, n)
            await self._send(ctx, apb.TRANSFER_CONTENT_PREDUMP, f"precopy-memory pass {n}", private_key, grant)
            pages = result.pages_written
            ctx.log.info("memory pre-dump", iteration=n, pages_written=pages, pause_ms=round(result.pause_ms, 1))
            if pages < PREDUMP_SMALL_PAGES or (previous is not None and pages >= previous):
                break
            previous = pages
        return n

    # -- post-copy ------------------------------------------------------------------------

    async def _run_postcopy(self, ctx: OpContext, record: Container, src: AgentClient, dst: AgentClient,
                            private_key: str, grant) -> dict[str, Any]:  # fmt: skip
        await ctx.phase("lazy-checkpoint", "freezing the container, dumping all but its memory, sending it")
        async with ctx.step(StepName.LAZY_CHECKPOINT):
            dump = await src.checkpoint(ctx.op.id, self.name, apb.CHECKPOINT_MODE_LAZY,
                                        send=self._send_along(grant, private_key, rootfs=True,
                                                              while_dumping=grant.takes_pieces))  # fmt: skip
        self.down_began = time.monotonic() - (dump.pause_ms + dump.sent_ms + dump.reply_after_ms) / 1000
        server = (dump.page_server_address, dump.page_server_port)
        await ctx.set_params(replace(self._params(ctx), page_server=f"{server[0]}:{server[1]}"))
        await self._sent_along(ctx, dump, False)
        await ctx.timing(dump=dump.wall_ms, freeze=dump.pause_ms)

        await ctx.phase("adopt", "installing the container on the target")
        async with ctx.step(StepName.ADOPT):
            await dst.adopt(ctx.op.id, replace(record, node=self.target_name))
        await ctx.phase("lazy-restore", "resuming on the target; its memory follows on demand")
        restore_began = time.monotonic()
        async with ctx.step(StepName.LAZY_RESTORE):
            restored = await dst.restore(ctx.op.id, self.name, apb.RESTORE_SOURCE_RECEIVED, lazy_from=server,
                                         lazy_tls=dump.page_server_tls)  # fmt: skip
            now = time.monotonic() - restored.reply_after_ms / 1000  # (see run: when it ran again)
        await ctx.timing(restore=(now - restore_began) * 1000, downtime=(now - self.down_began) * 1000,
                         criu_restore=restored.restore_ms)  # fmt: skip
        return await self._postcopy_tail(ctx)

    async def _postcopy_tail(self, ctx: OpContext) -> dict[str, Any]:
        """Past post-copy's point of no return: the target runs it. Switch, wait for the pages,
        then remove the source's copy. A failed page transfer is not rolled back (see postcopy.py)."""
        if not ctx.op.done(StepName.SWITCH):
            await self._switch(ctx)
        if not ctx.op.done(StepName.WAIT_PAGES):
            await ctx.phase("wait-pages", f"memory moving from {self.source_name} on demand: until every page "
                                          f"has arrived, losing {self.source_name} loses the container")  # fmt: skip
            async with ctx.step(StepName.WAIT_PAGES):
                await self._wait_pages(ctx)
        return await self._finish_forward(ctx)

    async def _wait_pages(self, ctx: OpContext) -> None:
        deadline = time.monotonic() + PAGES_DEADLINE

        def progress(u: apb.PagesUpdate) -> None:
            ctx.progress(phase="wait-pages", bytes_done=u.bytes_done, bytes_total=u.bytes_total, eta_s=-1)
            self.lazy_bytes = u.bytes_total or self.lazy_bytes  # counted by the target, from its images

        target = asyncio.ensure_future(self._side_report(ctx, self.target_name, deadline, progress))
        source = asyncio.ensure_future(self._side_report(ctx, self.source_name, deadline))
        try:
            await asyncio.wait({target, source}, return_when=asyncio.FIRST_COMPLETED)
            if target.done() and target.result().state == postcopy.DONE:
                return await self._pages_done(ctx, target.result())
            # Either side ended otherwise: hear both before deciding anything.
            t = await _settle(target, TARGET_REACH_WAIT)
            s = await _settle(source, SOURCE_NOTICE_WAIT)
            running = await self._target_running(ctx)
            if postcopy.pages_moved(t, s, running):
                return await self._pages_done(ctx, t)
            if running:
                # Its memory will not all come (the source failed or is gone): it must not run on
                # half of it, and proving it stopped lets the source's copy be used.
                ctx.log.warning("stopping the target's copy: its memory is incomplete")
                await self._client(self.target_name).stop(self.name, force=True, timeout=0)
                running = False
            gone = postcopy.target_gone(t, running)
            if gone and s.state != postcopy.FAILED:
                # Still serving (or still dumping itself to disk, or not heard): keep its checkpoint.
                s = await self._keep_source(ctx, s)
            message = postcopy.failure_message(self.name, ctx.op.id, self.source_name, self.target_name, t, s, gone)
            kept_on = self.source_name if s.kept_checkpoint else ""
            await ctx.set_params(replace(self._params(ctx), kept_checkpoint=s.kept_checkpoint, kept_on=kept_on))
            if gone:
                record = await self._record()
                note = f"post-copy {ctx.op.id} failed, see the operation"
                await self.store.observe_container(self.name, record.node, ContainerState.STOPPED, 0, time.time(), note)
            raise RuntimeFailure(message)
        finally:
            for task in (target, source):
                task.cancel()

    async def _pages_done(self, ctx: OpContext, target: SideReport) -> None:
        if self.down_began is not None:
            await ctx.timing(pages_done=(time.monotonic() - self.down_began) * 1000)
        if self.lazy_bytes:
            await ctx.timing(lazy_bytes=self.lazy_bytes)
        ctx.log.info("every page has moved", target=target.state)

    async def _side_report(self, ctx: OpContext, node: str, deadline: float, progress=None) -> SideReport:
        """One agent's report on the page transfer, asked again through network blips and agent
        restarts until the deadline."""
        while True:
            try:
                update = await self._client(node).wait_pages(ctx.op.id, self.name, PAGES_DEADLINE, progress)
                return SideReport.of(update)
            except (Unavailable, NotFound, FailedPrecondition) as exc:
                if time.monotonic() >= deadline:
                    return SideReport(postcopy.UNREACHABLE, exc.message)
                ctx.log.info("cannot hear from a node about the pages yet; trying again", node=node, error=exc.message)
                await asyncio.sleep(RETRY_INTERVAL)

    async def _through_blips(self, ctx: OpContext, node: str, action, wait: float = TARGET_REACH_WAIT):
        """`action(agent)`, tried again while the node cannot be reached, for at most `wait` s."""
        return await self.reach.retrying(node, action, wait, ctx.log)

    async def _target_running(self, ctx: OpContext) -> bool | None:
        """Does the target run the container? None if it cannot be reached in time."""
        deadline = time.monotonic() + TARGET_REACH_WAIT
        while True:
            try:
                ct = await self._client(self.target_name).get(self.name, wait_idle=True)
                return ct.state == ContainerState.RUNNING
            except NotFound:
                return False
            except (Unavailable, FailedPrecondition) as exc:
                if time.monotonic() >= deadline:
                    ctx.log.warning("target unreachable: cannot tell whether its copy runs", error=exc.message)
                    return None
                await asyncio.sleep(RETRY_INTERVAL)

    async def _keep_source(self, ctx: OpContext, report: SideReport) -> SideReport:
        """The target's copy is gone but the source still serves (or was not heard): make it keep
        the container as a checkpoint, stopped."""
        try:
            return SideReport.of(await self._client(self.source_name).keep_source(ctx.op.id, self.name))
        except CorralError as exc:
            ctx.log.warning("could not make the source keep its checkpoint", error=exc.message)
            return replace(report, detail=report.detail or exc.message)

    # -- from a kept checkpoint -------------------------------------------------------------

    async def _run_from_checkpoint(self, ctx: OpContext) -> dict[str, Any]:
        """After a failed post-copy: run the container again on that migration's source, from the
        checkpoint it kept there. Here `source` is where the record says it is (the failed
        migration's target) and `target` where the checkpoint is."""
        kept_op = self._params(ctx).from_checkpoint
        here = self._agent(self.source_name)
        await ctx.phase("stop-target", f"making sure the copy on {self.source_name} does not run")
        async with ctx.step(StepName.STOP_TARGET):
            try:
                await here.stop(self.name, force=True, timeout=0)
            except NotFound:
                pass  # nothing of it left there
        await ctx.phase("restore-kept", f"restoring the checkpoint kept on {self.target_name}")
        began = time.monotonic()
        async with ctx.step(StepName.RESTORE_KEPT):
            await self._agent(self.target_name).resume_source(kept_op, self.name)
        await ctx.timing(restore=(time.monotonic() - began) * 1000)
        return await self._finish_from_checkpoint(ctx)

    async def _finish_from_checkpoint(self, ctx: OpContext) -> dict[str, Any]:
        kept_op = self._params(ctx).from_checkpoint
        if not ctx.op.done(StepName.SWITCH):
            await ctx.commit_step(StepName.SWITCH, lambda tx: self._move_record(tx, ContainerState.RUNNING))
        if not ctx.op.done(StepName.RELEASE_TARGET):
            # The copy it left behind (stopped; its disk is newer than the checkpoint, but goes with it).
            async with ctx.step(StepName.RELEASE_TARGET):
                old = self._client(self.source_name)
                await old.release(kept_op, self.name)
                try:
                    await old.finish_receive(kept_op, discard=True)
                except CorralError:
                    pass  # its channel was closed already
        return {"from": self.source_name, "to": self.target_name, "live": True, "strategy": FROM_CHECKPOINT,
                "from_checkpoint": kept_op}  # fmt: skip

    # -- switch ---------------------------------------------------------------------------

    async def _switch(self, ctx: OpContext) -> None:
        """The fleet's record now says the container lives on the target: the record and the
        step commit together, so recovery never sees one without the other (review H3)."""
        params = self._params(ctx)
        state = ContainerState.RUNNING if params.was_running else ContainerState.STOPPED
        await ctx.commit_step(StepName.SWITCH, lambda tx: self._move_record(tx, state, params.volume_generation))

    async def _move_record(self, tx: StoreWriter, state: ContainerState, generation: int | None = None) -> None:
        record = await tx.get_container(self.name)
        if record is None:
            raise NotFound(f"container {self.name!r} no longer exists")
        generation = record.volume_generation if generation is None else generation
        await tx.update_container(replace(record, node=self.target_name, volume_generation=generation, message=""))
        await tx.observe_container(self.name, self.target_name, state, 0, time.time(), "")

    async def _switch_and_clean(self, ctx: OpContext) -> dict[str, Any]:
        """The point of no return, then the source's copy goes."""
        await self._switch(ctx)
        return await self._finish_forward(ctx)

    # -- rollback & recovery ---------------------------------------------------------------------

    async def rollback(self, ctx: OpContext, error: CorralError) -> None:
        record = await self._record()
        verdict = decide.after_failure(ctx.op, record.node)
        if verdict == Next.ASK_TARGET:
            runs = await self._target_running(ctx)
            if runs is None:
                why = f"{self.target_name} cannot say whether it runs {self.name!r} from its kept checkpoint"
                await self._mark_in_doubt(ctx, f"migration {ctx.op.id}: {why}")
                raise Unavailable(why)
            verdict = decide.after_target_answer(ctx.op, runs)
        ctx.log.info("after the failure", verdict=verdict.value)
        if verdict == Next.FINISH_FROM_CHECKPOINT:
            await self._finish_from_checkpoint(ctx)  # it runs again where it was kept: finish
        elif verdict == Next.POSTCOPY_TAIL:
            await self._postcopy_tail(ctx)  # the target runs it: never back to the source (postcopy.py)
        elif verdict == Next.FINISH_FORWARD:
            await self._finish_forward(ctx)  # past the point of no return: finish instead
        elif verdict == Next.ROLL_BACK:
            await self._roll_back(ctx, decide.rollback_plan(ctx.op))
        # NOTHING_CHANGED, LEAVE: nothing to do (the error says where a kept checkpoint is).

    async def _roll_back(self, ctx: OpContext, plan: RollbackPlan) -> None:
        op = ctx.op
        await ctx.phase("rollback", f"putting {self.name} back on {self.source_name}")
        if plan.prove_target_gone:
            # Rule 1: the source may run again only once the target's copy is proven gone.
            try:
                async with ctx.step(StepName.UNDO_ADOPT):
                    await self.reach.retrying(self.target_name, self._release_on_target, TARGET_REACH_WAIT, ctx.log)
            except CorralError as exc:
                await self._mark_in_doubt(ctx, f"migration {op.id} could not prove that the copy on "
                                               f"{self.target_name} stopped ({exc.message})")  # fmt: skip
                raise
        if plan.tidy_target_before_reattach:
            # The target must have let go first (its host enforces the ownership marker too).
            await self._best_effort(ctx, StepName.UNDO_ADOPT, self._agent_release_target)
        if plan.reattach_source:
            generation = int(self._params(ctx).volume_generation or 0) + 1
            async with ctx.step(StepName.REATTACH_SOURCE):
                await self._agent(self.source_name).attach_volume(op.id, self.name, generation)
            await self._set_generation(generation)
        await self._resume_source(ctx, plan.resume)
        if plan.tidy_target and not ctx.op.done(StepName.UNDO_ADOPT):
            await self._best_effort(ctx, StepName.UNDO_ADOPT, self._agent_release_target)
        if plan.discard_channel:
            await self._best_effort(ctx, StepName.UNDO_CHANNEL, self._agent_discard_channel)

    async def _release_on_target(self, agent: AgentClient) -> None:
        try:
            await agent.release(self.op.id, self.name)
        except NotFound:
            pass  # nothing of it there

    async def _mark_in_doubt(self, ctx: OpContext, why: str) -> None:
        """Nothing may start it until the target says what it holds (review H2)."""
        ctx.log.error("container in doubt", why=why, nodes=[self.target_name])
        ctx.event("container-doubt", f"{self.name} is in doubt: {why}", node=self.target_name)

        async def write(tx: StoreWriter) -> None:
            record = await tx.get_container(self.name)
            if record is not None:
                await tx.update_container(replace(record, in_doubt=why, doubt_nodes=(self.target_name,)))

        await ctx.commit_step(StepName.MARK_IN_DOUBT, write)

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

    async def _resume_source(self, ctx: OpContext, how: Resume) -> None:
        op = ctx.op
        if how == Resume.NONE:
            return
        src = self._agent(self.source_name)
        if how == Resume.FROM_KEPT:
            # A post-copy source is frozen while it serves pages (the agent still reports it as
            # running): its agent knows whether to thaw it or restore the checkpoint it kept.
            async with ctx.step(StepName.RESUME_SOURCE):
                try:
                    await src.resume_source(op.id, self.name)
                except FailedPrecondition as exc:
                    if (await src.get(self.name, wait_idle=True)).state == ContainerState.RUNNING:
                        return
                    ctx.log.warning("nothing to resume the source from; starting it afresh", error=exc.message)
                    await src.start(self.name)
            return
        current = await src.get(self.name, wait_idle=True)
        if current.state == ContainerState.RUNNING:
            return
        async with ctx.step(StepName.RESUME_SOURCE):
            if how == Resume.RESTORE_OR_START:
                try:
                    await src.restore(op.id, self.name, apb.RESTORE_SOURCE_LOCAL)
                    return
                except NotFound:
                    pass  # the dump never completed: nothing to restore, start it afresh
            await src.start(self.name)

    async def _finish_forward(self, ctx: OpContext) -> dict[str, Any]:
        if not ctx.op.done(StepName.SWITCH):
            return await self._switch_and_clean(ctx)
        if not ctx.op.done(StepName.RELEASE_SOURCE):
            await ctx.phase("release-source", "removing the source's copy")
            async with ctx.step(StepName.RELEASE_SOURCE):
                await self._through_blips(ctx, self.source_name, lambda a: a.release(ctx.op.id, self.name))
        if ctx.op.step(StepName.OPEN_CHANNEL) is not None and not ctx.op.done(StepName.CLOSE_CHANNEL):
            try:
                async with ctx.step(StepName.CLOSE_CHANNEL):
                    await self._through_blips(ctx, self.target_name,
                                              lambda a: a.finish_receive(ctx.op.id, discard=False))  # fmt: skip
            except CorralError as exc:
                # Tidiness only (the grant expires, the staging goes with it): the container has moved.
                ctx.log.warning("could not close the transfer channel on the target", error=exc.message)
        timings = ctx.op.timings
        return {
            "from": self.source_name,
            "to": self.target_name,
            "live": self._params(ctx).live,
            "strategy": self._params(ctx).strategy,
            "downtime_ms": timings.get("downtime"),
            "pages_done_ms": timings.get("pages_done"),
            "bytes_sent": self.bytes_sent,
        }

    async def recover(self, ctx: OpContext) -> dict[str, Any]:
        """The controller restarted mid-migration: decide from a fresh read of the record and of
        the target, never from what the operation was about to do; then finish or roll back."""
        for node in (self.source_name, self.target_name):
            if not await self.nodes.wait_ready(node, RECOVERY_NODE_WAIT):
                ctx.log.warning("node did not come back in time for recovery", node=node)
        verdict = decide.after_restart(ctx.op, (await self._record()).node)
        if verdict == Next.ASK_TARGET:
            try:
                on_target = await self._agent(self.target_name).get(self.name, wait_idle=True)
            except NotFound:
                on_target = None
            runs = on_target is not None and on_target.state == ContainerState.RUNNING
            verdict = decide.after_target_answer(ctx.op, runs)
        ctx.log.info("recovering", verdict=verdict.value)
        if verdict == Next.FINISH_FROM_CHECKPOINT:
            return await self._finish_from_checkpoint(ctx)
        if verdict == Next.POSTCOPY_TAIL:
            return await self._postcopy_tail(ctx)
        if verdict == Next.FINISH_FORWARD:
            return await self._finish_forward(ctx)
        if verdict == Next.NOTHING_CHANGED:
            raise FailedPrecondition("the controller restarted before the checkpoint was restored; nothing changed")
        raise FailedPrecondition("the controller restarted during the migration; rolled back")


async def _settle(task: asyncio.Future, timeout: float) -> SideReport:
    """A side's report, waiting at most `timeout` more for it."""
    try:
        async with asyncio.timeout(timeout):
            return await asyncio.shield(task)
    except TimeoutError:
        return SideReport(postcopy.MOVING, "no outcome reported in time")


def _operation_keypair() -> tuple[str, str]:
    """A fresh key for this operation's transfers: private for the source, public for the target."""
    key = asyncssh.generate_private_key("ssh-ed25519", comment="corral-operation")
    return key.export_private_key().decode(), key.export_public_key().decode().strip()
