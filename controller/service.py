"""The controller's gRPC servicer: protobuf in, fleet calls, protobuf out."""

from __future__ import annotations

from controller.fleet import Fleet
from controller.operations.engine import Engine
from controller.health.registry import NodeRegistry
from corral.api.convert import (
    container_from_pb,
    container_to_pb,
    facts_from_pb,
    limits_from_pb,
    node_to_pb,
    operation_to_pb,
)
from corral.api.server import current_identity
from corral.errors import PermissionDenied
from corral.v1 import agent_pb2 as apb
from corral.v1 import controller_pb2 as cpb
from corral.v1 import controller_pb2_grpc

_AGENT_METHODS = {"RegisterNode", "Heartbeat"}


def controller_policy(method: str) -> tuple[str, ...]:
    """Agents may only report themselves; users (people, services) use the rest."""
    return ("agent",) if method in _AGENT_METHODS else ("user",)


def _require_self(node: str) -> None:
    identity = current_identity.get()
    if identity is None or identity.name != node:
        raise PermissionDenied(f"agent {identity.name if identity else '?'!r} may not speak for node {node!r}")


class ControllerServicer(controller_pb2_grpc.ControllerServiceServicer):
    def __init__(self, fleet: Fleet, nodes: NodeRegistry, engine: Engine, heartbeat_interval: float) -> None:
        self.fleet = fleet
        self.engine = engine
        self.nodes = nodes
        self.heartbeat_interval = heartbeat_interval

    async def RegisterNode(self, request, context):
        facts = facts_from_pb(request.facts)
        _require_self(facts.name)
        await self.nodes.register(facts)
        await self.fleet.observe(facts.name, [container_from_pb(c) for c in request.containers])
        return cpb.RegisterNodeResponse(heartbeat_interval_seconds=self.heartbeat_interval)

    async def Heartbeat(self, request, context):
        facts = facts_from_pb(request.facts)
        _require_self(facts.name)
        if not self.nodes.heartbeat(facts):
            return cpb.HeartbeatResponse(reregister=True)
        await self.fleet.observe(facts.name, [container_from_pb(c) for c in request.containers])
        return cpb.HeartbeatResponse()

    async def ListNodes(self, request, context):
        return cpb.ListNodesResponse(nodes=[node_to_pb(n) for n in await self.fleet.list_nodes()])

    async def GetNode(self, request, context):
        return node_to_pb(await self.fleet.get_node(request.name))

    async def CreateContainer(self, request: cpb.CreateContainerRequest, context):
        ct = await self.fleet.create(
            request.name, request.template, request.node, limits_from_pb(request.limits), request.storage, request.start
        )
        return container_to_pb(ct)

    async def StartContainer(self, request, context):
        return container_to_pb(await self.fleet.start(request.name))

    async def StopContainer(self, request, context):
        return container_to_pb(await self.fleet.stop(request.name, request.force, request.timeout_seconds))

    async def DestroyContainer(self, request, context):
        await self.fleet.destroy(request.name, request.force)
        return cpb.DestroyContainerResponse()

    async def GetContainer(self, request, context):
        return container_to_pb(await self.fleet.get(request.name))

    async def ListContainers(self, request, context):
        return cpb.ListContainersResponse(containers=[container_to_pb(c) for c in await self.fleet.list(request.node)])

    async def ExecContainer(self, request: apb.ExecRequest, context):
        return await self.fleet.exec(
            request.name, list(request.argv), dict(request.env), request.stdin, request.timeout_seconds
        )

    async def SetContainerLimits(self, request, context):
        return container_to_pb(await self.fleet.set_limits(request.name, limits_from_pb(request.limits)))

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
