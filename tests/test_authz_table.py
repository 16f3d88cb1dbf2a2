"""The API edge's guards on real in-process gRPC servers (no lab): every RPC of both services
against every kind of certificate, deny by default, all handler kinds wrapped, names checked
before a servicer runs, calls that change something logged with their caller, servers
checked by role, and the listeners' call limit."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from agent.service import AGENT_POLICY
from controller.service import CONTROLLER_POLICY
from corral import pki
from corral.api import server as edge
from corral.api.client import call
from corral.api.server import AccessTableError, ServicePolicy, container, make_server, reads, writes
from corral.api.tls import secure_channel, server_credentials
from corral.config import TlsFiles
from corral.errors import InvalidArgument, LimitExceeded, NoCapacity, from_grpc_code
from corral.v1 import agent_pb2, agent_pb2_grpc, controller_pb2, controller_pb2_grpc, types_pb2

REFUSED = {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED}
CALLERS = ("user", "agent", "controller", "foreign")  # foreign: a user certificate from another CA
# Who may call what, written out independently of the tables they check.
EXPECTED = {
    "AgentService": lambda method: {"controller"},
    "ControllerService": lambda method: {"agent"} if method in ("RegisterNode", "Heartbeat") else {"user"},
}


@dataclasses.dataclass
class Fleet:
    pki_dir: Path
    tls: dict[str, TlsFiles]  # by caller

    def server(self, role: str, name: str) -> TlsFiles:
        return _tls(self.pki_dir, role, name)


def _tls(pki_dir: Path, role: str, name: str) -> TlsFiles:
    return TlsFiles(ca=pki_dir / "ca.crt", cert=pki_dir / f"{role}-{name}.crt", key=pki_dir / f"{role}-{name}.key")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Fleet:
    d = tmp_path_factory.mktemp("pki")
    pki.init_ca(d)
    pki.issue(d, "controller", "controller", hosts=["127.0.0.1"])
    pki.issue(d, "agent", "n1")
    pki.issue(d, "agent", "n2")
    pki.issue(d, "user", "admin")
    foreign = tmp_path_factory.mktemp("foreign")
    pki.init_ca(foreign, "Foreign CA")
    pki.issue(foreign, "user", "admin")
    tls = {"user": _tls(d, "user", "admin"), "agent": _tls(d, "agent", "n1"),
           "controller": _tls(d, "controller", "controller"),
           # trusts the fleet's CA (so it can check the server), presents the foreign certificate
           "foreign": TlsFiles(ca=d / "ca.crt", cert=foreign / "user-admin.crt", key=foreign / "user-admin.key")}  # fmt: skip
    return Fleet(d, tls)


class _Serving:
    """A real gRPC server on a free local port; `add` registers the servicer."""

    def __init__(self, policy: ServicePolicy, add, tls: TlsFiles) -> None:
        self.server = make_server(policy)
        add(self.server)
        self.port = self.server.add_secure_port("127.0.0.1:0", server_credentials(tls))
        self.address = f"127.0.0.1:{self.port}"

    async def __aenter__(self) -> "_Serving":
        await self.server.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.server.stop(None)


def _agent_server(fleet: Fleet, servicer=None, policy: ServicePolicy = AGENT_POLICY) -> _Serving:
    servicer = servicer or agent_pb2_grpc.AgentServiceServicer()  # generated: every method UNIMPLEMENTED
    return _Serving(policy, lambda s: agent_pb2_grpc.add_AgentServiceServicer_to_server(servicer, s),
                    fleet.server("agent", "n1"))  # fmt: skip


def _controller_server(fleet: Fleet) -> _Serving:
    servicer = controller_pb2_grpc.ControllerServiceServicer()
    return _Serving(CONTROLLER_POLICY, lambda s: controller_pb2_grpc.add_ControllerServiceServicer_to_server(servicer, s),
                    fleet.server("controller", "controller"))  # fmt: skip


_VALID = {"container": "web", "node": "n1", "operation": "mig-20261201000000-abc123"}


def _request(policy: ServicePolicy, method, **overrides):
    """A request to `method` whose named fields are all valid (or as overridden, by path)."""
    request = message_factory.GetMessageClass(method.input_type)()
    for field in policy.rules[method.name].fields:
        _set(request, field.path, overrides.get(field.path, _VALID[field.kind]))
    return request


def _set(message, path: str, value: str) -> None:
    *parents, last = path.split(".")
    for part in parents:
        message = getattr(message, part)
    setattr(message, last, value)


async def _invoke(channel: grpc.aio.Channel, service, method, request) -> grpc.StatusCode:
    """Call `method` of any kind with one request; the status it ended with. A call the
    transport broke (INTERNAL, seen once in CI on a loaded machine after a GOAWAY from the
    server) is made once more: no check here expects INTERNAL, so the retry can only replace
    a transport failure by the answer under test."""
    code = await _invoke_once(channel, service, method, request)
    if code == grpc.StatusCode.INTERNAL:
        code = await _invoke_once(channel, service, method, request)
    return code


async def _invoke_once(channel: grpc.aio.Channel, service, method, request) -> grpc.StatusCode:
    path = f"/{service.full_name}/{method.name}"
    codec = dict(request_serializer=lambda m: m.SerializeToString(),
                 response_deserializer=message_factory.GetMessageClass(method.output_type).FromString)  # fmt: skip

    async def one():
        yield request

    try:
        if method.client_streaming and method.server_streaming:
            async for _ in channel.stream_stream(path, **codec)(one(), timeout=5):
                pass
        elif method.client_streaming:
            await channel.stream_unary(path, **codec)(one(), timeout=5)
        elif method.server_streaming:
            async for _ in channel.unary_stream(path, **codec)(request, timeout=5):
                pass
        else:
            await channel.unary_unary(path, **codec)(request, timeout=5)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("policy, serve", [(AGENT_POLICY, _agent_server), (CONTROLLER_POLICY, _controller_server)],
                         ids=["agent", "controller"])  # fmt: skip
async def test_every_rpc_against_every_certificate(fleet, policy, serve):
    service = policy.service
    expected = EXPECTED[service.name]
    assert {m: set(r.roles) for m, r in policy.rules.items()} == {m.name: expected(m.name) for m in service.methods}
    server_role, server_name = ("agent", "n1") if service.name == "AgentService" else ("controller", "controller")
    async with serve(fleet) as srv:
        for caller in CALLERS:
            async with secure_channel(srv.address, fleet.tls[caller], server_name, server_role) as channel:
                for method in service.methods:
                    code = await _invoke(channel, service, method, _request(policy, method))
                    if caller in expected(method.name):
                        # Past the guard: the generated servicer answers UNIMPLEMENTED.
                        assert code == grpc.StatusCode.UNIMPLEMENTED, (caller, method.name, code)
                    elif caller == "foreign":
                        assert code == grpc.StatusCode.UNAVAILABLE, (caller, method.name, code)  # TLS refused it
                    else:
                        assert code in REFUSED, (caller, method.name, code)


def test_tables_cover_their_services_exactly():
    for policy in (AGENT_POLICY, CONTROLLER_POLICY):
        policy.check()
        assert {m.name for m in policy.service.methods} == set(policy.rules)


def test_a_method_missing_from_the_table_stops_start_up():
    rules = dict(AGENT_POLICY.rules)
    del rules["ReleaseContainer"]
    with pytest.raises(AccessTableError, match="ReleaseContainer has no rule"):
        make_server(dataclasses.replace(AGENT_POLICY, rules=rules))
    rules = {**AGENT_POLICY.rules, "FormatDisk": writes(("controller",))}
    with pytest.raises(AccessTableError, match="FormatDisk is not a method"):
        make_server(dataclasses.replace(AGENT_POLICY, rules=rules))
    rules = {**AGENT_POLICY.rules, "ReleaseContainer": writes(("controller",), container("nmae"))}
    with pytest.raises(AccessTableError, match="no field 'nmae'"):
        make_server(dataclasses.replace(AGENT_POLICY, rules=rules))


async def test_a_method_outside_the_table_is_refused_to_everyone(fleet):
    """Deny by default: a servicer registered beside the table's service gets no pass."""
    rules = {**AGENT_POLICY.rules}
    del rules["GetNodeFacts"]
    policy = dataclasses.replace(AGENT_POLICY, rules=rules)
    guard = edge.GuardInterceptor(policy)  # the interceptor alone (make_server would refuse this table)
    server = grpc.aio.server(interceptors=[guard])
    agent_pb2_grpc.add_AgentServiceServicer_to_server(agent_pb2_grpc.AgentServiceServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(fleet.server("agent", "n1")))
    await server.start()
    try:
        async with secure_channel(f"127.0.0.1:{port}", fleet.tls["controller"], "n1", "agent") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await agent_pb2_grpc.AgentServiceStub(ch).GetNodeFacts(agent_pb2.GetNodeFactsRequest(), timeout=5)
    finally:
        await server.stop(None)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "no access table" in err.value.details()


