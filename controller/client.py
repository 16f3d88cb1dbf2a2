"""A typed async client of the controller's API, for the CLI and other services.

    async with ControllerClient("10.0.0.1:7700", TlsFiles(...)) as fleet:
        ct = await fleet.create_container("web1", "busybox", limits=Limits(memory_bytes=256 << 20))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Mapping, Sequence

import grpc

from corral.api.client import call, interactive_exec, rpc_error
from corral.api.convert import container_from_pb, exec_event_from_pb, limits_to_pb, node_from_pb, stats_from_pb
from corral.api.convert import snapshot_from_pb
from corral.v1 import types_pb2
from corral.api.tls import secure_channel
from corral.config import TlsFiles
from corral.errors import Unavailable
from corral.exec_session import ExecInputEvent, ExecStart
from corral.model import Container, ContainerStats, Limits, Node, Snapshot
from corral.proc import EXEC_DEFAULT_TIMEOUT, STDOUT, Exited, Output
from corral.v1 import controller_pb2 as cpb
from corral.v1 import controller_pb2_grpc


# Beyond an exec's timeout: time for the agent to kill the command and for the rest to arrive.
EXEC_MARGIN = 60.0


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False


@dataclass(frozen=True)
class PlacementPlan:
    """Where the scheduler would put a container, why, and why not each other node."""

    node: str
    reason: str
    rejected: Mapping[str, str]


class ControllerClient:
    def __init__(self, address: str, tls: TlsFiles, timeout: float = 900.0) -> None:
        self.address = address
        self.timeout = timeout
        self.channel = secure_channel(address, tls, server_name="controller", role="controller")
        self.stub = controller_pb2_grpc.ControllerServiceStub(self.channel)

    async def __aenter__(self) -> "ControllerClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.channel.close()

    async def _call(self, rpc, request, timeout: float | None = None):
        return await call(rpc, request, timeout=timeout or self.timeout, peer=f"controller {self.address}")

    async def list_nodes(self) -> list[Node]:
        reply = await self._call(self.stub.ListNodes, cpb.ListNodesRequest(), 30)
        return [node_from_pb(n) for n in reply.nodes]

    async def mark_fenced(self, name: str, how: str) -> Node:
        req = cpb.MarkNodeFencedRequest(name=name, how=how)
        return node_from_pb(await self._call(self.stub.MarkNodeFenced, req, 30))

    async def set_node_cordon(self, name: str, cordoned: bool) -> Node:
        req = cpb.SetNodeCordonRequest(name=name, cordoned=cordoned)
        return node_from_pb(await self._call(self.stub.SetNodeCordon, req, 30))

    async def plan_placement(self, name: str, *, existing: bool = False, node: str = "", limits: Limits = Limits(),
                             storage: str = "", constraints: Sequence[str] = (), group: str = "") -> PlacementPlan:  # fmt: skip
        """Where the scheduler would place a new container (or move `name`, existing): nothing changes."""
        req = cpb.PlanPlacementRequest(name=name, existing=existing, node=node, limits=limits_to_pb(limits),
                                       storage=storage, constraints=list(constraints), group=group)  # fmt: skip
        plan = await self._call(self.stub.PlanPlacement, req, 30)
        return PlacementPlan(plan.node, plan.reason, dict(plan.rejected))

    async def evacuate_node(self, name: str, *, allow_cold: bool = False, dry_run: bool = False) -> cpb.MovesReply:
        req = cpb.EvacuateNodeRequest(name=name, allow_cold=allow_cold, dry_run=dry_run)
        return await self._call(self.stub.EvacuateNode, req, 60)

    async def rebalance_fleet(self, *, apply: bool = False, band: float = 0.0) -> cpb.MovesReply:
        return await self._call(self.stub.RebalanceFleet, cpb.RebalanceFleetRequest(apply=apply, band=band), 60)

    async def check_fleet(self) -> list[cpb.NodeCheck]:
        return list((await self._call(self.stub.CheckFleet, cpb.CheckFleetRequest(), 60)).nodes)

    async def get_node(self, name: str) -> Node:
        return node_from_pb(await self._call(self.stub.GetNode, cpb.GetNodeRequest(name=name), 30))

    async def create_container(
        self,
        name: str,
        template: str,
        *,
        node: str = "",
        limits: Limits = Limits(),
        storage: str = "",
        start: bool = False,
        ha: bool = False,
        ha_priority: int = 0,
        ha_group: str = "",
        constraints: Sequence[str] = (),
        group: str = "",
    ) -> Container:
        req = cpb.CreateContainerRequest(
            name=name, template=template, node=node, limits=limits_to_pb(limits), storage=storage, start=start,
            ha=ha, ha_priority=ha_priority, ha_group=ha_group, constraints=list(constraints), group=group,
        )  # fmt: skip
        return container_from_pb(await self._call(self.stub.CreateContainer, req))

    async def start_container(self, name: str, *, stateless: bool = False) -> Container:
        req = cpb.StartContainerRequest(name=name, stateless=stateless)
        return container_from_pb(await self._call(self.stub.StartContainer, req))

    async def stop_container(self, name: str, *, force: bool = False, timeout: int = 0,
                             stateful: bool = False) -> Container:  # fmt: skip
        req = cpb.StopContainerRequest(name=name, force=force, timeout_seconds=timeout, stateful=stateful)
        return container_from_pb(await self._call(self.stub.StopContainer, req))

    async def create_snapshot(self, name: str, snapshot: str, *, stateful: bool = False) -> Snapshot:
        req = cpb.SnapshotRequest(name=name, snapshot=snapshot, stateful=stateful)
        return snapshot_from_pb(await self._call(self.stub.CreateSnapshot, req))

    async def list_snapshots(self, name: str) -> list[Snapshot]:
        reply = await self._call(self.stub.ListSnapshots, cpb.ContainerRef(name=name), 30)
        return [snapshot_from_pb(s) for s in reply.snapshots]

    async def restore_snapshot(self, name: str, snapshot: str) -> Container:
        req = cpb.SnapshotRequest(name=name, snapshot=snapshot)
        return container_from_pb(await self._call(self.stub.RestoreSnapshot, req))

    async def delete_snapshot(self, name: str, snapshot: str) -> None:
        await self._call(self.stub.DeleteSnapshot, cpb.SnapshotRequest(name=name, snapshot=snapshot))

    async def destroy_container(self, name: str, *, force: bool = False) -> None:
        await self._call(self.stub.DestroyContainer, cpb.DestroyContainerRequest(name=name, force=force))

    async def get_container(self, name: str) -> Container:
        return container_from_pb(await self._call(self.stub.GetContainer, cpb.ContainerRef(name=name), 30))

    async def list_containers(self, node: str = "") -> list[Container]:
        reply = await self._call(self.stub.ListContainers, cpb.ListContainersRequest(node=node), 30)
        return [container_from_pb(c) for c in reply.containers]

    async def container_stats(self, name: str = "", node: str = "") -> tuple[list[ContainerStats], dict[str, str]]:
        """What one container (or every container, of `node` if given) uses and how often it hit its
        limits; and, for all, why each node that did not answer did not."""
        req = cpb.GetContainerStatsRequest(name=name, node=node)
        reply = await self._call(self.stub.GetContainerStats, req, 30)
        return [stats_from_pb(s) for s in reply.stats], dict(reply.unanswered)

    async def exec_stream(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdin: bytes = b"",
        timeout: int = 0,
    ) -> AsyncIterator[Output | Exited]:
        """Run a command in a container: its output as it comes (`Output`, fd 1 or 2), then how
        it ended (`Exited`, always last). The command waits while the caller does not read."""
        req = cpb.ExecContainerRequest(
            name=name, argv=list(argv), env=dict(env or {}), stdin=stdin, timeout_seconds=timeout
        )
        # The exec's own timeout (not this client's, which would cap it) plus the controller's
        # and the agent's margin for the kill and the last output.
        replies = self.stub.ExecContainer(req, timeout=(timeout or EXEC_DEFAULT_TIMEOUT) + EXEC_MARGIN)
        try:
            async for msg in replies:
                yield exec_event_from_pb(msg)
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc, f"controller {self.address}") from None
        finally:
            replies.cancel()  # a no-op once it has ended; else the command is killed

    def exec_interactive(self, start: ExecStart, inputs: AsyncIterator[ExecInputEvent]) -> AsyncIterator[Output | Exited]:
        """Run a command in a container, fed as it runs: `inputs` (stdin, terminal sizes,
        signals; their end half-closes) go as they come; its output comes back, then `Exited`.
        Leaving early kills the command."""
        return interactive_exec(self.stub.ExecContainerInteractive, start, inputs, peer=f"controller {self.address}",
                                margin=EXEC_MARGIN)  # fmt: skip

    async def exec(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdin: bytes = b"",
        timeout: int = 0,
    ) -> ExecResult:
        """`exec_stream`, collected: for commands whose output fits in memory."""
        stdout, stderr = bytearray(), bytearray()
        async for event in self.exec_stream(name, argv, env=env, stdin=stdin, timeout=timeout):
            if isinstance(event, Exited):
                return ExecResult(event.returncode, bytes(stdout), bytes(stderr), event.timed_out)
            (stdout if event.fd == STDOUT else stderr).extend(event.data)
        raise Unavailable(f"controller {self.address} ended the exec stream without the command's exit status")

    async def set_limits(self, name: str, limits: Limits) -> Container:
        req = cpb.SetContainerLimitsRequest(name=name, limits=limits_to_pb(limits))
        return container_from_pb(await self._call(self.stub.SetContainerLimits, req))

    async def set_ha(self, name: str, ha: bool, priority: int = 0, group: str = "") -> Container:
        req = cpb.SetContainerHaRequest(name=name, ha=ha, ha_priority=priority, ha_group=group)
        return container_from_pb(await self._call(self.stub.SetContainerHa, req))

    async def acquire_lease(self, name: str, holder: str, ttl: float) -> cpb.AcquireLeaseResponse:
        req = cpb.AcquireLeaseRequest(name=name, holder=holder, ttl_seconds=ttl)
        return await self._call(self.stub.AcquireLease, req, min(ttl, 30))

    async def failover(self, name: str, target: str = "") -> types_pb2.Operation:
        req = cpb.FailoverContainerRequest(name=name, target_node=target)
        return await self._call(self.stub.FailoverContainer, req, 60)

    async def resolve_container(self, name: str, node: str, *, dry_run: bool) -> cpb.ResolveContainerResponse:
        req = cpb.ResolveContainerRequest(name=name, node=node, dry_run=dry_run)
        return await self._call(self.stub.ResolveContainer, req, 120)

    # -- migrations and operations (operations are returned as protobuf messages) --------

    async def migrate(
        self, name: str, target: str, *, live: bool = False, postcopy: bool = False, fallback_cold: bool = False,
        from_checkpoint: str = "",
    ) -> types_pb2.Operation:  # fmt: skip
        req = cpb.MigrateContainerRequest(
            name=name, target_node=target, live=live, postcopy=postcopy, fallback_cold=fallback_cold,
            from_checkpoint=from_checkpoint,
        )  # fmt: skip
        return await self._call(self.stub.MigrateContainer, req, 60)

    async def list_operations(self, container: str = "", active_only: bool = False) -> list[types_pb2.Operation]:
        req = cpb.ListOperationsRequest(container=container, active_only=active_only)
        return list((await self._call(self.stub.ListOperations, req, 30)).operations)

    async def get_operation(self, op_id: str) -> types_pb2.Operation:
        return await self._call(self.stub.GetOperation, cpb.OperationRef(id=op_id), 30)

    async def cancel_operation(self, op_id: str) -> types_pb2.Operation:
        return await self._call(self.stub.CancelOperation, cpb.OperationRef(id=op_id), 30)

    async def watch_operation(self, op_id: str) -> AsyncIterator[types_pb2.Operation]:
        """The operation as it changes, until it has finished."""
        try:
            async for op in self.stub.WatchOperation(cpb.OperationRef(id=op_id), timeout=self.timeout):
                yield op
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc, f"controller {self.address}") from None

    async def watch_events(self, since: int = 0, follow: bool = True) -> AsyncIterator[types_pb2.Event]:
        """The fleet's events numbered after `since`; with `follow`, new ones as they come (no deadline)."""
        try:
            async for event in self.stub.WatchEvents(cpb.WatchEventsRequest(since=since, follow=follow),
                                                     timeout=None if follow else self.timeout):  # fmt: skip
                yield event
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc, f"controller {self.address}") from None

    async def wait_operation(self, op_id: str) -> types_pb2.Operation:
        last = None
        async for last in self.watch_operation(op_id):
            pass
        return last
