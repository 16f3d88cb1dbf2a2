"""Mutual-TLS credentials for every gRPC server and channel (no plaintext mode)."""

from __future__ import annotations

import grpc

from corral.config import TlsFiles

# Keepalives notice a dead peer (a crashed host) within seconds, not minutes.
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]
SERVER_OPTIONS = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    ca, cert, key = tls.read()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


def channel_credentials(tls: TlsFiles) -> grpc.ChannelCredentials:
    ca, cert, key = tls.read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def secure_channel(address: str, tls: TlsFiles, server_name: str | None = None) -> grpc.aio.Channel:
    options = list(CHANNEL_OPTIONS)
    if server_name:
        # Verify the peer by its fleet name (CN/SAN) rather than the address dialled.
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.aio.secure_channel(address, channel_credentials(tls), options=options)
