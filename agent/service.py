"""The agent's gRPC servicer: protobuf in, domain calls, protobuf out. Nothing else.

`AGENT_POLICY` is its access table: only the controller drives an agent, and every
container name and operation id a request carries is validated at the edge, before
any method here runs (corral.api.server).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from agent.containers import ContainerManager
from agent.host_facts import HostFacts
from agent.interactive import InteractiveExec
from agent.migration import CHECKPOINT, PREDUMP, ROOTFS, Migrations, SendAlong, Sent
from agent.postcopy import PagesState, PagesStatus
from agent.snapshots import Snapshots
from agent.stateful import StatefulLifecycle
from agent.runtime.checkpoint import DumpResult
from agent.transfer.client import PushTarget, TransferProgress
from corral.api.convert import (
    container_from_pb,
    container_to_pb,
    exec_event_to_pb,
    facts_to_pb,
    limits_from_pb,
    network_from_pb,
    snapshot_to_pb,
    stats_to_pb,
)
from corral.api.server import ServicePolicy, serve_interactive_exec, container, node, operation, reads, writes
from corral.api.standard import STANDARD_TABLES
from corral import pki
from corral.errors import InvalidArgument
from corral.model import validate_limits
from corral.v1 import agent_pb2 as apb
from corral.v1 import agent_pb2_grpc

_CONTROLLER = ("controller",)  # only the controller drives an agent

AGENT_POLICY = ServicePolicy(
    apb.DESCRIPTOR.services_by_name["AgentService"],
    {
        "GetNodeFacts": reads(_CONTROLLER),
        "CreateContainer": writes(_CONTROLLER, container()),
        "StartContainer": writes(_CONTROLLER, container()),
        "StopContainer": writes(_CONTROLLER, container()),
        "DestroyContainer": writes(_CONTROLLER, container()),
        "GetContainer": reads(_CONTROLLER, container()),
        "ListContainers": reads(_CONTROLLER),
        "Exec": writes(_CONTROLLER, container()),
        "ExecInteractive": writes(_CONTROLLER, container("start.name")),
        "SetLimits": writes(_CONTROLLER, container()),
        "GetContainerStats": reads(_CONTROLLER),  # names checked by the container manager
        "PrepareReceive": writes(_CONTROLLER, container("container"), operation()),
        "FinishReceive": writes(_CONTROLLER, operation()),
        "AwaitLanding": reads(_CONTROLLER, operation()),
        "SendFiles": writes(_CONTROLLER, container("container"), operation()),
        "Checkpoint": writes(_CONTROLLER, container("container"), operation()),
        "WatchSending": reads(_CONTROLLER, operation()),
        "Restore": writes(_CONTROLLER, container("container"), operation()),
        "AdoptContainer": writes(_CONTROLLER, container("container.name"), operation(),
                                 node("takeover_from", optional=True)),
        "ReleaseContainer": writes(_CONTROLLER, container(), operation()),
        "DetachVolume": writes(_CONTROLLER, container(), operation()),
        "AttachVolume": writes(_CONTROLLER, container(), operation()),
        "WaitPages": reads(_CONTROLLER, container("container"), operation()),
        "ResumeSource": writes(_CONTROLLER, container("container"), operation()),
        "KeepSource": writes(_CONTROLLER, container("container"), operation()),
        "CreateSnapshot": writes(_CONTROLLER, container()),
        "ListSnapshots": reads(_CONTROLLER, container()),
        "RestoreSnapshot": writes(_CONTROLLER, container()),
        "DeleteSnapshot": writes(_CONTROLLER, container()),
    },
    # One caller (the controller): a few connections suffice, and the cap keeps strangers
    # from using up the descriptors the agent needs for LXC, CRIU and loop devices.
    max_concurrent_rpcs=256,
    max_connections=128,
    standard=STANDARD_TABLES,  # health and reflection, to every certificate of the fleet
)


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, containers: ContainerManager, facts: HostFacts, migrations: Migrations) -> None:
        self.containers = containers
        self.facts = facts
        self.migrations = migrations
        self.interactive = InteractiveExec(containers)
        self.lifecycle = StatefulLifecycle(containers, migrations.checkpointer)
        self.snapshots = Snapshots(containers, migrations.checkpointer)

    async def GetNodeFacts(self, request, context):
        return facts_to_pb(self.facts.current())

    async def CreateContainer(self, request: apb.AgentCreateContainerRequest, context):
        ct = await self.containers.create(
            request.name,
            request.template,
            validate_limits(limits_from_pb(request.limits)),
            network_from_pb(request.network),
            request.storage,
        )
        return container_to_pb(ct)

    async def StartContainer(self, request: apb.AgentStartContainerRequest, context):
        return container_to_pb(await self.lifecycle.start(request.name, stateless=request.stateless))

    async def StopContainer(self, request: apb.AgentStopContainerRequest, context):
        ct = await self.lifecycle.stop(request.name, force=request.force, timeout=request.timeout_seconds,
                                       stateful=request.stateful)  # fmt: skip
        return container_to_pb(ct)

    async def DestroyContainer(self, request, context):
        await self.containers.destroy(request.name, force=request.force)
        return apb.AgentDestroyContainerResponse()

    async def GetContainer(self, request, context):
        return container_to_pb(await self.containers.get(request.name, wait_idle=request.wait_idle))

    async def ListContainers(self, request, context):
        return apb.AgentListContainersResponse(containers=[container_to_pb(c) for c in await self.containers.list()])

    async def Exec(self, request: apb.ExecRequest, context):
        # Each yield waits for gRPC's flow control: a caller that reads slowly holds the command up.
        events = self.containers.exec(
            request.name, list(request.argv), dict(request.env), request.stdin, request.timeout_seconds
        )
        async with contextlib.aclosing(events):
            async for event in events:
                yield exec_event_to_pb(event, apb.ExecResponse)

    async def ExecInteractive(self, request_iterator, context):
        async for msg in serve_interactive_exec(request_iterator, self.interactive.run, apb.ExecResponse):
            yield msg

    async def SetLimits(self, request, context):
        ct = await self.containers.set_limits(request.name, validate_limits(limits_from_pb(request.limits)))
        return container_to_pb(ct)

    async def GetContainerStats(self, request: apb.AgentContainerStatsRequest, context):
        stats = await self.containers.stats(list(request.names))
        return apb.AgentContainerStatsResponse(stats=[stats_to_pb(s) for s in stats])

    # -- snapshots -----------------------------------------------------------------

    async def CreateSnapshot(self, request: apb.AgentSnapshotRequest, context):
        return snapshot_to_pb(await self.snapshots.create(request.name, request.snapshot, stateful=request.stateful))

    async def ListSnapshots(self, request: apb.AgentContainerRef, context):
        return apb.AgentListSnapshotsResponse(snapshots=[snapshot_to_pb(s) for s in await self.snapshots.list(request.name)])

    async def RestoreSnapshot(self, request: apb.AgentSnapshotRequest, context):
        return container_to_pb(await self.snapshots.restore(request.name, request.snapshot))

    async def DeleteSnapshot(self, request: apb.AgentSnapshotRequest, context):
        await self.snapshots.delete(request.name, request.snapshot)
        return apb.AgentDeleteSnapshotResponse()

    # -- migration -----------------------------------------------------------------

    async def PrepareReceive(self, request: apb.PrepareReceiveRequest, context):
        grant = await self.migrations.prepare_receive(
            request.op_id, request.container, request.public_key, float(request.ttl_seconds or 3600),
            expect_image_bytes=request.expect_image_bytes,
        )
        return apb.ReceiveGrant(
            address=grant.address, user=grant.user, host_key=grant.host_key, takes_pieces=True, takes_compressed=True,
            images_port=grant.images_port, images_tls=_one_time_to_pb(grant.images_tls) if grant.images_tls else None,
        )  # fmt: skip

    async def AwaitLanding(self, request: apb.AwaitLandingRequest, context):
        ready, size = await self.migrations.await_landing(request.op_id, request.timeout_ms / 1000)
        return apb.AwaitLandingReply(ready=ready, bytes=size)

    async def FinishReceive(self, request, context):
        await self.migrations.finish_receive(request.op_id, request.discard)
        return apb.FinishReceiveResponse()

    async def SendFiles(self, request: apb.SendFilesRequest, context):
        content = {apb.TRANSFER_CONTENT_ROOTFS: ROOTFS, apb.TRANSFER_CONTENT_CHECKPOINT: CHECKPOINT,
                   apb.TRANSFER_CONTENT_PREDUMP: PREDUMP}.get(request.content)  # fmt: skip
        if content is None:
            raise InvalidArgument("transfer content must be ROOTFS, CHECKPOINT or PREDUMP")
        target = PushTarget(request.address, request.user, request.host_key, request.private_key)
        updates: asyncio.Queue = asyncio.Queue(maxsize=1)

        def progress(p: TransferProgress) -> None:
            # Only the newest progress matters: replace what the stream has not sent yet.
            if updates.full():
                updates.get_nowait()
            updates.put_nowait(p)

        task = asyncio.ensure_future(self.migrations.send(
            request.op_id, request.container, content, target, float(request.timeout_seconds or 3600), progress
        ))  # fmt: skip
        try:
            while not task.done():
                getter = asyncio.ensure_future(updates.get())
                await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    p = getter.result()
                    yield apb.TransferUpdate(bytes_done=p.bytes_done, bytes_total=p.bytes_total,
                                             rate_bps=p.rate_bps, eta_s=p.eta_s if p.eta_s is not None else -1)  # fmt: skip
                else:
                    getter.cancel()
            stats = task.result()
        finally:
            if not task.done():
                task.cancel()
        yield apb.TransferUpdate(
            finished=True, bytes_done=stats.total_size, bytes_total=stats.total_size, bytes_sent=stats.bytes_sent,
            literal_bytes=stats.literal_bytes, total_size=stats.total_size,
            files_transferred=stats.files_transferred, duration_ms=stats.duration_s * 1000,
        )  # fmt: skip

    async def Checkpoint(self, request: apb.CheckpointRequest, context):
        op, name, mode = request.op_id, request.container, request.mode
        send = _send_along(request.send) if request.HasField("send") else None
        if send is not None and mode not in (apb.CHECKPOINT_MODE_STOP, apb.CHECKPOINT_MODE_LAZY):
            raise InvalidArgument("only a STOP or LAZY checkpoint is sent along")
        if mode == apb.CHECKPOINT_MODE_LAZY:
            lazy, sent = await self.migrations.lazy_checkpoint(op, name, send)
            r = lazy.ready
            return _with_sent(apb.CheckpointResult(
                wall_ms=r.wall_ms, images_bytes=r.images_bytes, started_at=r.started_at,
                pause_ms=max(0.0, (r.ready_at - (lazy.frozen_at or r.started_at)) * 1000),
                page_server_address=lazy.address, page_server_port=lazy.port, lazy_bytes=lazy.lazy_bytes,
                page_server_tls=_one_time_to_pb(lazy.client_tls),
            ), sent)  # fmt: skip
        sent = None
        if mode == apb.CHECKPOINT_MODE_PREDUMP:
            result = await self.migrations.predump(op, name, request.iteration)
        elif mode in (apb.CHECKPOINT_MODE_TRIAL, apb.CHECKPOINT_MODE_STOP):
            trial = mode == apb.CHECKPOINT_MODE_TRIAL
            result, sent = await self.migrations.checkpoint(op, name, trial, 0 if trial else request.iteration, send)
        else:
            raise InvalidArgument("checkpoint mode must be TRIAL, STOP, LAZY or PREDUMP")
        c = result.criu
        return _with_sent(apb.CheckpointResult(
            wall_ms=result.wall_ms, frozen_ms=c.frozen_ms or 0, freezing_ms=c.freezing_ms or 0,
            memdump_ms=c.memdump_ms or 0, memwrite_ms=c.memwrite_ms or 0, images_bytes=result.images_bytes,
            started_at=result.started_at,
            pause_ms=_pause_ms(result, trial=mode == apb.CHECKPOINT_MODE_TRIAL), pages_written=c.pages_written or 0,
            memory_bytes=result.memory_bytes,
        ), sent)  # fmt: skip

    async def WatchSending(self, request: apb.WatchSendingRequest, context):
        async for p in self.migrations.watch_sending(request.op_id):
            yield apb.TransferUpdate(bytes_done=p.bytes_done, bytes_total=p.bytes_total, rate_bps=p.rate_bps,
                                     eta_s=p.eta_s if p.eta_s is not None else -1)  # fmt: skip

    async def Restore(self, request: apb.RestoreRequest, context):
        if request.source not in (apb.RESTORE_SOURCE_LOCAL, apb.RESTORE_SOURCE_RECEIVED):
            raise InvalidArgument("restore source must be LOCAL or RECEIVED")
        lazy_from = None
        if request.lazy_address or request.lazy_port:
            if not request.lazy_address or not 0 < request.lazy_port < 65536:
                raise InvalidArgument("a post-copy restore needs the page server's address and port")
            lazy_from = (request.lazy_address, request.lazy_port)
        lazy_tls = None
        if request.HasField("lazy_tls"):
            lazy_tls = _one_time_from_pb(request.lazy_tls, "the page server's")
        local = request.source == apb.RESTORE_SOURCE_LOCAL
        ct, result = await self.migrations.restore(request.op_id, request.container, local, lazy_from, lazy_tls)
        return apb.RestoreResult(container=container_to_pb(ct), wall_ms=result.wall_ms,
                                 restore_ms=result.criu.restore_ms or 0, finished_at=result.finished_at,
                                 reply_after_ms=max(0.0, (time.time() - result.finished_at) * 1000))  # fmt: skip

    async def WaitPages(self, request: apb.WaitPagesRequest, context):
        async for status in self.migrations.wait_pages(request.op_id):
            yield _pages_to_pb(status)

    async def KeepSource(self, request: apb.ResumeSourceRequest, context):
        return _pages_to_pb(await self.migrations.keep_source(request.op_id, request.container))

    async def ResumeSource(self, request: apb.ResumeSourceRequest, context):
        return container_to_pb(await self.migrations.resume_source(request.op_id, request.container))

    async def AdoptContainer(self, request: apb.AdoptContainerRequest, context):
        ct = await self.migrations.adopt(request.op_id, container_from_pb(request.container), request.takeover_from)
        return container_to_pb(ct)

    async def ReleaseContainer(self, request, context):
        await self.migrations.release(request.op_id, request.name)
        return apb.ReleaseContainerResponse()

    async def DetachVolume(self, request, context):
        await self.containers.detach_volume(request.name)
        return apb.VolumeResponse()

    async def AttachVolume(self, request, context):
        await self.containers.attach_volume(request.name, request.generation)
        return apb.VolumeResponse()


def _pages_to_pb(s: PagesStatus) -> apb.PagesUpdate:
    return apb.PagesUpdate(
        state=_PAGES_STATE[s.state], bytes_done=s.bytes_done, bytes_total=s.bytes_total,
        pages_done_at=s.pages_done_at or 0, detail=s.detail,
        kept_checkpoint=str(s.kept_checkpoint) if s.kept_checkpoint else "",
    )  # fmt: skip


_PAGES_STATE = {
    PagesState.MOVING: apb.PAGES_STATE_MOVING,
    PagesState.DONE: apb.PAGES_STATE_DONE,
    PagesState.FAILED: apb.PAGES_STATE_FAILED,
    PagesState.UNKNOWN: apb.PAGES_STATE_UNKNOWN,
}


def _one_time_to_pb(client: pki.OneTimeClient) -> apb.PageServerTls:
    return apb.PageServerTls(ca=client.ca.decode(), cert=client.cert.decode(), key=client.key.decode())


def _one_time_from_pb(t: apb.PageServerTls, whose: str) -> pki.OneTimeClient:
    if not all("-----BEGIN" in pem for pem in (t.ca, t.cert, t.key)):
        raise InvalidArgument(f"{whose} one-time TLS must be three PEM texts (CA, cert, key)")
    return pki.OneTimeClient(t.ca.encode(), t.cert.encode(), t.key.encode())


def _send_along(send: apb.SendAlong) -> SendAlong:
    images_tls = None
    if send.images_port:
        if not 0 < send.images_port < 65536 or not send.HasField("images_tls"):
            raise InvalidArgument("an images endpoint needs a port (1-65535) and its one-time TLS")
        images_tls = _one_time_from_pb(send.images_tls, "the images endpoint's")
    return SendAlong(PushTarget(send.address, send.user, send.host_key, send.private_key), send.rootfs,
                     float(send.timeout_seconds or 3600), send.while_dumping, send.compress,
                     send.images_port, images_tls)  # fmt: skip


def _pause_ms(result: DumpResult, *, trial: bool) -> float:
    """How long the workload stood still. A pre-flight pauses it only if it ran a trial dump
    (CRIU's own figure then: no freeze of ours marks its start)."""
    if trial:
        return result.criu.paused_ms or 0.0
    return max(0.0, (result.finished_at - result.freeze_began) * 1000) if result.finished_at else result.wall_ms


def _with_sent(result: apb.CheckpointResult, sent: Sent | None) -> apb.CheckpointResult:
    if sent is not None:
        rootfs = sent.rootfs
        result.sent_ms = sent.after_dump_ms
        result.images_sent_bytes = sent.images.bytes_sent
        result.rootfs_delta_bytes = rootfs.literal_bytes if rootfs else 0
        result.bytes_sent = sent.images.bytes_sent + (rootfs.bytes_sent if rootfs else 0)
        result.reply_after_ms = max(0.0, (time.time() - sent.finished_at) * 1000)
    return result
