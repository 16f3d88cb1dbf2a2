"""Mutual TLS everywhere: strangers, plaintext and the wrong roles are refused."""

import grpc
import pytest

from corral import pki
from corral.api.tls import secure_channel
from corral.config import TlsFiles
from corral.v1 import agent_pb2, agent_pb2_grpc, controller_pb2, controller_pb2_grpc, types_pb2


def _tls(pki_dir, role, name):
    return TlsFiles(ca=pki_dir / "ca.crt", cert=pki_dir / f"{role}-{name}.crt", key=pki_dir / f"{role}-{name}.key")


async def _list_containers(channel):
    stub = controller_pb2_grpc.ControllerServiceStub(channel)
    return await stub.ListContainers(controller_pb2.ListContainersRequest(), timeout=10)


async def test_fleet_user_is_served(lab):
    async with secure_channel(lab.controller_address, _tls(lab.pki_dir, "user", "admin"), "controller") as ch:
        await _list_containers(ch)


async def test_certificate_from_another_ca_is_refused(lab, tmp_path):
    rogue = tmp_path / "rogue"
    pki.init_ca(rogue, "Rogue CA")
    pki.issue(rogue, "user", "admin")
    # The rogue client trusts the real CA (so it can verify the server) but presents a rogue certificate.
    tls = TlsFiles(ca=lab.pki_dir / "ca.crt", cert=rogue / "user-admin.crt", key=rogue / "user-admin.key")
    async with secure_channel(lab.controller_address, tls, "controller") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _list_containers(ch)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_client_without_certificate_is_refused(lab):
    creds = grpc.ssl_channel_credentials(root_certificates=(lab.pki_dir / "ca.crt").read_bytes())
    options = [("grpc.ssl_target_name_override", pki.server_name("controller", "controller"))]
    async with grpc.aio.secure_channel(lab.controller_address, creds, options=options) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _list_containers(ch)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_plaintext_client_is_refused(lab):
    async with grpc.aio.insecure_channel(lab.controller_address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _list_containers(ch)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    agent = lab.hosts[0].agent_address
    async with grpc.aio.insecure_channel(agent) as ch:
        with pytest.raises(grpc.aio.AioRpcError):
            await agent_pb2_grpc.AgentServiceStub(ch).ListContainers(agent_pb2.AgentListContainersRequest(), timeout=10)


async def test_users_cannot_drive_agents_directly(lab):
    host = lab.hosts[0]
    async with secure_channel(host.agent_address, _tls(lab.pki_dir, "user", "admin"), host.node) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await agent_pb2_grpc.AgentServiceStub(ch).ListContainers(agent_pb2.AgentListContainersRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_agents_cannot_use_the_fleet_api_or_speak_for_other_nodes(lab):
    async with secure_channel(lab.controller_address, _tls(lab.pki_dir, "agent", "n1"), "controller") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _list_containers(ch)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        stub = controller_pb2_grpc.ControllerServiceStub(ch)
        forged = controller_pb2.HeartbeatRequest(node="n2", facts=types_pb2.NodeFacts(name="n2", address="1.2.3.4:1"))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Heartbeat(forged, timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_user_certificate_cannot_pose_as_a_server(lab, tmp_path):
    """The lab's certificates: a user's is for calling only (clientAuth, no SAN); the servers'
    carry their role-qualified name, which clients check. So the lab's own user certificate
    cannot serve as the controller (review M5)."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from corral.api.server import make_server
    from corral.api.tls import server_credentials
    from controller.service import CONTROLLER_POLICY

    def load(role, name):
        return x509.load_pem_x509_certificate((lab.pki_dir / f"{role}-{name}.crt").read_bytes())

    user = load("user", "admin")
    assert list(user.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(x509.ExtensionNotFound):
        user.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    for role, name in [("controller", "controller"), *[("agent", h.node) for h in lab.hosts]]:
        sans = load(role, name).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert pki.server_name(role, name) in sans.get_values_for_type(x509.DNSName)

    server = make_server(CONTROLLER_POLICY)
    controller_pb2_grpc.add_ControllerServiceServicer_to_server(controller_pb2_grpc.ControllerServiceServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(_tls(lab.pki_dir, "user", "admin")))
    await server.start()
    try:
        async with secure_channel(f"127.0.0.1:{port}", _tls(lab.pki_dir, "user", "admin"), "controller") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _list_containers(ch)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)


def test_one_time_tls_trusts_exactly_its_two_peers(tmp_path):
    """A post-copy page server's certificates: the server is named by its address, the client
    and the server are signed by a CA made for them alone (its key is not kept), and a fleet
    certificate does not verify against it."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    from corral.errors import InvalidArgument

    t = pki.one_time_tls("10.1.2.3", datetime.timedelta(hours=2), "pages of op1")
    ca = x509.load_pem_x509_certificate(t.ca_pem)
    server = x509.load_pem_x509_certificate(t.server_cert_pem)
    client = x509.load_pem_x509_certificate(t.client_cert_pem)
    for leaf in (server, client):
        leaf.verify_directly_issued_by(ca)
        assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= datetime.timedelta(hours=2, minutes=6)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("10.1.2.3") in sans.get_values_for_type(x509.IPAddress)
    assert "PRIVATE KEY" in t.client_key_pem.decode() and "OneTimeTls(...)" == repr(t)

    pki.init_ca(tmp_path)
    fleet = x509.load_pem_x509_certificate(pki.issue(tmp_path, "agent", "n3").cert.read_bytes())
    with pytest.raises(ValueError):  # another issuer
        fleet.verify_directly_issued_by(ca)
    other = pki.one_time_tls("10.1.2.3", datetime.timedelta(hours=2), "pages of op2")
    assert other.ca_pem != t.ca_pem and isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    with pytest.raises(InvalidArgument):
        pki.one_time_tls("node1.example", datetime.timedelta(hours=1), "x")
