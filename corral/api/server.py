"""The server side of the gRPC edge: who is calling, may they, with what, and errors.

Each service has a `ServicePolicy`, a table with one `Rule` per method: the roles that may
call it, whether it changes anything, and which request fields name a container, a node
or an operation. Deny by default: a method without a rule is refused to everyone, and
`make_server` refuses to start when the table and the service's generated descriptor
disagree. gRPC's standard services served beside it (health, reflection: corral.api.standard)
have tables of their own in the policy (`ServicePolicy.standard`), checked the same way.
`GuardInterceptor` wraps every handler (all four kinds) once: it reads the
caller's identity from its client certificate (role in OU, name in CN), refuses roles the
rule does not allow, validates the named fields before the servicer sees the request, logs
calls that change something with their caller, and turns `CorralError` into the matching
gRPC status, with a `google.rpc.Status` whose `ErrorInfo` names the error's kind (`_abort`).
The servicers stay thin and never deal with status codes themselves.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Mapping

import grpc
import structlog
from google.protobuf import any_pb2
from google.protobuf.descriptor import FieldDescriptor, ServiceDescriptor
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from corral.api.client import ERROR_MARK
from corral.api.convert import exec_event_to_pb, exec_input_from_pb, exec_start_from_pb
from corral.errors import ERROR_DOMAIN, CorralError, InvalidArgument, PermissionDenied, Unauthenticated, error_reason
from corral.exec_session import ExecInputEvent, ExecStart
from corral.names import validate_name
from corral.pki import Identity, identity_from_pem

log = structlog.get_logger("corral.api")

current_identity: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("current_identity", default=None)

_WHAT = {"container": "container name", "node": "node name", "operation": "operation id"}
_LOG_KEY = {"container": "container", "node": "node", "operation": "op"}  # as the rest of the logs bind them


@dataclass(frozen=True)
class Field:
    """A request field naming a container, node or operation (`facts.name`: a field of a
    sub-message). Checked with `validate_name`; an optional field may be empty."""

    path: str
    kind: str
    optional: bool = False


def container(path: str = "name", optional: bool = False) -> Field:
    return Field(path, "container", optional)


def node(path: str = "name", optional: bool = False) -> Field:
    return Field(path, "node", optional)


def operation(path: str = "op_id", optional: bool = False) -> Field:
    return Field(path, "operation", optional)


@dataclass(frozen=True)
class Rule:
    roles: frozenset[str]
    mutates: bool
    fields: tuple[Field, ...] = ()  # of the request; of its first message for a request stream


def reads(roles: tuple[str, ...], *fields: Field) -> Rule:
    return Rule(frozenset(roles), False, fields)


def writes(roles: tuple[str, ...], *fields: Field) -> Rule:
    """A call that changes something: logged with its caller."""
    return Rule(frozenset(roles), True, fields)


class AccessTableError(CorralError):
    """A service's access table does not match the service (start-up refused)."""


@dataclass(frozen=True)
class AccessTable:
    """Who may call what on one service: a rule per method."""

    service: ServiceDescriptor
    rules: Mapping[str, Rule]

    def check(self) -> None:
        """Every method of the service has a rule and every rule is a method, with fields its
        request has; otherwise the server must not start."""
        declared = {m.name: m for m in self.service.methods}
        problems = [f"{name} has no rule (add it to the table)" for name in declared if name not in self.rules]
        problems += [f"{name} is not a method of the service" for name in self.rules if name not in declared]
        for name, rule in self.rules.items():
            if name in declared:
                problems += [f"{name}: {p}" for f in rule.fields if (p := _field_problem(declared[name], f))]
        if problems:
            raise AccessTableError(f"access table of {self.service.full_name}: " + "; ".join(problems))

    def rule(self, full_method: str) -> Rule | None:
        service, _, method = full_method.lstrip("/").rpartition("/")
        return self.rules.get(method) if service == self.service.full_name else None


