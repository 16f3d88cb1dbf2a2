"""gRPC's standard services and error model over real mutual TLS (issue 12, "Call it from other
services"): health checking and reflection on a real `corral-controller` process and on an
agent's server, reachable with any certificate of the fleet and with no other, and errors
carrying a `google.rpc.Status` with an `ErrorInfo` that any gRPC client can read. No lab."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import socket
import sys
from pathlib import Path

import grpc
import pytest
import yaml
from google.protobuf import descriptor_pool
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from grpc_status import rpc_status

from agent.service import AGENT_POLICY
from controller.service import CONTROLLER_POLICY
from corral import pki
from corral.api.client import call, error_info
from corral.api.server import AccessTableError, make_server
from corral.api.standard import HEALTH, add_standard_services
from corral.api.tls import CHANNEL_OPTIONS, channel_credentials, secure_channel, server_credentials
from corral.config import TlsFiles
from corral.errors import NotFound, PermissionDenied
from corral.v1 import agent_pb2, agent_pb2_grpc, controller_pb2, controller_pb2_grpc
from test_authz_table import Fleet, fleet  # noqa: F401  (the fixture: a fleet's CA and certificates, no lab)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
FLEET_CALLERS = ("user", "agent", "controller")
STANDARD_SERVICES = {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Controller:
    """A real `corral-controller` process (controller/main.py) on a free local port."""

    def __init__(self, fleet: Fleet, work: Path) -> None:
        self.address = f"127.0.0.1:{_free_port()}"
        self.config = work / "controller.yaml"
        tls = fleet.server("controller", "controller")
        self.config.write_text(yaml.safe_dump({
            "listen": [self.address],
            "store": {"backend": "sqlite", "path": str(work / "state.db")},
            "tls": {"ca": str(tls.ca), "cert": str(tls.cert), "key": str(tls.key)},
            "network": {"subnet": "10.77.0.0/24", "gateway": "10.77.0.1", "range_start": "10.77.0.10",
                        "range_end": "10.77.0.200"},
        }))  # fmt: skip
        self.log = work / "controller.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log.open("wb") as out:
            self.proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "controller.main", "--config", str(self.config),
                                                             stdout=out, stderr=asyncio.subprocess.STDOUT)  # fmt: skip

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            return await self.proc.wait()


@pytest.fixture(scope="module")
async def controller(fleet, tmp_path_factory):
    ctl = Controller(fleet, tmp_path_factory.mktemp("controller"))
    await ctl.start()
    try:
        async with secure_channel(ctl.address, fleet.tls["user"], "controller") as ch:
            await _until_serving(ch, ctl)
        yield ctl
    finally:
        await ctl.stop()


async def _until_serving(channel: grpc.aio.Channel, ctl: Controller) -> None:
    """Health's Watch, as a probe would: the server is up once it says SERVING."""
    async with asyncio.timeout(30):
        while True:
            assert ctl.proc.returncode is None, ctl.log.read_text()
            try:
                async for reply in health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30):
                    if reply.status == SERVING:
                        return
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc  # not listening yet
            await asyncio.sleep(0.1)


async def _check(channel: grpc.aio.Channel, service: str = ""):
    return (await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)).status


async def _first_watched(channel: grpc.aio.Channel, service: str = ""):
    async for reply in health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=service), timeout=5):
        return reply.status


# -- health ------------------------------------------------------------------------------------


async def test_controller_health_answers_every_fleet_certificate(controller, fleet):
    for caller in FLEET_CALLERS:
        async with secure_channel(controller.address, fleet.tls[caller], "controller") as ch:
            assert await _check(ch) == SERVING, caller
            assert await _check(ch, "corral.v1.ControllerService") == SERVING, caller
            assert await _first_watched(ch) == SERVING, caller
            assert await _first_watched(ch, "corral.v1.ControllerService") == SERVING, caller
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _check(ch, "corral.v1.NoSuchService")
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
    async with secure_channel(controller.address, fleet.tls["foreign"], "controller") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:  # mutual TLS refuses another CA's certificate
            await _check(ch)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_controller_says_not_serving_when_it_stops(fleet, tmp_path):
    ctl = Controller(fleet, tmp_path)
    await ctl.start()
    try:
        async with secure_channel(ctl.address, fleet.tls["user"], "controller") as ch:
            await _until_serving(ch, ctl)
            seen = []
            watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=20)
            async for reply in watch:
                seen.append(reply.status)
                if reply.status == SERVING:
                    ctl.proc.send_signal(signal.SIGTERM)
                else:
                    break
            assert seen == [SERVING, NOT_SERVING]
    finally:
        assert await ctl.stop() == 0, ctl.log.read_text()


