"""Calls from the controller to the agents, one mTLS channel per node."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, AsyncIterator, Callable, Mapping, Sequence

import grpc

from corral.api.client import call, interactive_exec, rpc_error
from corral.api.convert import container_from_pb, container_to_pb, exec_event_from_pb, limits_to_pb, network_to_pb
from corral.api.convert import snapshot_from_pb
from corral.errors import NotFound, Unavailable
from corral.api.tls import secure_channel
from corral.config import TlsFiles
from corral.exec_session import ExecInputEvent, ExecStart
from corral.model import Container, Limits, NetworkAttachment, NodeFacts, NodeState, Snapshot
from corral.proc import EXEC_DEFAULT_TIMEOUT, Exited, Output
from corral.v1 import agent_pb2 as apb
from corral.v1 import agent_pb2_grpc

if TYPE_CHECKING:
    from controller.health.registry import NodeRegistry

# Deadlines per kind of call; creating a debian rootfs the first time is slow.
CREATE_TIMEOUT = 900.0
LIFECYCLE_TIMEOUT = 120.0
QUICK_TIMEOUT = 15.0
EXEC_AGENT_MARGIN = 30.0
# A stateful stop or start: CRIU writes or reads the whole memory (agent/stateful.py's own deadline + a margin).
STATEFUL_TIMEOUT = 360.0
SNAPSHOT_TIMEOUT = 3700.0  # a snapshot copies the container's whole disk on its host


class AgentClient:
    def __init__(self, node: str, address: str, tls: TlsFiles) -> None:
        self.node = node
        self.address = address
        # The server must prove it is the agent of this node (role and name), whatever the address.
        self.channel = secure_channel(address, tls, server_name=node, role="agent")
        self.stub = agent_pb2_grpc.AgentServiceStub(self.channel)
        self.peer = f"agent on node {node!r} ({address})"

    async def _call(self, rpc, request, timeout: float):
        return await call(rpc, request, timeout=timeout, peer=self.peer)

    async def create(
        self, name: str, template: str, limits: Limits, network: NetworkAttachment, storage: str
    ) -> Container:
        req = apb.AgentCreateContainerRequest(
            name=name, template=template, limits=limits_to_pb(limits), network=network_to_pb(network), storage=storage
        )
        return container_from_pb(await self._call(self.stub.CreateContainer, req, CREATE_TIMEOUT))

    async def start(self, name: str, *, stateless: bool = False) -> Container:
        req = apb.AgentStartContainerRequest(name=name, stateless=stateless)
        return container_from_pb(await self._call(self.stub.StartContainer, req, STATEFUL_TIMEOUT))

    async def stop(self, name: str, force: bool, timeout: int, *, stateful: bool = False) -> Container:
        req = apb.AgentStopContainerRequest(name=name, force=force, timeout_seconds=timeout, stateful=stateful)
        deadline = STATEFUL_TIMEOUT if stateful else LIFECYCLE_TIMEOUT + timeout
        return container_from_pb(await self._call(self.stub.StopContainer, req, deadline))

    # -- snapshots (agent/snapshots.py) --

    async def create_snapshot(self, name: str, snapshot: str, stateful: bool) -> Snapshot:
        req = apb.AgentSnapshotRequest(name=name, snapshot=snapshot, stateful=stateful)
        return snapshot_from_pb(await self._call(self.stub.CreateSnapshot, req, SNAPSHOT_TIMEOUT))

    async def list_snapshots(self, name: str) -> list[Snapshot]:
        try:
            reply = await self.stub.ListSnapshots(apb.AgentContainerRef(name=name), timeout=QUICK_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return []  # an agent older than snapshots (a rolling upgrade) has none
            raise rpc_error(exc, self.peer) from None
        return [snapshot_from_pb(s) for s in reply.snapshots]

    async def restore_snapshot(self, name: str, snapshot: str) -> Container:
        req = apb.AgentSnapshotRequest(name=name, snapshot=snapshot)
        return container_from_pb(await self._call(self.stub.RestoreSnapshot, req, SNAPSHOT_TIMEOUT))

    async def delete_snapshot(self, name: str, snapshot: str) -> None:
        req = apb.AgentSnapshotRequest(name=name, snapshot=snapshot)
        await self._call(self.stub.DeleteSnapshot, req, LIFECYCLE_TIMEOUT)

    async def destroy(self, name: str, force: bool) -> None:
        req = apb.AgentDestroyContainerRequest(name=name, force=force)
        await self._call(self.stub.DestroyContainer, req, LIFECYCLE_TIMEOUT)

    async def get(self, name: str, *, wait_idle: bool = False) -> Container:
        timeout = LIFECYCLE_TIMEOUT if wait_idle else QUICK_TIMEOUT
        req = apb.AgentContainerRef(name=name, wait_idle=wait_idle)
        return container_from_pb(await self._call(self.stub.GetContainer, req, timeout))

    async def exec(
        self, name: str, argv: Sequence[str], env: Mapping[str, str], stdin: bytes, timeout: int
    ) -> AsyncIterator[Output | Exited]:
        """The command's output as the agent streams it, then how it ended. Read at the caller's
        pace (gRPC flow control holds the agent, and so the command, up)."""
        req = apb.ExecRequest(name=name, argv=list(argv), env=dict(env), stdin=stdin, timeout_seconds=timeout)
        # The exec's own timeout, plus time for the agent to kill the command and send the rest.
        replies = self.stub.Exec(req, timeout=(timeout or EXEC_DEFAULT_TIMEOUT) + EXEC_AGENT_MARGIN)
        try:
            async for msg in replies:
                yield exec_event_from_pb(msg)
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc, self.peer) from None
        finally:
            replies.cancel()  # a no-op once it has ended; else the agent kills the command

    def exec_interactive(self, start: ExecStart, inputs: AsyncIterator[ExecInputEvent]) -> AsyncIterator[Output | Exited]:
        """An interactive exec on this agent: `inputs` go as they come, the output comes back."""
        return interactive_exec(self.stub.ExecInteractive, start, inputs, peer=self.peer, margin=EXEC_AGENT_MARGIN)

    async def set_limits(self, name: str, limits: Limits) -> Container:
        req = apb.AgentSetLimitsRequest(name=name, limits=limits_to_pb(limits))
        return container_from_pb(await self._call(self.stub.SetLimits, req, LIFECYCLE_TIMEOUT))

    # -- migration -------------------------------------------------------------------

    async def await_landing(self, op_id: str, timeout: float) -> apb.AwaitLandingReply:
        req = apb.AwaitLandingRequest(op_id=op_id, timeout_ms=int(timeout * 1000))
        return await self._call(self.stub.AwaitLanding, req, QUICK_TIMEOUT + timeout)

    async def prepare_receive(self, op_id: str, name: str, public_key: str, ttl: int,
                              expect_image_bytes: int = 0) -> apb.ReceiveGrant:  # fmt: skip
        req = apb.PrepareReceiveRequest(op_id=op_id, container=name, public_key=public_key, ttl_seconds=ttl,
                                        expect_image_bytes=expect_image_bytes)  # fmt: skip
        return await self._call(self.stub.PrepareReceive, req, QUICK_TIMEOUT)

    async def finish_receive(self, op_id: str, discard: bool) -> None:
        await self._call(self.stub.FinishReceive, apb.FinishReceiveRequest(op_id=op_id, discard=discard), LIFECYCLE_TIMEOUT)

    async def send_files(
        self, op_id: str, name: str, content: int, grant: apb.ReceiveGrant, private_key: str,
        timeout: int, on_progress: Callable[[apb.TransferUpdate], None],
    ) -> apb.TransferUpdate:  # fmt: skip
        """Stream a transfer; returns its final update (with the totals)."""
        req = apb.SendFilesRequest(
            op_id=op_id, container=name, content=content, address=grant.address, user=grant.user,
            host_key=grant.host_key, private_key=private_key, timeout_seconds=timeout,
        )  # fmt: skip
        last = None
        try:
            async for update in self.stub.SendFiles(req, timeout=timeout + 30):
                last = update
                on_progress(update)
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc, self.peer) from None
        if last is None or not last.finished:
            raise Unavailable(f"{self.peer} ended the transfer without its totals")
        return last

    async def checkpoint(
        self, op_id: str, name: str, mode: int, iteration: int = 0, send: apb.SendAlong | None = None
    ) -> apb.CheckpointResult:
        """`send`: the source sends the rootfs delta and the images to the destination in the same
        call (see agent.migration.SendAlong); the deadline then covers the transfer too."""
        req = apb.CheckpointRequest(op_id=op_id, container=name, mode=mode, iteration=iteration, send=send)
        timeout = LIFECYCLE_TIMEOUT + (send.timeout_seconds if send is not None else 0)
        return await self._call(self.stub.Checkpoint, req, timeout)

    async def watch_sending(
        self, op_id: str, on_update: Callable[[apb.TransferUpdate], None], timeout: float
    ) -> None:
        """Follow the images a checkpoint of `op_id` sends along, until that send ends."""
        try:
            async for update in self.stub.WatchSending(apb.WatchSendingRequest(op_id=op_id), timeout=timeout):
                on_update(update)
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc, self.peer) from None

    async def restore(
        self, op_id: str, name: str, source: int, lazy_from: tuple[str, int] | None = None,
        lazy_tls: apb.PageServerTls | None = None,
    ) -> apb.RestoreResult:  # fmt: skip
        address, port = lazy_from or ("", 0)
        req = apb.RestoreRequest(op_id=op_id, container=name, source=source, lazy_address=address, lazy_port=port,
                                 lazy_tls=lazy_tls)  # fmt: skip
        return await self._call(self.stub.Restore, req, LIFECYCLE_TIMEOUT)

    async def wait_pages(
        self, op_id: str, name: str, timeout: float, on_update: Callable[[apb.PagesUpdate], None] | None = None
    ) -> apb.PagesUpdate:
        """Follow a post-copy page transfer on this node; returns its last update (the outcome)."""
        req = apb.WaitPagesRequest(op_id=op_id, container=name)
        last = None
        try:
            async for update in self.stub.WaitPages(req, timeout=timeout):
                last = update
                if on_update is not None:
                    on_update(update)
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc, self.peer) from None
        if last is None or last.state == apb.PAGES_STATE_MOVING:
            raise Unavailable(f"{self.peer} ended the page transfer report before its outcome")
        return last

    async def keep_source(self, op_id: str, name: str) -> apb.PagesUpdate:
        req = apb.ResumeSourceRequest(op_id=op_id, container=name)
        return await self._call(self.stub.KeepSource, req, CREATE_TIMEOUT)

    async def resume_source(self, op_id: str, name: str) -> Container:
        req = apb.ResumeSourceRequest(op_id=op_id, container=name)
        return container_from_pb(await self._call(self.stub.ResumeSource, req, CREATE_TIMEOUT))

    async def adopt(self, op_id: str, container: Container, volume_generation: int = 0,
                    takeover_from: str = "") -> Container:  # fmt: skip
        req = apb.AdoptContainerRequest(
            op_id=op_id, container=container_to_pb(container), volume_generation=volume_generation,
            takeover_from=takeover_from,
        )  # fmt: skip
        return container_from_pb(await self._call(self.stub.AdoptContainer, req, CREATE_TIMEOUT))

    async def release(self, op_id: str, name: str) -> None:
        req = apb.ReleaseContainerRequest(op_id=op_id, name=name)
        await self._call(self.stub.ReleaseContainer, req, LIFECYCLE_TIMEOUT)

    async def detach_volume(self, op_id: str, name: str) -> None:
        await self._call(self.stub.DetachVolume, apb.VolumeRequest(op_id=op_id, name=name), LIFECYCLE_TIMEOUT)

    async def attach_volume(self, op_id: str, name: str, generation: int) -> None:
        req = apb.VolumeRequest(op_id=op_id, name=name, generation=generation)
        await self._call(self.stub.AttachVolume, req, LIFECYCLE_TIMEOUT)

    async def close(self) -> None:
        await self.channel.close()


class AgentPool:
    def __init__(self, tls: TlsFiles) -> None:
        self.tls = tls
        self._clients: dict[str, AgentClient] = {}
        self._closing: set[asyncio.Task] = set()

    def client(self, facts: NodeFacts) -> AgentClient:
        existing = self._clients.get(facts.name)
        if existing is not None and existing.address == facts.address:
            return existing
        if existing is not None:
            # The node moved: the old channel is closed in the background (calls on it may still run).
            task = asyncio.get_running_loop().create_task(existing.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        client = AgentClient(facts.name, facts.address, self.tls)
        self._clients[facts.name] = client
        return client

    def ready(self, nodes: NodeRegistry, name: str) -> AgentClient:
        """The agent of node `name`, which must be registered and ready."""
        node = nodes.get(name)
        if node is None:
            raise NotFound(f"node {name!r} is not registered")
        if node.state != NodeState.READY:
            raise Unavailable(f"node {name!r} is {node.state.value}")
        return self.client(node.facts)

    async def close(self) -> None:
        await asyncio.gather(*self._closing, return_exceptions=True)
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
