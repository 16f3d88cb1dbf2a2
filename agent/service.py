"""The agent's gRPC servicer: protobuf in, domain calls, protobuf out. Nothing else."""

from __future__ import annotations

from agent.containers import ContainerManager
from agent.host_facts import HostFacts
from corral.api.convert import container_to_pb, facts_to_pb, limits_from_pb, network_from_pb
from corral.model import validate_limits
from corral.v1 import agent_pb2 as apb
from corral.v1 import agent_pb2_grpc

# Only the controller drives an agent.
AGENT_POLICY = lambda method: ("controller",)  # noqa: E731


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, containers: ContainerManager, facts: HostFacts) -> None:
        self.containers = containers
        self.facts = facts

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

    async def StartContainer(self, request, context):
        return container_to_pb(await self.containers.start(request.name))

    async def StopContainer(self, request, context):
        ct = await self.containers.stop(request.name, force=request.force, timeout=request.timeout_seconds)
        return container_to_pb(ct)

    async def DestroyContainer(self, request, context):
        await self.containers.destroy(request.name, force=request.force)
        return apb.AgentDestroyContainerResponse()

    async def GetContainer(self, request, context):
        return container_to_pb(await self.containers.get(request.name))

    async def ListContainers(self, request, context):
        return apb.AgentListContainersResponse(containers=[container_to_pb(c) for c in await self.containers.list()])

    async def Exec(self, request: apb.ExecRequest, context):
        result = await self.containers.exec(
            request.name, list(request.argv), dict(request.env), request.stdin, request.timeout_seconds
        )
        return apb.ExecResponse(exit_code=result.exit_code, stdout=result.stdout, stderr=result.stderr)

    async def SetLimits(self, request, context):
        ct = await self.containers.set_limits(request.name, validate_limits(limits_from_pb(request.limits)))
        return container_to_pb(ct)
