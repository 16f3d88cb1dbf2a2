"""gRPC's standard services on every Corral server: health checking and reflection.

They answer on the server's own mTLS port, so `grpcurl` and health probes work as with any
gRPC server (README, Calling the API), to any certificate of the fleet: a user, the
controller, an agent (`FLEET_ROLES`). Like every service they are guarded by tables
(`STANDARD_TABLES`), which a server's `ServicePolicy.standard` lists and `make_server`
checks against the services' descriptors: a method a newer grpcio adds is refused to
everyone and stops start-up until it has a rule. A client without a certificate of the
fleet's CA is refused by the TLS handshake, as for every other call.

Health (grpc.health.v1.Health): the whole server ("") and its Corral service
(corral.v1.ControllerService or corral.v1.AgentService) are NOT_SERVING from start-up
until `serving()`, SERVING then, and NOT_SERVING for good once `stopping()` (the server's
grace period). The controller calls `serving()` once its store is open and its server and
operations engine have started; an agent once its gRPC server is up, before it has
registered with the controller (the controller's node list says whether it has: an agent
the controller cannot reach is still serving those who can).

Reflection: grpc.reflection.v1alpha (the grpcio-reflection package) and grpc.reflection.v1
(the same messages under v1's name, which newer clients ask first) list the server's
services and resolve their descriptors.
"""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from corral.api.server import AccessTable, AccessTableError, ServicePolicy, reads
from corral.pki import ROLES

FLEET_ROLES = ROLES  # every certificate of the fleet: user, controller, agent

_V1ALPHA = "grpc.reflection.v1alpha"
_V1 = "grpc.reflection.v1"


def _reflection_v1() -> FileDescriptor:
    """grpc/reflection/v1/reflection.proto: v1alpha's file under v1's package (the two differ in
    nothing else on the wire), added to the default pool unless something already has."""
    pool = descriptor_pool.Default()
    name = "grpc/reflection/v1/reflection.proto"
    try:
        return pool.FindFileByName(name)
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name, proto.package = name, _V1
    proto.ClearField("options")

    def renamed(type_name: str) -> str:
        return type_name.replace(f".{_V1ALPHA}.", f".{_V1}.")

    for message in proto.message_type:  # reflection.proto nests none
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = renamed(field.type_name)
    for method in proto.service[0].method:
        method.input_type, method.output_type = renamed(method.input_type), renamed(method.output_type)
    pool.Add(proto)
    return pool.FindFileByName(name)


_ANY = reads(FLEET_ROLES)
HEALTH = AccessTable(health_pb2.DESCRIPTOR.services_by_name["Health"], {"Check": _ANY, "Watch": _ANY, "List": _ANY})
REFLECTION_V1ALPHA = AccessTable(reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"], {"ServerReflectionInfo": _ANY})
REFLECTION_V1 = AccessTable(_reflection_v1().services_by_name["ServerReflection"], {"ServerReflectionInfo": _ANY})
STANDARD_TABLES = (HEALTH, REFLECTION_V1ALPHA, REFLECTION_V1)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class StandardServices:
    """Health and reflection on one server (`add_standard_services`)."""

    def __init__(self, policy: ServicePolicy) -> None:
        self.health = health.aio.HealthServicer()
        self.services = ("", policy.service.full_name)  # the statuses it keeps

    async def serving(self) -> None:
        for service in self.services:
            await self.health.set(service, SERVING)

    async def stopping(self) -> None:
        """NOT_SERVING from now on, whatever is set later."""
        await self.health.enter_graceful_shutdown()


async def add_standard_services(server: grpc.aio.Server, policy: ServicePolicy) -> StandardServices:
    """Add health (NOT_SERVING until `serving()`) and reflection to `server`, made by
    `make_server(policy)`; refused unless the policy has the standard services' tables."""
    missing = [t.service.full_name for t in STANDARD_TABLES if t not in policy.standard]
    if missing:
        raise AccessTableError(f"{policy.service.full_name}'s policy has no table for {', '.join(missing)}")
    standard = StandardServices(policy)
    for service in standard.services:
        await standard.health.set(service, NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(standard.health, server)
    names = (policy.service.full_name, *(t.service.full_name for t in STANDARD_TABLES))
    reflecting = reflection.aio.ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflecting, server)
    # v1: the same servicer and messages (identical on the wire) under v1's service name.
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(f"{_V1}.ServerReflection", {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            reflecting.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString),
    }),))  # fmt: skip
    return standard

