"""The one exception hierarchy of Corral.

Every error a user can see is a `CorralError` subclass. Each class carries the
gRPC status code it travels as and the exit code the CLI returns for it; the
mapping lives here and nowhere else (`to_grpc_code`, `from_grpc_code`). On the wire a
Corral error also carries a `google.rpc.Status` with an `ErrorInfo` detail (domain
`ERROR_DOMAIN`, reason `error_reason(kind)`), which clients in any language can read.
"""

from __future__ import annotations

import re

import grpc

ERROR_DOMAIN = "corral"  # google.rpc.ErrorInfo.domain of the errors Corral servers send


class CorralError(Exception):
    """Base of every error Corral reports to a user or a caller."""

    grpc_code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    exit_code: int = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidArgument(CorralError):
    """The request itself is wrong: a bad name, size, flag or config."""

    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    exit_code = 2


class ConfigError(InvalidArgument):
    """A configuration file is missing, malformed or inconsistent."""

    exit_code = 78  # EX_CONFIG


class NotFound(CorralError):
    grpc_code = grpc.StatusCode.NOT_FOUND
    exit_code = 3


class AlreadyExists(CorralError):
    grpc_code = grpc.StatusCode.ALREADY_EXISTS
    exit_code = 4


class FailedPrecondition(CorralError):
    """The request is valid but the system is not in a state to do it."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    exit_code = 5


class Conflict(FailedPrecondition):
    """Someone else changed or holds the same thing first: a stale write, a busy container."""

    grpc_code = grpc.StatusCode.ABORTED


class NoCapacity(CorralError):
    """No node can take the request (placement found nothing that fits)."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    exit_code = 6


class LimitExceeded(CorralError):
    """A limit of the gRPC transport was hit: a message over the size limit, or a server at its
    limit of concurrent calls. Not NoCapacity: no placement was tried."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    exit_code = 1


class Unavailable(CorralError):
    """A node, agent or the controller could not be reached."""

    grpc_code = grpc.StatusCode.UNAVAILABLE
    exit_code = 7


class DeadlineExceeded(Unavailable):
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED


class PermissionDenied(CorralError):
    grpc_code = grpc.StatusCode.PERMISSION_DENIED
    exit_code = 8


class Unauthenticated(PermissionDenied):
    grpc_code = grpc.StatusCode.UNAUTHENTICATED


class Cancelled(CorralError):
    grpc_code = grpc.StatusCode.CANCELLED
    exit_code = 9


class RuntimeFailure(CorralError):
    """The host's container runtime (LXC, CRIU) failed doing what it was asked."""

    grpc_code = grpc.StatusCode.INTERNAL
    exit_code = 10


_BY_CODE: dict[grpc.StatusCode, type[CorralError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ABORTED: Conflict,
    grpc.StatusCode.RESOURCE_EXHAUSTED: NoCapacity,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.CANCELLED: Cancelled,
}


def to_grpc_code(error: CorralError) -> grpc.StatusCode:
    return error.grpc_code


def error_reason(kind: str) -> str:
    """The `ErrorInfo.reason` of an error kind, UPPER_SNAKE_CASE as gRPC's error model asks:
    `NoCapacity` -> `NO_CAPACITY`, `CorralError` -> `CORRAL_ERROR`. A reason stays as it is."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", kind).upper()


def from_grpc_code(code: grpc.StatusCode, message: str, kind: str = "") -> CorralError:
    """Turn a gRPC status received from a peer back into our own error. `kind`: what a Corral
    peer said the error was, its class name or its ErrorInfo reason (empty when gRPC itself
    failed the call)."""
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and error_reason(kind) != error_reason(NoCapacity.__name__):
        # gRPC's own limits (message size, concurrent calls) travel as RESOURCE_EXHAUSTED too.
        return LimitExceeded(message)
    return _BY_CODE.get(code, CorralError)(message)
