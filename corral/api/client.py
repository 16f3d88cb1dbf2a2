"""The client side of the gRPC edge: calls with deadlines, errors as CorralError."""

from __future__ import annotations

from typing import Any, Awaitable, Callable

import grpc

from corral.errors import CorralError, DeadlineExceeded, Unavailable, from_grpc_code

ERROR_MARK = "corral-error"  # see corral.api.server


async def call(rpc: Callable[..., Awaitable[Any]], request: Any, *, timeout: float, peer: str) -> Any:
    """One unary call with a deadline; a gRPC failure comes back as our own error."""
    try:
        return await rpc(request, timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        raise rpc_error(exc, peer) from None


def rpc_error(exc: grpc.aio.AioRpcError, peer: str) -> CorralError:
    code, details = exc.code(), exc.details() or ""
    metadata = exc.trailing_metadata() or ()
    kind = next((value for key, value in metadata if key == ERROR_MARK), None)
    if kind is not None:
        return from_grpc_code(code, details, str(kind))  # the peer's own error, passed on as it said it
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"cannot reach {peer}: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"{peer} did not answer in time")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # a message too large, or the server's call limit
        return from_grpc_code(code, f"the call to {peer} hit a gRPC limit: {details}")
    return from_grpc_code(code, details)
