"""Corral's typed asyncio client, for services that drive the fleet from Python.

    from corral.client import Client, Limits

    async with Client.from_config() as fleet:            # the CLI's config and current context
        for node in await fleet.list_nodes():
            print(node.name, node.state.value)
        ct = await fleet.create_container("web1", "busybox", limits=Limits(memory_bytes=256 << 20))

Or without a CLI config: `Client("10.0.0.1:7700", tls=TlsFiles(ca=..., cert=..., key=...))`.

Everything a call returns is a frozen dataclass of `corral.model` (`Container`, `Node`,
`Operation`, `Event`, ...) or of this module (`ExecResult`, `PlacementPlan`); no protobuf
crosses this edge. Every failure is a `corral.errors.CorralError` subclass, the same classes
(and exit codes) as the `corral` CLI's: `NotFound`, `AlreadyExists`, `Conflict`, `NoCapacity`,
`Unavailable` (the controller could not be reached), `DeadlineExceeded` (a subclass of it),
`PermissionDenied`...

Deadlines and retries: every call has a deadline, given in its docstring (and in `CALLS`, the
table docs/api.md prints). Reads are always safe to retry. Calls that set something to a value
(cordon, limits, HA, start, stop) are safe too. Calls that create something (a container, a
migration, a failover, an exec) are not: after `Unavailable` or `DeadlineExceeded` the request
may have been carried out, so look first (`get_container`, `list_operations(name,
active_only=True)`) and retry only if it was not.

Examples that run against a fleet: examples/ at the top of the repository.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Mapping, Sequence, TypeVar

from controller.client import ControllerClient, ExecResult, PlacementPlan
from controller.scheduler.maintenance import Move, Stuck
from corral.api.convert import (
    event_from_pb,
    lease_from_pb,
    node_check_from_pb,
    operation_from_pb,
    resolution_from_pb,
)
from corral.config import TlsFiles
from corral.errors import (
    AlreadyExists,
    Cancelled,
    ConfigError,
    Conflict,
    CorralError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    LimitExceeded,
    NoCapacity,
    NotFound,
    PermissionDenied,
    RuntimeFailure,
    Unauthenticated,
    Unavailable,
)
from corral.model import (
    Container,
    ContainerState,
    DesiredState,
    Event,
    Lease,
    Limits,
    NetworkAttachment,
    Node,
    NodeCheck,
    NodeFacts,
    NodeState,
    Operation,
    OperationProgress,
    OperationStep,
    Resolution,
    Snapshot,
)
from corral.exec_session import ExecInputEvent, ExecStart, Resize, SendSignal, StdinClosed, StdinData, TerminalSize
from corral.proc import Exited, Output
from corral.v1 import controller_pb2 as cpb

__all__ = [
    "CALLS", "CallPolicy", "Client", "TlsFiles",
    # what calls return
    "Container", "ContainerState", "DesiredState", "Event", "ExecResult", "Exited", "Lease", "Limits", "Move",
    "Moves", "NetworkAttachment", "Node", "NodeCheck", "NodeFacts", "NodeState", "Operation", "OperationProgress",
    "OperationStep", "Output", "PlacementPlan", "Resolution", "Snapshot", "Stuck",
    # what an interactive exec sends
    "ExecStart", "ExecInputEvent", "StdinData", "StdinClosed", "Resize", "SendSignal", "TerminalSize",
    # what calls raise
    "AlreadyExists", "Cancelled", "ConfigError", "Conflict", "CorralError", "DeadlineExceeded",
    "FailedPrecondition", "InvalidArgument", "LimitExceeded", "NoCapacity", "NotFound", "PermissionDenied",
    "RuntimeFailure", "Unauthenticated", "Unavailable",
]  # fmt: skip


@dataclass(frozen=True)
class Moves:
    """An evacuation's or a rebalancing's plan (the scheduler's `Move` and `Stuck`), and the
    operation carrying it out (None for a dry run or when nothing moves)."""

    moves: tuple[Move, ...]
    stuck: tuple[Stuck, ...]
    operation: Operation | None = None


def moves_from_pb(msg: cpb.MovesReply) -> Moves:
    return Moves(
        moves=tuple(Move(m.container, m.source, m.target, m.live, m.reason) for m in msg.moves),
        stuck=tuple(Stuck(s.container, s.reason) for s in msg.stuck),
        operation=operation_from_pb(msg.operation) if msg.HasField("operation") else None,
    )


DEFAULT_TIMEOUT = 900.0  # seconds: the deadline of calls that do work on a host (create, start, stop...)


@dataclass(frozen=True)
class CallPolicy:
    """One RPC's deadline as this client sets it, and whether a failed call may be sent again."""

    deadline: str
    retry: str


_READ = "safe: a read"
_TIMEOUT = f"the client's timeout ({DEFAULT_TIMEOUT:g} s unless given)"
_LOOK_FIRST = "not safe: after Unavailable or DeadlineExceeded it may have started; "

# By RPC name (ControllerService). docs/api.md prints this table; the methods' docstrings end with it.
CALLS: dict[str, CallPolicy] = {
    "ListNodes": CallPolicy("30 s", _READ),
    "GetNode": CallPolicy("30 s", _READ),
    "MarkNodeFenced": CallPolicy("30 s", "safe: it records a state (only for a node that really is off)"),
    "SetNodeCordon": CallPolicy("30 s", "safe: it sets the flag to the value given"),
    "PlanPlacement": CallPolicy("30 s", "safe: it changes nothing"),
    "EvacuateNode": CallPolicy("60 s (the answer is the plan and its operation)",
                               "dry_run: safe; otherwise ListOperations(active_only) first"),  # fmt: skip
    "RebalanceFleet": CallPolicy("60 s (the answer is the plan and its operation)",
                                 "without apply: safe; with it, ListOperations(active_only) first"),  # fmt: skip
    "CheckFleet": CallPolicy("60 s", _READ),
    "CreateContainer": CallPolicy(_TIMEOUT, _LOOK_FIRST + "GetContainer first (a repeat fails with AlreadyExists)"),
    "StartContainer": CallPolicy(_TIMEOUT, "safe: it asks for a state (a running container stays running)"),
    "StopContainer": CallPolicy(_TIMEOUT, "safe: it asks for a state (a stopped container stays stopped)"),
    "DestroyContainer": CallPolicy(_TIMEOUT, "safe if NotFound on the repeat counts as done"),
    "GetContainer": CallPolicy("30 s", _READ),
    "ListContainers": CallPolicy("30 s", _READ),
    "ExecContainer": CallPolicy("the exec's timeout (300 s unless given) + 60 s",
                                "not safe: the command runs again"),  # fmt: skip
    "ExecContainerInteractive": CallPolicy("none: the session lasts while the caller keeps the stream (the command's own "
                                           "timeout if given)", "not safe: the command runs again"),
    "SetContainerLimits": CallPolicy(_TIMEOUT, "safe: it sets the limits given"),
    "CreateSnapshot": CallPolicy(_TIMEOUT, _LOOK_FIRST + "ListSnapshots first (a repeat fails with AlreadyExists)"),
    "ListSnapshots": CallPolicy("30 s", _READ),
    "RestoreSnapshot": CallPolicy(_TIMEOUT, "safe: the container ends as the snapshot was"),
    "DeleteSnapshot": CallPolicy(_TIMEOUT, "safe if NotFound on the repeat counts as done"),
    "SetContainerHa": CallPolicy(_TIMEOUT, "safe: it sets the three fields given"),
    "ResolveContainer": CallPolicy("120 s", "dry_run: safe; otherwise GetContainer first (in_doubt empty: done)"),
    "MigrateContainer": CallPolicy("60 s (the answer is the operation; follow it with WatchOperation)",
                                   _LOOK_FIRST + "ListOperations(container, active_only) first"),  # fmt: skip
    "FailoverContainer": CallPolicy("60 s (the answer is the operation)",
                                    _LOOK_FIRST + "ListOperations(container, active_only) first"),  # fmt: skip
    "ListOperations": CallPolicy("30 s", _READ),
    "GetOperation": CallPolicy("30 s", _READ),
    "WatchOperation": CallPolicy(_TIMEOUT + " for the whole stream",
                                 "safe: a new watch starts with the operation as it is"),  # fmt: skip
    "CancelOperation": CallPolicy("30 s", "safe: a cancelled operation stays cancelled"),
    "AcquireLease": CallPolicy("the lease's ttl, at most 30 s", "safe: the same holder renews"),
    "WatchEvents": CallPolicy(f"none while following; else {_TIMEOUT}",
                              "safe: resume with since = the last seq received"),  # fmt: skip
}

F = TypeVar("F", bound=Callable[..., object])
T = TypeVar("T")


def _policy(rpc: str) -> Callable[[F], F]:
    """End the method's docstring with its RPC's deadline and retry advice (from CALLS)."""

    def mark(method: F) -> F:
        p = CALLS[rpc]
        said = inspect.cleandoc(method.__doc__ or "")
        method.__doc__ = f"{said}\n\n" * bool(said) + f"RPC {rpc}. Deadline: {p.deadline}. Retry: {p.retry}."
        return method

    return mark


class Client:
    """A connection to the controller (mutual TLS); use it as an async context manager."""

    def __init__(self, address: str, tls: TlsFiles, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        """`address`: the controller's HOST:PORT; `tls`: the CA that signed the controller's
        certificate, and this client's certificate and key (a user's, signed by the fleet's CA).
        `timeout`: the deadline of calls that do work on a host (create, start, stop, destroy...)."""
        self._wire = ControllerClient(address, tls, timeout)

    @classmethod
    def from_config(cls, path_or_context: str | os.PathLike[str] | None = None, *,
                    timeout: float | None = None) -> "Client":  # fmt: skip
        """A client from the `corral` CLI's config: `path_or_context` is a config file (a path
        that exists, or one with a / in it) or a context of the default config; None: the
        default config ($CORRAL_CONFIG, ~/.config/corral/config.yaml, /etc/corral/cli.yaml) and
        its current context ($CORRAL_CONTEXT overrides it). Raises ConfigError or NotFound."""
        from controller.cli.settings import CliSettings

        path, context = None, None
        if path_or_context is not None:
            text = os.fspath(path_or_context)
            if isinstance(path_or_context, os.PathLike) or "/" in text or Path(text).is_file():
                path = Path(text)
            else:
                context = text
        settings = CliSettings.load(path, context)
        return cls(settings.controller, settings.tls, timeout=settings.timeout if timeout is None else timeout)

    @property
    def address(self) -> str:
        return self._wire.address

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._wire.channel.close()

    # -- nodes -----------------------------------------------------------------------------

    @_policy("ListNodes")
    async def list_nodes(self) -> list[Node]:
        """Every node of the fleet."""
        return await self._wire.list_nodes()

    @_policy("GetNode")
    async def get_node(self, name: str) -> Node:
        """One node; NotFound if the fleet has none of that name."""
        return await self._wire.get_node(name)

    @_policy("SetNodeCordon")
    async def set_node_cordon(self, name: str, cordoned: bool) -> Node:
        """Cordon a node (no new placements on it) or uncordon it; what runs there stays."""
        return await self._wire.set_node_cordon(name, cordoned)

    @_policy("MarkNodeFenced")
    async def mark_fenced(self, name: str, how: str) -> Node:
        """Record that a lost node is off (`how`: what fenced it); its HA containers may then
        fail over. Refused (FailedPrecondition) for a node that heartbeats."""
        return await self._wire.mark_fenced(name, how)

    @_policy("PlanPlacement")
    async def plan_placement(self, name: str, *, existing: bool = False, node: str = "", limits: Limits = Limits(),
                             storage: str = "", constraints: Sequence[str] = (), group: str = "") -> PlacementPlan:  # fmt: skip
        """Where the scheduler would place a new container `name` (or move it, `existing`),
        why, and why not each other node. Raises NoCapacity when no node fits."""
        return await self._wire.plan_placement(name, existing=existing, node=node, limits=limits, storage=storage,
                                               constraints=constraints, group=group)  # fmt: skip

    @_policy("EvacuateNode")
    async def evacuate_node(self, name: str, *, allow_cold: bool = False, dry_run: bool = False) -> Moves:
        """Move every container off a node (cordoned first), live where the hosts can (cold
        only with `allow_cold`): the plan, and the operation making it (None with `dry_run`)."""
        return moves_from_pb(await self._wire.evacuate_node(name, allow_cold=allow_cold, dry_run=dry_run))

    @_policy("RebalanceFleet")
    async def rebalance_fleet(self, *, apply: bool = False, band: float = 0.0) -> Moves:
        """The fewest live moves that bring node loads within `band` of the mean (0: 0.15 of a
        node's capacity); with `apply`, the operation that makes them."""
        return moves_from_pb(await self._wire.rebalance_fleet(apply=apply, band=band))

    @_policy("CheckFleet")
    async def check_fleet(self) -> list[NodeCheck]:
        """N+1: for each node, would its HA containers fit on the others if it died now."""
        return [node_check_from_pb(check) for check in await self._wire.check_fleet()]

    # -- containers ------------------------------------------------------------------------

    @_policy("ListContainers")
    async def list_containers(self, node: str = "") -> list[Container]:
        """The fleet's containers, or those on `node`."""
        return await self._wire.list_containers(node)

    @_policy("GetContainer")
    async def get_container(self, name: str) -> Container:
        """One container, with its state as its host last reported it."""
        return await self._wire.get_container(name)

    @_policy("CreateContainer")
    async def create_container(self, name: str, template: str, *, node: str = "", limits: Limits = Limits(),
                               storage: str = "", start: bool = False, ha: bool = False, ha_priority: int = 0,
                               ha_group: str = "", constraints: Sequence[str] = (), group: str = "") -> Container:  # fmt: skip
        """Create a container from `template` (busybox, debian...), on `node` or where the
        scheduler places it (`constraints` such as "zone=a", anti-affinity `group`); `start` it
        once created. `ha` needs shared storage."""
        return await self._wire.create_container(
            name, template, node=node, limits=limits, storage=storage, start=start, ha=ha, ha_priority=ha_priority,
            ha_group=ha_group, constraints=constraints, group=group,
        )  # fmt: skip

    @_policy("StartContainer")
    async def start_container(self, name: str, *, stateless: bool = False) -> Container:
        """Start it. One stopped with `stateful` resumes its processes where they were, unless
        `stateless` (its saved processes are dropped and it boots afresh)."""
        return await self._wire.start_container(name, stateless=stateless)

    @_policy("StopContainer")
    async def stop_container(self, name: str, *, force: bool = False, timeout: int = 0,
                             stateful: bool = False) -> Container:  # fmt: skip
        """Stop it: cleanly within `timeout` seconds (0: the host's default), or kill it (`force`).
        `stateful`: save its processes on its node (CRIU) instead; the next start resumes them."""
        return await self._wire.stop_container(name, force=force, timeout=timeout, stateful=stateful)

    # -- snapshots (kept on the container's node) --------------------------------------------

    @_policy("CreateSnapshot")
    async def create_snapshot(self, name: str, snapshot: str, *, stateful: bool = False) -> Snapshot:
        """Copy its disk into a snapshot on its node; `stateful`: its running processes too (the
        container pauses for the dump and the copy, then runs on)."""
        return await self._wire.create_snapshot(name, snapshot, stateful=stateful)

    @_policy("ListSnapshots")
    async def list_snapshots(self, name: str) -> list[Snapshot]:
        """Its snapshots, oldest first."""
        return await self._wire.list_snapshots(name)

    @_policy("RestoreSnapshot")
    async def restore_snapshot(self, name: str, snapshot: str) -> Container:
        """Put the (stopped) container back as the snapshot was: its disk exactly, and its
        processes running again if the snapshot is stateful."""
        return await self._wire.restore_snapshot(name, snapshot)

    @_policy("DeleteSnapshot")
    async def delete_snapshot(self, name: str, snapshot: str) -> None:
        await self._wire.delete_snapshot(name, snapshot)

    @_policy("DestroyContainer")
    async def destroy_container(self, name: str, *, force: bool = False) -> None:
        """Remove it and its files (`force`: even while it runs)."""
        await self._wire.destroy_container(name, force=force)

    @_policy("SetContainerLimits")
    async def set_limits(self, name: str, limits: Limits) -> Container:
        """Change its limits: the non-zero fields of `limits`, applied to a running container too."""
        return await self._wire.set_limits(name, limits)

    @_policy("SetContainerHa")
    async def set_ha(self, name: str, ha: bool, priority: int = 0, group: str = "") -> Container:
        return await self._wire.set_ha(name, ha, priority, group)

    @_policy("ResolveContainer")
    async def resolve_container(self, name: str, node: str, *, dry_run: bool) -> Resolution:
        """Settle a container in doubt: keep its copy on `node`, stop and remove the others."""
        return resolution_from_pb(await self._wire.resolve_container(name, node, dry_run=dry_run))

    @_policy("ExecContainer")
    async def exec_stream(self, name: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                          stdin: bytes = b"", timeout: int = 0) -> AsyncIterator[Output | Exited]:  # fmt: skip
        """Run a command in a running container: its output as it is written (`Output`, fd 1
        or 2), then how it ended (`Exited`, always last). It is killed after `timeout` seconds
        (0: 300), or when the caller stops reading (closes the iterator)."""
        async for event in _closing(self._wire.exec_stream(name, argv, env=env, stdin=stdin, timeout=timeout)):
            yield event

    @_policy("ExecContainer")
    async def exec(self, name: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                   stdin: bytes = b"", timeout: int = 0) -> ExecResult:  # fmt: skip
        """`exec_stream`, collected: for commands whose output fits in memory."""
        return await self._wire.exec(name, argv, env=env, stdin=stdin, timeout=timeout)

    @_policy("ExecContainerInteractive")
    async def exec_interactive(self, start: ExecStart, inputs: AsyncIterator[ExecInputEvent]
                               ) -> AsyncIterator[Output | Exited]:  # fmt: skip
        """Run a command in a running container, fed as it runs: `inputs` (`StdinData`,
        `StdinClosed`, `Resize` for a `tty` start, `SendSignal`) go as they come, and their end
        closes its input; its output comes back (on a terminal, stdout only), then `Exited`.
        No timeout unless `start.timeout`: closing the iterator kills the command."""
        async for event in _closing(self._wire.exec_interactive(start, inputs)):
            yield event

    # -- migrations, failovers and operations ----------------------------------------------

    @_policy("MigrateContainer")
    async def migrate(self, name: str, target: str = "", *, live: bool = False, postcopy: bool = False,
                      fallback_cold: bool = False, from_checkpoint: str = "") -> Operation:  # fmt: skip
        """Start moving a container to `target` (empty: the scheduler chooses): cold (stop, copy,
        start) or `live` (CRIU; `postcopy`, `fallback_cold`). Returns the operation at once;
        `wait_operation` or `watch_operation` follow it."""
        return operation_from_pb(await self._wire.migrate(
            name, target, live=live, postcopy=postcopy, fallback_cold=fallback_cold, from_checkpoint=from_checkpoint))

    @_policy("FailoverContainer")
    async def failover(self, name: str, target: str = "") -> Operation:
        """Start a container whose node is lost (dead or fenced) on another node (`target` or the
        planner's choice). Returns the operation at once."""
        return operation_from_pb(await self._wire.failover(name, target))

    @_policy("ListOperations")
    async def list_operations(self, container: str = "", active_only: bool = False) -> list[Operation]:
        return [operation_from_pb(op) for op in await self._wire.list_operations(container, active_only)]

    @_policy("GetOperation")
    async def get_operation(self, op_id: str) -> Operation:
        return operation_from_pb(await self._wire.get_operation(op_id))

    @_policy("CancelOperation")
    async def cancel_operation(self, op_id: str) -> Operation:
        """Ask an operation to stop where it is safe; it rolls back (follow it to its end)."""
        return operation_from_pb(await self._wire.cancel_operation(op_id))

    @_policy("WatchOperation")
    async def watch_operation(self, op_id: str) -> AsyncIterator[Operation]:
        """The operation as it changes, first as it is now, until it has finished."""
        async for op in _closing(self._wire.watch_operation(op_id)):
            yield operation_from_pb(op)

    @_policy("WatchOperation")
    async def wait_operation(self, op_id: str, on_change: Callable[[Operation], Awaitable[None] | None] | None = None
                             ) -> Operation:  # fmt: skip
        """The operation once it has finished (check `.succeeded`, `.error`); `on_change` is
        called with each state on the way (a coroutine function or a plain one)."""
        last: Operation | None = None
        async for last in self.watch_operation(op_id):
            if on_change is not None and (pending := on_change(last)) is not None:
                await pending
        if last is None:
            raise Unavailable(f"controller {self.address} ended the watch of {op_id} without its state")
        return last

    # -- events and leases -----------------------------------------------------------------

    @_policy("WatchEvents")
    async def watch_events(self, since: int = 0, follow: bool = True) -> AsyncIterator[Event]:
        """The fleet's kept events numbered after `since`; with `follow`, then new ones as they
        come, with no deadline. The stream fails with Unavailable when the controller goes away
        (and with a message containing "missed events" if this watcher fell too far behind):
        watch again from the last `seq` seen, as corral-failoverd does."""
        async for event in _closing(self._wire.watch_events(since, follow)):
            yield event_from_pb(event)

    @_policy("AcquireLease")
    async def acquire_lease(self, name: str, holder: str, ttl: float) -> Lease:
        """A named lease for clients that must act one at a time: granted to `holder` for
        `ttl` seconds (renewed by the same holder), or who holds it and for how long."""
        return lease_from_pb(await self._wire.acquire_lease(name, holder, ttl))


async def _closing(stream: AsyncIterator[T]) -> AsyncIterator[T]:
    """`stream`'s items; closed (its call cancelled) as soon as the caller stops reading."""
    async with contextlib.aclosing(stream) as items:  # type: ignore[type-var]
        async for item in items:
            yield item
