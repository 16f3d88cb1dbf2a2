"""Calls from the controller to the agents, one mTLS channel per node."""

from __future__ import annotations

from typing import Mapping, Sequence

from corral.api.client import call
from corral.api.convert import container_from_pb, limits_to_pb, network_to_pb
from corral.api.tls import secure_channel
from corral.config import TlsFiles
from corral.model import Container, Limits, NetworkAttachment, NodeFacts
from corral.v1 import agent_pb2 as apb
from corral.v1 import agent_pb2_grpc

# Deadlines per kind of call; creating a debian rootfs the first time is slow.
CREATE_TIMEOUT = 900.0
LIFECYCLE_TIMEOUT = 120.0
QUICK_TIMEOUT = 15.0


class AgentClient:
    def __init__(self, node: str, address: str, tls: TlsFiles) -> None:
        self.node = node
        self.address = address
        # The agent's certificate names the node; verify that, not the address.
        self.channel = secure_channel(address, tls, server_name=node)
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

    async def start(self, name: str) -> Container:
        return container_from_pb(
            await self._call(self.stub.StartContainer, apb.AgentContainerRef(name=name), LIFECYCLE_TIMEOUT)
        )

    async def stop(self, name: str, force: bool, timeout: int) -> Container:
        req = apb.AgentStopContainerRequest(name=name, force=force, timeout_seconds=timeout)
        return container_from_pb(await self._call(self.stub.StopContainer, req, LIFECYCLE_TIMEOUT + timeout))

    async def destroy(self, name: str, force: bool) -> None:
        req = apb.AgentDestroyContainerRequest(name=name, force=force)
        await self._call(self.stub.DestroyContainer, req, LIFECYCLE_TIMEOUT)

    async def get(self, name: str) -> Container:
        return container_from_pb(await self._call(self.stub.GetContainer, apb.AgentContainerRef(name=name), QUICK_TIMEOUT))

    async def exec(
        self, name: str, argv: Sequence[str], env: Mapping[str, str], stdin: bytes, timeout: int
    ) -> apb.ExecResponse:
        req = apb.ExecRequest(name=name, argv=list(argv), env=dict(env), stdin=stdin, timeout_seconds=timeout)
        return await self._call(self.stub.Exec, req, (timeout or 300) + 15)

    async def set_limits(self, name: str, limits: Limits) -> Container:
        req = apb.AgentSetLimitsRequest(name=name, limits=limits_to_pb(limits))
        return container_from_pb(await self._call(self.stub.SetLimits, req, LIFECYCLE_TIMEOUT))

    async def close(self) -> None:
        await self.channel.close()


class AgentPool:
    def __init__(self, tls: TlsFiles) -> None:
        self.tls = tls
        self._clients: dict[str, AgentClient] = {}

    def client(self, facts: NodeFacts) -> AgentClient:
        existing = self._clients.get(facts.name)
        if existing is not None and existing.address == facts.address:
            return existing
        client = AgentClient(facts.name, facts.address, self.tls)
        self._clients[facts.name] = client
        return client

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
