"""The client side of the gRPC edge: calls with deadlines, errors as CorralError; the
interactive exec's two-way stream."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from corral.api.convert import exec_event_from_pb, exec_input_to_pb, exec_start_to_pb
from corral.errors import ERROR_DOMAIN, CorralError, DeadlineExceeded, Unavailable, from_grpc_code
from corral.exec_session import ExecInputEvent, ExecStart
from corral.proc import Exited, Output

ERROR_MARK = "corral-error"  # see corral.api.server


async def call(rpc: Callable[..., Awaitable[Any]], request: Any, *, timeout: float, peer: str) -> Any:
    """One unary call with a deadline; a gRPC failure comes back as our own error."""
    try:
        return await rpc(request, timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        raise rpc_error(exc, peer) from None


def rpc_error(exc: grpc.aio.AioRpcError, peer: str) -> CorralError:
    code, details = exc.code(), exc.details() or ""
    info = error_info(exc)
    metadata = exc.trailing_metadata() or ()
    kind = info.reason if info is not None else next((value for key, value in metadata if key == ERROR_MARK), None)
    if kind is not None:
        return from_grpc_code(code, details, str(kind))  # the peer's own error, passed on as it said it
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"cannot reach {peer}: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"{peer} did not answer in time")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # a message too large, or the server's call limit
        return from_grpc_code(code, f"the call to {peer} hit a gRPC limit: {details}")
    return from_grpc_code(code, details)


def error_info(call: grpc.Call) -> error_details_pb2.ErrorInfo | None:
    """The `google.rpc.ErrorInfo` a Corral server attached to a failed call (its `reason` is the
    error's kind, `error_reason`), or None: another server, an older one, or gRPC's own error."""
    try:
        status = rpc_status.from_call(call)
    except ValueError:  # a status whose code or message disagrees with the call's: not ours
        return None
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and info.domain == ERROR_DOMAIN:
            return info
    return None


async def interactive_exec(
    method: Callable[..., Any], start: ExecStart, inputs: AsyncIterator[ExecInputEvent], *, peer: str,
    margin: float,
) -> AsyncIterator[Output | Exited]:  # fmt: skip
    """One interactive exec over a bidirectional stream (`method`: the stub's ExecInteractive or
    ExecContainerInteractive): the start, then `inputs` as they come (their end half-closes
    the stream), while the command's output and end come back. Without a timeout of its own
    the call has no deadline (it lasts as long as the caller reads); with one, that plus
    `margin`. Leaving early cancels the call, which kills the command."""
    call_ = method(timeout=start.timeout + margin if start.timeout else None)

    async def send() -> None:
        await call_.write(exec_start_to_pb(start))
        async for event in inputs:
            await call_.write(exec_input_to_pb(event))
        await call_.done_writing()

    sending = asyncio.create_task(send())
    try:
        async for msg in call_:
            yield exec_event_from_pb(msg)
        if sending.done() and not sending.cancelled() and sending.exception() is not None:
            exc = sending.exception()
            if not isinstance(exc, (grpc.aio.AioRpcError, asyncio.InvalidStateError)):
                raise exc
    except grpc.aio.AioRpcError as exc:
        raise rpc_error(exc, peer) from None
    finally:
        sending.cancel()
        with contextlib.suppress(BaseException):
            await sending
        call_.cancel()  # a no-op once it has ended
