"""Mutual-TLS credentials for every gRPC server and channel (no plaintext mode).

A channel checks the server's role and name, not only that the fleet CA signed it: it
verifies the role-qualified name `pki.server_name(role, name)`, which only a certificate
issued to that role and name carries (gRPC Python has no hook to inspect the server's
certificate, so the TLS name check does it). Servers get limits on connections, their
age and idleness, handshakes and concurrent calls.
"""

from __future__ import annotations

import grpc

from corral import pki
from corral.config import TlsFiles

# Keepalives notice a dead peer (a crashed host) within seconds, not minutes.
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # A peer that restarts (an agent after a power cut) is dialled again within a second, not
    # after gRPC's default back-off of up to two minutes.
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]
SERVER_OPTIONS = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # A peer that has not finished its TLS handshake in 10 s is dropped (gRPC's default: 120 s).
    ("grpc.server_handshake_timeout_ms", 10_000),
    # A connection with no call for 10 minutes is closed (its client reconnects when it next
    # calls); after an hour it takes no new calls, so a peer proves its certificate again.
    # Calls in flight always finish (the grace is unlimited: an exec may run a day).
    ("grpc.max_connection_idle_ms", 10 * 60_000),
    ("grpc.max_connection_age_ms", 60 * 60_000),
    # Calls open at once on one connection; a client queues the rest.
    ("grpc.max_concurrent_streams", 256),
]


def server_options(max_connections: int) -> list[tuple[str, int]]:
    """SERVER_OPTIONS with a cap on open connections (checked before the handshake), so
    strangers cannot use up the process's file descriptors."""
    return [*SERVER_OPTIONS, ("grpc.max_allowed_incoming_connections", max_connections)]


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    ca, cert, key = tls.read()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


def channel_credentials(tls: TlsFiles) -> grpc.ChannelCredentials:
    ca, cert, key = tls.read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def secure_channel(address: str, tls: TlsFiles, server_name: str, role: str | None = None) -> grpc.aio.Channel:
    """A channel to the fleet server `server_name` of `role` ("controller" or "agent"; by default
    the controller when the name is `controller`, which no agent may take, else an agent).
    The server must prove both with its certificate, whatever the address dialled."""
    if role is None:
        role = "controller" if server_name == pki.CONTROLLER_NAME else "agent"
    options = [*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", pki.server_name(role, server_name))]
    return grpc.aio.secure_channel(address, channel_credentials(tls), options=options)