# -- streaming requests: a service of its own, made here from a descriptor ----------------------


def _streams_service():
    f = descriptor_pb2.FileDescriptorProto(name="corral_test_streams.proto", package="corraltest", syntax="proto3")
    msg = f.message_type.add(name="Item")
    msg.field.add(name="name", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                  label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)  # fmt: skip
    svc = f.service.add(name="Streams")
    for name, client, server in (("Up", True, False), ("Both", True, True), ("BothWriting", True, True),
                                 ("DownWriting", False, True)):  # fmt: skip
        svc.method.add(name=name, input_type=".corraltest.Item", output_type=".corraltest.Item",
                       client_streaming=client, server_streaming=server)  # fmt: skip
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return pool.FindServiceByName("corraltest.Streams"), message_factory.GetMessageClass(pool.FindMessageTypeByName("corraltest.Item"))


STREAMS, ITEM = _streams_service()


async def test_stream_request_handlers_are_guarded(fleet):
    """Client-streaming and bidirectional handlers get the same checks: role, the first
    message's names, the log of a change (repro 02: they used to pass through unchecked)."""
    policy = ServicePolicy(STREAMS, {
        "Up": writes(("controller",), container()), "Both": reads(("controller",), container()),
        "BothWriting": reads(("controller",), container()), "DownWriting": reads(("controller",), container()),
    })  # fmt: skip
    seen: list[str] = []

    async def up(requests, context):
        async for r in requests:
            seen.append(r.name)
        return ITEM(name="up")

    async def both(requests, context):
        async for r in requests:
            seen.append(r.name)
            yield ITEM(name=r.name)

    async def both_writing(requests, context):
        async for r in requests:
            seen.append(r.name)
            await context.write(ITEM(name=r.name))

    async def down_writing(request, context):
        seen.append(request.name)
        await context.write(ITEM(name=request.name))

    codec = dict(request_deserializer=ITEM.FromString, response_serializer=ITEM.SerializeToString)
    handlers = {"Up": grpc.stream_unary_rpc_method_handler(up, **codec),
                "Both": grpc.stream_stream_rpc_method_handler(both, **codec),
                "BothWriting": grpc.stream_stream_rpc_method_handler(both_writing, **codec),
                "DownWriting": grpc.unary_stream_rpc_method_handler(down_writing, **codec)}  # fmt: skip

    # The interceptor never hands back a handler as it came.
    for name, handler in handlers.items():
        class Details:
            method = f"/corraltest.Streams/{name}"

        async def same(details, handler=handler):
            return handler

        assert await edge.GuardInterceptor(policy).intercept_service(same, Details()) is not handler

    srv = _Serving(policy, lambda s: s.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("corraltest.Streams", handlers),)),
                   fleet.server("agent", "n1"))  # fmt: skip
    async with srv:
        for method in STREAMS.methods:
            async with secure_channel(srv.address, fleet.tls["user"], "n1", "agent") as ch:
                assert await _invoke(ch, STREAMS, method, ITEM(name="web")) == grpc.StatusCode.PERMISSION_DENIED
            async with secure_channel(srv.address, fleet.tls["controller"], "n1", "agent") as ch:
                assert await _invoke(ch, STREAMS, method, ITEM(name="../etc")) == grpc.StatusCode.INVALID_ARGUMENT
                assert await _invoke(ch, STREAMS, method, ITEM(name="web")) == grpc.StatusCode.OK, method.name
    assert seen == ["web"] * 4  # refused calls reached nothing


