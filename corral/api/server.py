"""The server side of the gRPC edge: who is calling, may they, and errors.

`GuardInterceptor` wraps every handler once: it reads the caller's identity
from its client certificate (role in OU, name in CN), refuses roles the method
does not allow, and turns `CorralError` into the matching gRPC status. The
servicers stay thin and never deal with status codes themselves.
"""

from __future__ import annotations

import contextvars
import functools
from typing import Callable, Iterable

import grpc
import structlog

from corral.api.client import ERROR_MARK
from corral.errors import CorralError, PermissionDenied, Unauthenticated
from corral.pki import Identity, identity_from_pem

log = structlog.get_logger("corral.api")

current_identity: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("current_identity", default=None)

# Method name (the last part of the gRPC path) -> roles allowed to call it.
Policy = Callable[[str], Iterable[str]]


@functools.lru_cache(maxsize=1024)
def _identity_cached(pem: bytes) -> Identity:
    return identity_from_pem(pem)


def peer_identity(context: grpc.aio.ServicerContext) -> Identity:
    certs = context.auth_context().get("x509_pem_cert")
    if not certs:
        raise Unauthenticated("no client certificate presented")
    return _identity_cached(certs[0])


class GuardInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, policy: Policy) -> None:
        self._policy = policy

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        allowed = frozenset(self._policy(method))

        async def authorize(context) -> None:
            identity = peer_identity(context)
            if identity.role not in allowed:
                raise PermissionDenied(
                    f"{identity.role} {identity.name!r} may not call {method} "
                    f"(allowed: {', '.join(sorted(allowed)) or 'nobody'})"
                )
            current_identity.set(identity)

        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary(request, context):
                try:
                    await authorize(context)
                    return await inner(request, context)
                except CorralError as exc:
                    await _abort(context, method, exc)

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
            )
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            async def stream(request, context):
                try:
                    await authorize(context)
                    async for item in inner_stream(request, context):
                        yield item
                except CorralError as exc:
                    await _abort(context, method, exc)

            return grpc.unary_stream_rpc_method_handler(
                stream, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
            )
        return handler


# Trailing metadata marking an error raised by Corral itself (not by the transport),
# so a client does not mistake "the controller could not reach an agent" for
# "the client could not reach the controller".
async def _abort(context, method: str, exc: CorralError) -> None:
    log.info("request refused", method=method, code=exc.grpc_code.name, error=exc.message)
    await context.abort(exc.grpc_code, exc.message, trailing_metadata=((ERROR_MARK, type(exc).__name__),))


def make_server(policy: Policy) -> grpc.aio.Server:
    from corral.api.tls import SERVER_OPTIONS

    return grpc.aio.server(interceptors=[GuardInterceptor(policy)], options=SERVER_OPTIONS)