@dataclass(frozen=True)
class ServicePolicy(AccessTable):
    """Who may call what on one server: its Corral service's table, the tables of the gRPC
    standard services it also serves (`standard`, corral.api.standard), and its limits."""

    max_concurrent_rpcs: int = 1000  # more calls at once get RESOURCE_EXHAUSTED
    max_connections: int = 1000  # open connections, handshaking ones included
    standard: tuple[AccessTable, ...] = ()

    def check(self) -> None:
        for table in (self, *self.standard):
            AccessTable.check(table)

    def rule(self, full_method: str) -> Rule | None:
        tables = (AccessTable.rule(t, full_method) for t in (self, *self.standard))
        return next((rule for rule in tables if rule is not None), None)


def _field_problem(method, field: Field) -> str | None:
    message = method.input_type
    parts = field.path.split(".")
    for i, part in enumerate(parts):
        fd = message.fields_by_name.get(part)
        if fd is None:
            return f"{message.name} has no field {field.path!r}"
        if i < len(parts) - 1:
            if fd.message_type is None:
                return f"{field.path!r}: {part} is not a message"
            message = fd.message_type
        elif fd.type != FieldDescriptor.TYPE_STRING or fd.is_repeated:
            return f"{field.path!r} is not a string"
    if field.kind not in _WHAT:
        return f"{field.path!r}: unknown kind {field.kind!r}"
    return None


@functools.lru_cache(maxsize=1024)
def _identity_cached(pem: bytes) -> Identity:
    return identity_from_pem(pem)


def peer_identity(context: grpc.aio.ServicerContext) -> Identity:
    certs = context.auth_context().get("x509_pem_cert")
    if not certs:
        raise Unauthenticated("no client certificate presented")
    return _identity_cached(certs[0])


class _Guard:
    """The checks of one call of one method."""

    def __init__(self, full_method: str, rule: Rule | None) -> None:
        self.method = full_method.rsplit("/", 1)[-1]
        self.rule = rule
        self.named: dict[str, str] = {}  # the call's checked names, by log key (for its error's details)

    def admit(self, context) -> Identity:
        identity = peer_identity(context)
        if self.rule is None:
            raise PermissionDenied(f"{self.method} is in no access table: refused to everyone")
        if identity.role not in self.rule.roles:
            raise PermissionDenied(
                f"{identity.role} {identity.name!r} may not call {self.method} "
                f"(allowed: {', '.join(sorted(self.rule.roles)) or 'nobody'})"
            )
        current_identity.set(identity)
        return identity

    def check(self, request: Any, identity: Identity, context) -> None:
        """Validate the named fields (before anything is touched), then log a change with its caller."""
        named = self.named
        for field in self.rule.fields:
            value = _get(request, field.path)
            if value == "" and field.optional:
                continue
            validate_name(value, _WHAT[field.kind])
            named.setdefault(_LOG_KEY[field.kind], value)
        if self.rule.mutates:
            log.info("mutating call", method=self.method, role=identity.role, caller=identity.name, peer=context.peer(), **named)

    async def checked_stream(self, requests: AsyncIterator[Any], identity: Identity, context) -> AsyncIterator[Any]:
        first = True
        async for request in requests:
            if first:
                self.check(request, identity, context)
                first = False
            yield request


def _get(message: Any, path: str) -> str:
    for part in path.split("."):
        message = getattr(message, part)
    return message


class GuardInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, policy: ServicePolicy) -> None:
        self._policy = policy

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # no such method: gRPC answers UNIMPLEMENTED
        guard = _Guard(handler_call_details.method, self._policy.rule(handler_call_details.method))
        return _guarded(handler, guard)


