"""The controller's gRPC servicer: protobuf in, fleet calls, protobuf out.

`CONTROLLER_POLICY` is its access table: agents may only register and heartbeat, and
only for themselves (`_require_self`); users (people, services) have the rest, each
method listed; names and ids in requests are validated at the edge (corral.api.server).
"""

from __future__ import annotations

import time

import contextlib

from controller.events import EventBus, Lagged
from controller.fleet import Fleet, HaSettings, PlacementWish
from controller.metrics import HEARTBEAT_SECONDS, HEARTBEATS
from controller.operations.engine import Engine
from controller.health.registry import NodeRegistry
from corral.api.convert import (
    container_from_pb,
    container_to_pb,
    event_to_pb,
    exec_event_to_pb,
    facts_from_pb,
    limits_from_pb,
    node_to_pb,
    operation_to_pb,
    snapshot_to_pb,
    stats_to_pb,
)
from corral.api.server import ServicePolicy, serve_interactive_exec, container, current_identity, node, operation, reads, writes
from corral.api.standard import STANDARD_TABLES
from corral.compat import agent_compatibility, controller_version
from corral.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from corral.names import validate_name
from corral.v1 import controller_pb2 as cpb
from corral.v1 import controller_pb2_grpc

_AGENT, _USER = ("agent",), ("user",)

CONTROLLER_POLICY = ServicePolicy(
    cpb.DESCRIPTOR.services_by_name["ControllerService"],
    {
        "RegisterNode": writes(_AGENT, node("facts.name")),
        # Observations only (desired state is untouched), once a second per node: not logged.
        "Heartbeat": reads(_AGENT, node("facts.name")),
        "ListNodes": reads(_USER),
        "GetNode": reads(_USER, node()),
        "MarkNodeFenced": writes(_USER, node()),
        "SetNodeCordon": writes(_USER, node()),
        "PlanPlacement": reads(_USER, container(), node("node", optional=True)),
        "EvacuateNode": writes(_USER, node()),
        "RebalanceFleet": writes(_USER),
        "CheckFleet": reads(_USER),
        "CreateContainer": writes(_USER, container(), node("node", optional=True)),
        "StartContainer": writes(_USER, container()),
        "StopContainer": writes(_USER, container()),
        "DestroyContainer": writes(_USER, container()),
        "GetContainer": reads(_USER, container()),
        "ListContainers": reads(_USER, node("node", optional=True)),
        "GetContainerStats": reads(_USER, container("name", optional=True), node("node", optional=True)),
        "ExecContainer": writes(_USER, container()),
        "ExecContainerInteractive": writes(_USER, container("start.name")),
        "CreateSnapshot": writes(_USER, container()),
        "ListSnapshots": reads(_USER, container()),
        "RestoreSnapshot": writes(_USER, container()),
        "DeleteSnapshot": writes(_USER, container()),
        "SetContainerLimits": writes(_USER, container()),
        "ResolveContainer": writes(_USER, container(), node("node")),
        "SetContainerHa": writes(_USER, container()),
        "FailoverContainer": writes(_USER, container(), node("target_node", optional=True)),
        # An empty target is left to the fleet, whose error says which option names it.
        "MigrateContainer": writes(_USER, container(), node("target_node", optional=True),
                                   operation("from_checkpoint", optional=True)),
        "ListOperations": reads(_USER, container("container", optional=True)),
        "GetOperation": reads(_USER, operation("id")),
        "WatchOperation": reads(_USER, operation("id")),
        "CancelOperation": writes(_USER, operation("id")),
        "WatchEvents": reads(_USER),
        "AcquireLease": writes(_USER),
    },
    # Every agent holds a connection (heartbeats), users and services one each.
    max_concurrent_rpcs=2000,
    max_connections=4000,
    standard=STANDARD_TABLES,  # health and reflection, to every certificate of the fleet
)
controller_policy = CONTROLLER_POLICY  # the name controller.main imports


def _moves_reply(plan, op) -> cpb.MovesReply:
    reply = cpb.MovesReply(
        moves=[cpb.Move(container=m.container, source=m.source, target=m.target, live=m.live, reason=m.reason)
               for m in plan.moves],
        stuck=[cpb.Stuck(container=s.container, reason=s.reason) for s in plan.stuck],
    )  # fmt: skip
    if op is not None:
        reply.operation.CopyFrom(operation_to_pb(op))
    return reply


def _require_self(node: str) -> None:
    identity = current_identity.get()
    if identity is None or identity.name != node:
        raise PermissionDenied(f"agent {identity.name if identity else '?'!r} may not speak for node {node!r}")