def _agent_server(fleet: Fleet):
    server = make_server(AGENT_POLICY)
    agent_pb2_grpc.add_AgentServiceServicer_to_server(agent_pb2_grpc.AgentServiceServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(fleet.server("agent", "n1")))
    return server, f"127.0.0.1:{port}"


async def test_agent_health_follows_its_server(fleet):
    """As agent/main.py: NOT_SERVING until its server is up, SERVING, NOT_SERVING at shutdown;
    the controller and users may ask (a user may call nothing else on an agent)."""
    server, address = _agent_server(fleet)
    standard = await add_standard_services(server, AGENT_POLICY)
    await server.start()
    try:
        async with secure_channel(address, fleet.tls["user"], "n1", "agent") as ch:
            assert await _check(ch) == NOT_SERVING
            await standard.serving()
            for caller in FLEET_CALLERS:
                async with secure_channel(address, fleet.tls[caller], "n1", "agent") as other:
                    assert await _check(other, "corral.v1.AgentService") == SERVING, caller
            watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service="corral.v1.AgentService"))
            assert (await watch.read()).status == SERVING
            await standard.stopping()
            assert (await watch.read()).status == NOT_SERVING
            await standard.serving()  # too late: stays NOT_SERVING
            assert await _check(ch) == NOT_SERVING
            watch.cancel()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await agent_pb2_grpc.AgentServiceStub(ch).GetNodeFacts(
                    agent_pb2.GetNodeFactsRequest(), timeout=5)  # fmt: skip
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await server.stop(None)


# -- reflection --------------------------------------------------------------------------------


def _sync_channel(address: str, tls: TlsFiles, role: str, name: str) -> grpc.Channel:
    options = [*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", pki.server_name(role, name))]
    return grpc.secure_channel(address, channel_credentials(tls), options=options)


def _reflect(address: str, tls: TlsFiles, role: str, name: str, method: str):
    """What grpcurl does: list the services, then build a method's descriptor from the files the
    server sends (with the package's reflection client, in a pool of its own)."""
    with _sync_channel(address, tls, role, name) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        service, _, method_name = method.rpartition(".")
        found = descriptor_pool.DescriptorPool(database).FindServiceByName(service).methods_by_name[method_name]
        return services, found.full_name, found.input_type.full_name, [f.name for f in found.input_type.fields]


async def test_controller_reflection_lists_and_resolves(controller, fleet):
    for caller in FLEET_CALLERS:
        services, method, request, fields = await asyncio.to_thread(
            _reflect, controller.address, fleet.tls[caller], "controller", "controller", "corral.v1.ControllerService.GetContainer")
        assert services == {"corral.v1.ControllerService", *STANDARD_SERVICES}, caller
        assert (method, request) == ("corral.v1.ControllerService.GetContainer", "corral.v1.ContainerRef")
        assert "name" in fields


async def test_agent_reflection_lists_and_resolves(fleet):
    server, address = _agent_server(fleet)
    await add_standard_services(server, AGENT_POLICY)
    await server.start()
    try:
        services, method, request, _ = await asyncio.to_thread(
            _reflect, address, fleet.tls["user"], "agent", "n1", "corral.v1.AgentService.ReleaseContainer")
        assert services == {"corral.v1.AgentService", *STANDARD_SERVICES}
        assert method == "corral.v1.AgentService.ReleaseContainer" and request == "corral.v1.ReleaseContainerRequest"
    finally:
        await server.stop(None)


async def test_reflection_v1_answers_like_v1alpha(controller, fleet):
    """grpc.reflection.v1, which newer clients (grpcurl among them) ask first, on the same wire."""
    async with secure_channel(controller.address, fleet.tls["agent"], "controller") as ch:
        info = ch.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)  # fmt: skip
        requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol="corral.v1.ControllerService"),
                    # what grpcurl asks to print an error's details
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol="google.rpc.ErrorInfo")]  # fmt: skip
        replies = [r async for r in info(iter(requests), timeout=5)]
        v1alpha = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(iter(requests[:1]), timeout=5)
        assert [r async for r in v1alpha][0].list_services_response == replies[0].list_services_response
    assert {s.name for s in replies[0].list_services_response.service} == {"corral.v1.ControllerService", *STANDARD_SERVICES}
    assert replies[1].file_descriptor_response.file_descriptor_proto  # the file and what it imports
    assert replies[2].file_descriptor_response.file_descriptor_proto, replies[2]