def _guarded(handler: grpc.RpcMethodHandler, guard: _Guard) -> grpc.RpcMethodHandler:
    """The handler behind the guard, whatever its kind; never the handler itself."""
    method, codec = guard.method, {"request_deserializer": handler.request_deserializer,
                                   "response_serializer": handler.response_serializer}  # fmt: skip
    if handler.unary_unary:
        inner = handler.unary_unary

        async def unary_unary(request, context):
            try:
                guard.check(request, guard.admit(context), context)
                return await inner(request, context)
            except CorralError as exc:
                await _abort(context, guard, exc)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **codec)

    if handler.stream_unary:
        inner = handler.stream_unary

        async def stream_unary(requests, context):
            try:
                identity = guard.admit(context)
                return await inner(guard.checked_stream(requests, identity, context), context)
            except CorralError as exc:
                await _abort(context, guard, exc)

        return grpc.stream_unary_rpc_method_handler(stream_unary, **codec)

    # Response streams: the servicer yields (an async generator) or writes with context.write
    # (a coroutine); gRPC tells them apart by the function's kind, so the wrapper keeps it.
    if handler.unary_stream:
        inner, request_stream = handler.unary_stream, False
    elif handler.stream_stream:
        inner, request_stream = handler.stream_stream, True
    else:
        raise TypeError(f"{method}: a gRPC handler of no known kind")

    def admitted(request, context):
        identity = guard.admit(context)
        if request_stream:
            return guard.checked_stream(request, identity, context)
        guard.check(request, identity, context)
        return request

    if inspect.isasyncgenfunction(inner):

        async def streaming(request, context):
            try:
                async for item in inner(admitted(request, context), context):
                    yield item
            except CorralError as exc:
                await _abort(context, guard, exc)

    else:

        async def streaming(request, context):
            try:
                return await inner(admitted(request, context), context)
            except CorralError as exc:
                await _abort(context, guard, exc)

    make = grpc.stream_stream_rpc_method_handler if request_stream else grpc.unary_stream_rpc_method_handler
    return make(streaming, **codec)


async def _abort(context, guard: _Guard, exc: CorralError) -> None:
    """End the call with the error's code and message, and two marks of an error raised by
    Corral itself (not by the transport), so a client does not mistake "the controller could
    not reach an agent" for "the client could not reach the controller": the `google.rpc.Status`
    any gRPC client can read (an `ErrorInfo`: domain `corral`, reason the error's kind, metadata
    the method and the names it was called with), and, for Corral's older clients, the kind in
    `ERROR_MARK` metadata."""
    log.info("request refused", method=guard.method, code=exc.grpc_code.name, error=exc.message)
    kind = type(exc).__name__
    info = error_details_pb2.ErrorInfo(reason=error_reason(kind), domain=ERROR_DOMAIN,
                                       metadata={"method": guard.method, **guard.named})  # fmt: skip
    detail = any_pb2.Any()
    detail.Pack(info)
    status = rpc_status.to_status(status_pb2.Status(code=exc.grpc_code.value[0], message=exc.message, details=[detail]))
    await context.abort(status.code, status.details, trailing_metadata=(*status.trailing_metadata, (ERROR_MARK, kind)))


def make_server(policy: ServicePolicy) -> grpc.aio.Server:
    """A server guarded by `policy`; refuses to exist when the policy's table does not cover
    its service exactly."""
    from corral.api.tls import server_options

    policy.check()
    return grpc.aio.server(
        interceptors=[GuardInterceptor(policy)],
        options=server_options(policy.max_connections),
        maximum_concurrent_rpcs=policy.max_concurrent_rpcs,
    )


async def serve_interactive_exec(
    requests: AsyncIterator[Any], run: Callable[[ExecStart, AsyncIterator[ExecInputEvent]], AsyncIterator[Any]],
    message_type: Any,
) -> AsyncIterator[Any]:  # fmt: skip
    """The server side of an interactive exec: the first message is its start, the others its
    inputs (read as the command runs); `run` yields the command's events, sent as `message_type`
    (the agent's ExecResponse or the controller's ExecContainerResponse)."""
    requests = aiter(requests)
    first = await anext(requests, None)
    if first is None:
        raise InvalidArgument("an interactive exec sent nothing")

    async def inputs() -> AsyncIterator[ExecInputEvent]:
        async for msg in requests:
            yield exec_input_from_pb(msg)

    events = run(exec_start_from_pb(first), inputs())
    async with contextlib.aclosing(events):
        async for event in events:
            yield exec_event_to_pb(event, message_type)