class ControllerServicer(controller_pb2_grpc.ControllerServiceServicer):
    def __init__(self, fleet: Fleet, nodes: NodeRegistry, engine: Engine, heartbeat_interval: float,
                 events: EventBus | None = None) -> None:  # fmt: skip
        self.fleet = fleet
        self.engine = engine
        self.nodes = nodes
        self.heartbeat_interval = heartbeat_interval
        self.events = events or engine.events
        self.version = controller_version()
        self._refused: dict[str, str] = {}  # node -> why its agent was last refused (one event per reason)

    async def RegisterNode(self, request, context):
        facts = facts_from_pb(request.facts)
        _require_self(facts.name)
        # Version skew: an agent of another major, newer than this controller, or more than
        # one minor older is refused with the reason (it logs it and keeps trying).
        compatible = agent_compatibility(facts.agent_version, self.version)
        if not compatible:
            why = f"node {facts.name} refused: {compatible.reason}"
            if self._refused.get(facts.name) != why:
                self._refused[facts.name] = why
                self.events.emit("node-refused", why, node=facts.name, agent_version=facts.agent_version,
                                 controller_version=self.version)  # fmt: skip
            raise FailedPrecondition(why)
        self._refused.pop(facts.name, None)
        await self.nodes.register(facts)
        orders = await self.fleet.observe(facts.name, [container_from_pb(c) for c in request.containers])
        return cpb.RegisterNodeResponse(heartbeat_interval_seconds=self.heartbeat_interval,
                                        lease_seconds=self.nodes.policy.lease, ha_containers=orders.ha)  # fmt: skip

    async def Heartbeat(self, request, context):
        HEARTBEATS.inc()
        with HEARTBEAT_SECONDS.time():
            return await self._heartbeat(request)

    async def _heartbeat(self, request):
        facts = facts_from_pb(request.facts)
        _require_self(facts.name)
        if not self.nodes.heartbeat(facts):
            return cpb.HeartbeatResponse(reregister=True)
        orders = await self.fleet.observe(facts.name, [container_from_pb(c) for c in request.containers])
        recovery = self.fleet.recovery
        return cpb.HeartbeatResponse(lease_seconds=self.nodes.policy.lease, ha_containers=orders.ha,
                                     ha_keep_running=orders.keep_running, ha_max_restart=recovery.max_restart,
                                     ha_restart_window_seconds=recovery.restart_window)  # fmt: skip

    async def ListNodes(self, request, context):
        return cpb.ListNodesResponse(nodes=[node_to_pb(n) for n in await self.fleet.list_nodes()])

    async def MarkNodeFenced(self, request: cpb.MarkNodeFencedRequest, context):
        identity = current_identity.get()
        by = f"{identity.role} {identity.name}" if identity else "?"
        self.nodes.mark_fenced(request.name, f"{request.how or 'said to be off'} (by {by})")
        return node_to_pb(await self.fleet.get_node(request.name))

    async def GetNode(self, request, context):
        return node_to_pb(await self.fleet.get_node(request.name))

    async def CreateContainer(self, request: cpb.CreateContainerRequest, context):
        ct = await self.fleet.create(
            request.name, request.template, request.node, limits_from_pb(request.limits), request.storage, request.start,
            ha=HaSettings(request.ha, request.ha_priority, request.ha_group),
            wish=PlacementWish(tuple(request.constraints), request.group),
        )
        return container_to_pb(ct)

    async def PlanPlacement(self, request: cpb.PlanPlacementRequest, context):
        plan = await self.fleet.plan_placement(
            request.name, existing=request.existing, node=request.node, limits=limits_from_pb(request.limits),
            storage=request.storage, wish=PlacementWish(tuple(request.constraints), request.group),
        )
        return cpb.PlacementPlan(node=plan.node, reason=plan.reason, rejected=dict(plan.rejected))

    async def EvacuateNode(self, request: cpb.EvacuateNodeRequest, context):
        plan, op = await self.fleet.evacuate(request.name, allow_cold=request.allow_cold, dry_run=request.dry_run)
        return _moves_reply(plan, op)

    async def RebalanceFleet(self, request: cpb.RebalanceFleetRequest, context):
        plan, op = await self.fleet.rebalance(apply=request.apply, band=request.band or 0.15)
        return _moves_reply(plan, op)

    async def CheckFleet(self, request, context):
        return cpb.CheckFleetResponse(nodes=[cpb.NodeCheck(node=c.node, ok=c.ok, detail=c.detail)
                                             for c in await self.fleet.check()])  # fmt: skip

    async def SetNodeCordon(self, request: cpb.SetNodeCordonRequest, context):
        return node_to_pb(await self.fleet.cordon(request.name, request.cordoned))

    async def StartContainer(self, request: cpb.StartContainerRequest, context):
        return container_to_pb(await self.fleet.start(request.name, stateless=request.stateless))

    async def StopContainer(self, request: cpb.StopContainerRequest, context):
        ct = await self.fleet.stop(request.name, request.force, request.timeout_seconds, stateful=request.stateful)
        return container_to_pb(ct)

    async def CreateSnapshot(self, request: cpb.SnapshotRequest, context):
        return snapshot_to_pb(await self.fleet.create_snapshot(request.name, request.snapshot, request.stateful))

    async def ListSnapshots(self, request: cpb.ContainerRef, context):
        return cpb.ListSnapshotsResponse(snapshots=[snapshot_to_pb(s) for s in await self.fleet.list_snapshots(request.name)])

    async def RestoreSnapshot(self, request: cpb.SnapshotRequest, context):
        return container_to_pb(await self.fleet.restore_snapshot(request.name, request.snapshot))

    async def DeleteSnapshot(self, request: cpb.SnapshotRequest, context):
        await self.fleet.delete_snapshot(request.name, request.snapshot)
        return cpb.DeleteSnapshotResponse()

    async def DestroyContainer(self, request, context):
        await self.fleet.destroy(request.name, request.force)
        return cpb.DestroyContainerResponse()

    async def GetContainer(self, request, context):
        return container_to_pb(await self.fleet.get(request.name))

    async def ListContainers(self, request, context):
        return cpb.ListContainersResponse(containers=[container_to_pb(c) for c in await self.fleet.list(request.node)])

    async def GetContainerStats(self, request: cpb.GetContainerStatsRequest, context):
        stats, unanswered = await self.fleet.stats(request.name, request.node)
        return cpb.GetContainerStatsResponse(stats=[stats_to_pb(s) for s in stats], unanswered=unanswered)

    async def ExecContainer(self, request: cpb.ExecContainerRequest, context):
        # Relayed as it comes: each yield waits for the caller to take it (gRPC flow control),
        # and the agent's stream is read no faster.
        events = self.fleet.exec(
            request.name, list(request.argv), dict(request.env), request.stdin, request.timeout_seconds
        )
        async with contextlib.aclosing(events):
            async for event in events:
                yield exec_event_to_pb(event, cpb.ExecContainerResponse)

    async def ExecContainerInteractive(self, request_iterator, context):
        async for msg in serve_interactive_exec(request_iterator, self.fleet.exec_interactive, cpb.ExecContainerResponse):
            yield msg

    async def SetContainerLimits(self, request, context):
        return container_to_pb(await self.fleet.set_limits(request.name, limits_from_pb(request.limits)))

    async def SetContainerHa(self, request: cpb.SetContainerHaRequest, context):
        ha = HaSettings(request.ha, request.ha_priority, request.ha_group)
        return container_to_pb(await self.fleet.set_ha(request.name, ha))

    async def FailoverContainer(self, request: cpb.FailoverContainerRequest, context):
        return operation_to_pb(await self.fleet.failover(request.name, request.target_node))

    async def ResolveContainer(self, request: cpb.ResolveContainerRequest, context):
        plan = await self.fleet.resolve(request.name, request.node, request.dry_run)
        return cpb.ResolveContainerResponse(name=plan.name, keep=plan.keep, remove=list(plan.remove),
                                            reason=plan.reason, done=not request.dry_run)  # fmt: skip

    async def MigrateContainer(self, request: cpb.MigrateContainerRequest, context):
        op = await self.fleet.migrate(
            request.name, request.target_node, live=request.live, postcopy=request.postcopy,
            fallback_cold=request.fallback_cold, from_checkpoint=request.from_checkpoint,
        )  # fmt: skip
        return operation_to_pb(op)

    async def ListOperations(self, request, context):
        ops = await self.engine.list(request.container or None, request.active_only)
        return cpb.ListOperationsResponse(operations=[operation_to_pb(op) for op in ops])

    async def GetOperation(self, request, context):
        return operation_to_pb(await self.engine.get(request.id))

    async def WatchOperation(self, request, context):
        async for op in self.engine.watch(request.id):
            yield operation_to_pb(op)

    async def CancelOperation(self, request, context):
        return operation_to_pb(await self.engine.cancel(request.id))

    async def WatchEvents(self, request: cpb.WatchEventsRequest, context):
        try:
            async for event in self.events.watch(request.since, request.follow):
                yield event_to_pb(event)
        except Lagged as exc:
            raise FailedPrecondition(str(exc)) from None

    async def AcquireLease(self, request: cpb.AcquireLeaseRequest, context):
        if not request.name or not request.holder or len(request.holder) > 200:
            raise InvalidArgument("a lease needs a name and a holder (at most 200 characters)")
        if not 0 < request.ttl_seconds <= 3600:
            raise InvalidArgument("lease ttl_seconds must be between 0 and 3600")
        validate_name(request.name, "lease name")
        now = time.time()
        holder, expires = await self.fleet.store.acquire_lease(request.name, request.holder, request.ttl_seconds, now)
        return cpb.AcquireLeaseResponse(granted=holder == request.holder, holder=holder, seconds_left=expires - now)