# -- errors ------------------------------------------------------------------------------------


def _error_info(exc: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(exc)  # checks the Status's code and message against the call's
    assert status is not None and status.code == exc.code().value[0] and status.message == exc.details()
    (detail,) = status.details
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info)
    return info


async def test_errors_carry_a_google_rpc_status(controller, fleet):
    async with secure_channel(controller.address, fleet.tls["user"], "controller") as ch:
        stub = controller_pb2_grpc.ControllerServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetContainer(controller_pb2.ContainerRef(name="nosuch"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "nosuch" in err.value.details()  # as before
        info = _error_info(err.value)
        assert (info.domain, info.reason) == ("corral", "NOT_FOUND")
        assert dict(info.metadata) == {"method": "GetContainer", "container": "nosuch"}
        assert error_info(err.value) == info
        # Corral's own client: the same error class as before.
        with pytest.raises(NotFound, match="nosuch"):
            await call(stub.GetContainer, controller_pb2.ContainerRef(name="nosuch"), timeout=5, peer="controller")

        with pytest.raises(grpc.aio.AioRpcError) as err:  # refused by the edge, before any servicer
            await stub.GetContainer(controller_pb2.ContainerRef(name="../x"), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (_error_info(err.value).reason, dict(_error_info(err.value).metadata)) == ("INVALID_ARGUMENT", {"method": "GetContainer"})

    async with secure_channel(controller.address, fleet.tls["agent"], "controller") as ch:
        stub = controller_pb2_grpc.ControllerServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ListContainers(controller_pb2.ListContainersRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and _error_info(err.value).reason == "PERMISSION_DENIED"
        with pytest.raises(PermissionDenied):
            await call(stub.ListContainers, controller_pb2.ListContainersRequest(), timeout=5, peer="controller")


async def test_a_call_without_details_still_maps_by_code(fleet):
    """gRPC's own failures (here UNIMPLEMENTED past the guard) carry no Corral details."""
    server, address = _agent_server(fleet)
    await server.start()
    try:
        async with secure_channel(address, fleet.tls["controller"], "n1", "agent") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await agent_pb2_grpc.AgentServiceStub(ch).GetNodeFacts(agent_pb2.GetNodeFactsRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED and error_info(err.value) is None
    finally:
        await server.stop(None)


# -- the tables --------------------------------------------------------------------------------


def test_the_standard_services_have_checked_tables():
    for policy in (AGENT_POLICY, CONTROLLER_POLICY):
        policy.check()
        for table in policy.standard:
            assert {m.name for m in table.service.methods} == set(table.rules)
            assert all(rule.roles == {"user", "agent", "controller"} and not rule.mutates for rule in table.rules.values())
    # A method the table lacks (as a newer grpcio might add) stops start-up, like any other.
    rules = {k: v for k, v in HEALTH.rules.items() if k != "List"}
    policy = dataclasses.replace(AGENT_POLICY, standard=(dataclasses.replace(HEALTH, rules=rules), *AGENT_POLICY.standard[1:]))
    with pytest.raises(AccessTableError, match="grpc.health.v1.Health: List has no rule"):
        make_server(policy)


async def test_standard_services_need_their_tables():
    """Without the tables, the guard would refuse every health call: refused at start-up instead."""
    bare = dataclasses.replace(AGENT_POLICY, standard=())
    with pytest.raises(AccessTableError, match="no table for grpc.health.v1.Health"):
        await add_standard_services(make_server(bare), bare)