# -- names at the agent's edge (review M2, M3) -------------------------------------------------


def _agent_servicer(root: Path):
    """The real AgentServicer over a real ContainerManager and Migrations in a scratch directory."""
    from agent.containers import ContainerManager
    from agent.migration import Migrations
    from agent.records import RecordStore
    from agent.runtime.cgroups import CgroupLayout
    from agent.runtime.checkpoint import Checkpointer
    from agent.runtime.lxc import LxcRuntime
    from agent.service import AgentServicer
    from agent.storage.dir import DirStorage
    from agent.transfer.grants import GrantRegistry

    for d in ("lxc", "state", "storage"):
        (root / d).mkdir(parents=True, exist_ok=True)
    cm = ContainerManager(node="n1", runtime=LxcRuntime(root / "lxc"), storages={"dir": DirStorage(root / "storage")},
                          records=RecordStore(root / "state"), bridge="br0", template_cache=root / "tc",
                          cgroups=CgroupLayout(v1=False))  # fmt: skip
    migrations = Migrations(cm, None, GrantRegistry(root / "state" / "staging"), Checkpointer(root / "lxc"), root / "state")
    return AgentServicer(cm, None, migrations)


async def test_agent_refuses_bad_names_before_touching_anything(fleet, tmp_path):
    """ReleaseContainer('../victim') used to rmtree a directory beside the LXC path (repro 03)."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "config").write_text("x")
    async with _agent_server(fleet, _agent_servicer(tmp_path)) as srv:
        async with secure_channel(srv.address, fleet.tls["controller"], "n1", "agent") as ch:
            stub = agent_pb2_grpc.AgentServiceStub(ch)
            for request, rpc in [
                (agent_pb2.ReleaseContainerRequest(op_id="op1", name="../victim"), stub.ReleaseContainer),
                (agent_pb2.ReleaseContainerRequest(op_id="../x", name="web"), stub.ReleaseContainer),
                (agent_pb2.RestoreRequest(op_id="op1", container="../victim", source=agent_pb2.RESTORE_SOURCE_LOCAL), stub.Restore),
                (agent_pb2.AdoptContainerRequest(op_id="op1", container=types_pb2.Container(name="../../victim")), stub.AdoptContainer),
                (agent_pb2.VolumeRequest(op_id="op1", name="../victim"), stub.DetachVolume),
                (agent_pb2.AgentStartContainerRequest(name="web\n"), stub.StartContainer),
                (agent_pb2.AgentCreateContainerRequest(name="web\n", template="busybox"), stub.CreateContainer),
            ]:  # fmt: skip
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await rpc(request, timeout=5)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (request, err.value.details())
    assert (victim / "config").exists()
    assert not any((tmp_path / "storage").iterdir()) and not any((tmp_path / "lxc").iterdir())


async def test_controller_refuses_a_name_with_a_newline(fleet):
    async with _controller_server(fleet) as srv:
        async with secure_channel(srv.address, fleet.tls["user"], "controller", "controller") as ch:
            service = CONTROLLER_POLICY.service
            method = service.methods_by_name["CreateContainer"]
            bad = _request(CONTROLLER_POLICY, method, name="web\n")
            assert await _invoke(ch, service, method, bad) == grpc.StatusCode.INVALID_ARGUMENT
            method = service.methods_by_name["MigrateContainer"]
            bad = _request(CONTROLLER_POLICY, method, target_node="../n2")
            assert await _invoke(ch, service, method, bad) == grpc.StatusCode.INVALID_ARGUMENT


# -- the log of changes ------------------------------------------------------------------------


class _Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def info(self, event: str, **kw) -> None:
        self.events.append((event, kw))


async def test_changes_are_logged_with_their_caller(fleet, monkeypatch):
    recorder = _Recorder()
    monkeypatch.setattr(edge, "log", recorder)
    async with _agent_server(fleet) as srv:
        async with secure_channel(srv.address, fleet.tls["controller"], "n1", "agent") as ch:
            stub = agent_pb2_grpc.AgentServiceStub(ch)
            for rpc, request in [(stub.GetContainer, agent_pb2.AgentContainerRef(name="web")),
                                 (stub.StopContainer, agent_pb2.AgentStopContainerRequest(name="web", force=True))]:  # fmt: skip
                with pytest.raises(grpc.aio.AioRpcError):
                    await rpc(request, timeout=5)  # UNIMPLEMENTED: past the guard
    calls = [kw for event, kw in recorder.events if event == "mutating call"]
    assert len(calls) == 1, recorder.events  # the read is not logged
    assert calls[0]["method"] == "StopContainer" and calls[0]["role"] == "controller"
    assert calls[0]["caller"] == "controller" and calls[0]["container"] == "web" and calls[0]["peer"]


# -- servers are checked by role (review M5) ---------------------------------------------------


def _old_style_user_cert(pki_dir: Path, name: str) -> TlsFiles:
    """A user certificate as issuance made them before: SAN = its name, serverAuth too."""
    ca_cert, ca_key = pki._load_ca(pki_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "user")])  # fmt: skip
    cert = pki._build_leaf(ca_cert, ca_key, key, subject, [x509.DNSName(name)], datetime.timedelta(days=1))
    out = pki_dir / f"forged-{name}"
    out.mkdir()
    (out / "c.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / "c.key").write_bytes(pki._key_pem(key))
    return TlsFiles(ca=pki_dir / "ca.crt", cert=out / "c.crt", key=out / "c.key")


async def _reaches(address: str, tls: TlsFiles, server_name: str, role: str | None = None) -> bool:
    async with secure_channel(address, tls, server_name, role) as ch:
        try:
            await controller_pb2_grpc.ControllerServiceStub(ch).ListNodes(controller_pb2.ListNodesRequest(), timeout=5)
        except grpc.aio.AioRpcError as exc:
            return exc.code() != grpc.StatusCode.UNAVAILABLE
        return True


async def test_clients_check_the_servers_role(fleet, tmp_path):
    assert pki.issue(fleet.pki_dir, "user", "bob").cert.exists()
    with pytest.raises(InvalidArgument, match="controller's"):
        pki.issue(fleet.pki_dir, "user", "controller")
    with pytest.raises(InvalidArgument, match="controller's"):
        pki.issue(fleet.pki_dir, "agent", "controller")
    with pytest.raises(Exception, match="already a agent's"):
        pki.issue(fleet.pki_dir, "user", "n1")
    with pytest.raises(InvalidArgument, match="reserved"):
        pki.issue(fleet.pki_dir, "agent", "n3", hosts=[pki.server_name("controller", "controller")])

    def serving(tls: TlsFiles) -> _Serving:
        servicer = controller_pb2_grpc.ControllerServiceServicer()
        return _Serving(CONTROLLER_POLICY, lambda s: controller_pb2_grpc.add_ControllerServiceServicer_to_server(servicer, s), tls)

    forged = _old_style_user_cert(fleet.pki_dir, "controller")
    async with serving(forged) as srv:  # a user certificate named controller, as issuance used to allow
        assert not await _reaches(srv.address, fleet.tls["user"], "controller")
        assert not await _reaches(srv.address, fleet.tls["agent"], "controller", "controller")
    async with serving(fleet.server("user", "bob")) as srv:  # today's user certificates cannot serve at all
        assert not await _reaches(srv.address, fleet.tls["user"], "bob", "agent")
    async with serving(fleet.server("agent", "n2")) as srv:  # an agent is neither the controller nor another node
        assert not await _reaches(srv.address, fleet.tls["user"], "controller")
        assert not await _reaches(srv.address, fleet.tls["controller"], "n1", "agent")
        assert await _reaches(srv.address, fleet.tls["controller"], "n2", "agent")
    async with serving(fleet.server("controller", "controller")) as srv:
        assert await _reaches(srv.address, fleet.tls["user"], "controller")


# -- limits (review M10, L8) -------------------------------------------------------------------


async def test_calls_over_the_limit_are_refused_and_the_server_stays_up(fleet):
    release = asyncio.Event()
    started = 0

    class Slow(agent_pb2_grpc.AgentServiceServicer):
        async def GetNodeFacts(self, request, context):
            nonlocal started
            started += 1
            await release.wait()
            return types_pb2.NodeFacts(name="n1")

    async with _agent_server(fleet, Slow(), dataclasses.replace(AGENT_POLICY, max_concurrent_rpcs=2)) as srv:
        async with secure_channel(srv.address, fleet.tls["controller"], "n1", "agent") as ch:
            stub = agent_pb2_grpc.AgentServiceStub(ch)
            held = [asyncio.ensure_future(stub.GetNodeFacts(agent_pb2.GetNodeFactsRequest(), timeout=10)) for _ in range(2)]
            async with asyncio.timeout(5):
                while started < 2:
                    await asyncio.sleep(0.01)
            with pytest.raises(LimitExceeded, match="gRPC limit") as err:  # not "no capacity"
                await call(stub.GetNodeFacts, agent_pb2.GetNodeFactsRequest(), timeout=5, peer="agent n1")
            assert not isinstance(err.value, NoCapacity)
            release.set()
            assert [f.name for f in await asyncio.gather(*held)] == ["n1", "n1"]
            assert (await stub.GetNodeFacts(agent_pb2.GetNodeFactsRequest(), timeout=5)).name == "n1"


def test_resource_exhausted_is_no_capacity_only_when_placement_says_so():
    assert isinstance(from_grpc_code(grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max"), LimitExceeded)
    assert isinstance(from_grpc_code(grpc.StatusCode.RESOURCE_EXHAUSTED, "x", "LimitExceeded"), LimitExceeded)
    assert isinstance(from_grpc_code(grpc.StatusCode.RESOURCE_EXHAUSTED, "no node fits", "NoCapacity"), NoCapacity)


async def test_connections_over_the_cap_are_refused(fleet):
    """Each channel here has a connection of its own (a local subchannel pool); the second finds
    the server at its cap, the first keeps working."""
    from corral.api.tls import channel_credentials

    def channel(i: int) -> grpc.aio.Channel:
        options = [("grpc.ssl_target_name_override", pki.server_name("agent", "n1")),
                   ("grpc.use_local_subchannel_pool", 1), ("corral.test.channel", i)]  # fmt: skip
        return grpc.aio.secure_channel(srv.address, channel_credentials(fleet.tls["controller"]), options=options)

    async with _agent_server(fleet, policy=dataclasses.replace(AGENT_POLICY, max_connections=1)) as srv:
        async with channel(1) as first, channel(2) as second:
            codes = []
            for ch in (first, second, first):
                try:
                    await agent_pb2_grpc.AgentServiceStub(ch).GetNodeFacts(agent_pb2.GetNodeFactsRequest(), timeout=5)
                except grpc.aio.AioRpcError as exc:
                    codes.append(exc.code())
    assert codes == [grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNIMPLEMENTED]
