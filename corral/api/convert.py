"""Conversion between protobuf messages and domain dataclasses (API edge only)."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from corral.errors import CorralError, InvalidArgument
from corral.exec_session import ExecInputEvent, ExecStart, Resize, SendSignal, StdinClosed, StdinData, TerminalSize
from corral.model import Container, ContainerState, DesiredState, Limits, NetworkAttachment, Node, NodeFacts, NodeState
from corral.model import ContainerStats, Event, Lease, NodeCheck, Operation, OperationProgress, OperationStep
from corral.model import Resolution, Snapshot
from corral.proc import STDERR, STDOUT, Exited, Output
from corral.v1 import types_pb2 as pb

_STATE_TO_PB = {s: pb.ContainerState.Value(f"CONTAINER_STATE_{s.name}") for s in ContainerState}
_STATE_FROM_PB = {v: k for k, v in _STATE_TO_PB.items()}
_DESIRED_TO_PB = {s: pb.DesiredState.Value(f"DESIRED_STATE_{s.name}") for s in DesiredState}
_DESIRED_FROM_PB = {v: k for k, v in _DESIRED_TO_PB.items()}
_NODE_STATE_TO_PB = {s: pb.NodeState.Value(f"NODE_STATE_{s.name}") for s in NodeState}
_NODE_STATE_FROM_PB = {v: k for k, v in _NODE_STATE_TO_PB.items()}


def limits_to_pb(limits: Limits) -> pb.Limits:
    return pb.Limits(**limits.__dict__)


def limits_from_pb(msg: pb.Limits) -> Limits:
    return Limits(
        memory_bytes=msg.memory_bytes,
        cpu_millis=msg.cpu_millis,
        cpu_shares=msg.cpu_shares,
        pids_max=msg.pids_max,
        disk_bytes=msg.disk_bytes,
    )


def network_to_pb(net: NetworkAttachment) -> pb.NetworkAttachment:
    return pb.NetworkAttachment(ipv4_cidr=net.ipv4_cidr, gateway=net.gateway, mac=net.mac)


def network_from_pb(msg: pb.NetworkAttachment) -> NetworkAttachment:
    return NetworkAttachment(ipv4_cidr=msg.ipv4_cidr, gateway=msg.gateway, mac=msg.mac)


def container_to_pb(ct: Container) -> pb.Container:
    return pb.Container(
        name=ct.name,
        node=ct.node,
        template=ct.template,
        state=_STATE_TO_PB[ct.state],
        limits=limits_to_pb(ct.limits),
        network=network_to_pb(ct.network),
        storage=ct.storage,
        init_pid=ct.init_pid,
        created_at=ct.created_at,
        message=ct.message,
        volume_generation=ct.volume_generation,
        desired_state=_DESIRED_TO_PB[ct.desired_state],
        observed_at=ct.observed_at,
        revision=ct.revision,
        in_doubt=ct.in_doubt,
        doubt_nodes=list(ct.doubt_nodes),
        ha=ct.ha,
        ha_priority=ct.ha_priority,
        ha_group=ct.ha_group,
        ha_restarts=ct.ha_restarts,
        ha_relocations=ct.ha_relocations,
        ha_failed=ct.ha_failed,
        constraints=list(ct.constraints),
        group=ct.group,
        stateful_stopped=ct.stateful_stopped,
    )


def container_from_pb(msg: pb.Container) -> Container:
    return Container(
        name=msg.name,
        node=msg.node,
        template=msg.template,
        state=_STATE_FROM_PB.get(msg.state, ContainerState.UNKNOWN),
        limits=limits_from_pb(msg.limits),
        network=network_from_pb(msg.network),
        storage=msg.storage,
        init_pid=msg.init_pid,
        created_at=msg.created_at,
        message=msg.message,
        volume_generation=msg.volume_generation,
        desired_state=_DESIRED_FROM_PB.get(msg.desired_state, DesiredState.STOPPED),
        observed_at=msg.observed_at,
        revision=msg.revision,
        in_doubt=msg.in_doubt,
        doubt_nodes=tuple(msg.doubt_nodes),
        ha=msg.ha,
        ha_priority=msg.ha_priority,
        ha_group=msg.ha_group,
        ha_restarts=msg.ha_restarts,
        ha_relocations=msg.ha_relocations,
        ha_failed=msg.ha_failed,
        constraints=tuple(msg.constraints),
        group=msg.group,
        stateful_stopped=msg.stateful_stopped,
    )


def snapshot_to_pb(snap: Snapshot) -> pb.Snapshot:
    return pb.Snapshot(name=snap.name, created_at=snap.created_at, stateful=snap.stateful, size_bytes=snap.size_bytes)


def snapshot_from_pb(msg: pb.Snapshot) -> Snapshot:
    return Snapshot(name=msg.name, created_at=msg.created_at, stateful=msg.stateful, size_bytes=msg.size_bytes)


_COLLECTIONS = ("storage_drivers", "live_strategies", "live_unavailable", "unavailable", "labels")
_FACT_FIELDS = [f for f in NodeFacts.__dataclass_fields__ if f not in _COLLECTIONS]


def facts_to_pb(facts: NodeFacts) -> pb.NodeFacts:
    return pb.NodeFacts(
        **{f: getattr(facts, f) for f in _FACT_FIELDS},
        storage_drivers=list(facts.storage_drivers),
        live_strategies=list(facts.live_strategies),
        live_unavailable=dict(facts.live_unavailable),
        unavailable=dict(facts.unavailable),
        labels=dict(facts.labels),
    )


def facts_from_pb(msg: pb.NodeFacts) -> NodeFacts:
    return NodeFacts(
        **{f: getattr(msg, f) for f in _FACT_FIELDS},
        storage_drivers=tuple(msg.storage_drivers),
        live_strategies=tuple(msg.live_strategies),
        live_unavailable=dict(msg.live_unavailable),
        unavailable=dict(msg.unavailable),
        labels=dict(msg.labels),
    )


def node_to_pb(node: Node) -> pb.Node:
    return pb.Node(
        facts=facts_to_pb(node.facts),
        state=_NODE_STATE_TO_PB[node.state],
        last_heartbeat=node.last_heartbeat,
        allocated=limits_to_pb(node.allocated),
        container_count=node.container_count,
        unmanaged_containers=list(node.unmanaged_containers),
        health=node.health,
        history=list(node.history),
        cordoned=node.cordoned,
    )


def node_from_pb(msg: pb.Node) -> Node:
    return Node(
        facts=facts_from_pb(msg.facts),
        state=_NODE_STATE_FROM_PB.get(msg.state, NodeState.SUSPECT),
        last_heartbeat=msg.last_heartbeat,
        allocated=limits_from_pb(msg.allocated),
        container_count=msg.container_count,
        unmanaged_containers=tuple(msg.unmanaged_containers),
        health=msg.health,
        history=tuple(msg.history),
        cordoned=msg.cordoned,
    )


def operation_to_pb(op) -> pb.Operation:
    """controller.model.Operation -> protobuf (values of params/result JSON-encoded)."""
    import json

    return pb.Operation(
        id=op.id,
        kind=op.kind,
        container=op.container,
        state=op.state.value,
        params={k: json.dumps(v) for k, v in op.params.items()},
        steps=[
            pb.OperationStep(name=s.name, state=s.state.value, started_at=s.started_at,
                             finished_at=s.finished_at, detail=s.detail)  # fmt: skip
            for s in op.steps
        ],
        progress=pb.OperationProgress(
            phase=op.progress.phase, bytes_done=op.progress.bytes_done, bytes_total=op.progress.bytes_total,
            rate_bps=op.progress.rate_bps, eta_s=op.progress.eta_s, message=op.progress.message,
        ),  # fmt: skip
        timings_ms=op.timings,
        result={k: json.dumps(v) for k, v in op.result.items()},
        error=op.error,
        cancel_requested=op.cancel_requested,
        created_at=op.created_at,
        updated_at=op.updated_at,
    )


def exec_event_to_pb(event: Output | Exited, message_type):
    """One event of an exec as a message of its stream: the agent's ExecResponse or the
    controller's ExecContainerResponse (the same shape)."""
    if isinstance(event, Exited):
        return message_type(exit=message_type.Exit(exit_code=event.returncode, timed_out=event.timed_out))
    return message_type(stdout=event.data) if event.fd == STDOUT else message_type(stderr=event.data)


def exec_event_from_pb(msg) -> Output | Exited:
    kind = msg.WhichOneof("event")
    if kind == "exit":
        return Exited(msg.exit.exit_code, timed_out=msg.exit.timed_out)
    if kind == "stdout":
        return Output(STDOUT, msg.stdout)
    if kind == "stderr":
        return Output(STDERR, msg.stderr)
    raise CorralError("an exec stream sent an empty message")


def event_to_pb(event) -> pb.Event:
    return pb.Event(seq=event.seq, at=event.at, kind=event.kind, message=event.message, node=event.node,
                    container=event.container, operation=event.op, fields=event.fields)  # fmt: skip


# -- for API clients (corral.client): operations, events, leases, resolutions as dataclasses --


def operation_from_pb(msg: pb.Operation) -> Operation:
    """protobuf -> corral.model.Operation (params/result JSON-decoded; a value that is not
    JSON stays the string it was)."""
    return Operation(
        id=msg.id,
        kind=msg.kind,
        container=msg.container,
        state=msg.state,
        params={k: _json_value(v) for k, v in msg.params.items()},
        steps=tuple(
            OperationStep(name=s.name, state=s.state, started_at=s.started_at, finished_at=s.finished_at,
                          detail=s.detail)  # fmt: skip
            for s in msg.steps
        ),
        progress=OperationProgress(
            phase=msg.progress.phase, bytes_done=msg.progress.bytes_done, bytes_total=msg.progress.bytes_total,
            rate_bps=msg.progress.rate_bps, eta_s=msg.progress.eta_s, message=msg.progress.message,
        ),  # fmt: skip
        timings_ms=dict(msg.timings_ms),
        result={k: _json_value(v) for k, v in msg.result.items()},
        error=msg.error,
        cancel_requested=msg.cancel_requested,
        created_at=msg.created_at,
        updated_at=msg.updated_at,
    )


def _json_value(text: str) -> Any:
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


def event_from_pb(msg: pb.Event) -> Event:
    return Event(seq=msg.seq, at=msg.at, kind=msg.kind, message=msg.message, node=msg.node,
                 container=msg.container, operation=msg.operation, fields=dict(msg.fields))  # fmt: skip


def lease_from_pb(msg) -> Lease:
    """controller's AcquireLeaseResponse -> Lease."""
    return Lease(granted=msg.granted, holder=msg.holder, seconds_left=msg.seconds_left)


def resolution_from_pb(msg) -> Resolution:
    """controller's ResolveContainerResponse -> Resolution."""
    return Resolution(name=msg.name, keep=msg.keep, remove=tuple(msg.remove), reason=msg.reason, done=msg.done)


def node_check_from_pb(msg) -> NodeCheck:
    return NodeCheck(node=msg.node, ok=msg.ok, detail=msg.detail)


def stats_to_pb(stats: ContainerStats) -> pb.ContainerStats:
    values = {f.name: getattr(stats, f.name) for f in fields(ContainerStats)}
    return pb.ContainerStats(**{**values, "state": _STATE_TO_PB[stats.state]})


def stats_from_pb(msg: pb.ContainerStats) -> ContainerStats:
    values = {f.name: getattr(msg, f.name) for f in fields(ContainerStats)}
    return ContainerStats(**{**values, "state": _STATE_FROM_PB.get(msg.state, ContainerState.UNKNOWN)})


def exec_start_to_pb(start: ExecStart) -> pb.ExecInput:
    msg = pb.ExecInput.Start(name=start.name, argv=list(start.argv), env=dict(start.env),
                             timeout_seconds=start.timeout, tty=start.tty)  # fmt: skip
    if start.size is not None:
        msg.size.CopyFrom(pb.ExecInput.TerminalSize(rows=start.size.rows, cols=start.size.cols))
    return pb.ExecInput(start=msg)


def exec_input_to_pb(event: ExecInputEvent) -> pb.ExecInput:
    if isinstance(event, StdinData):
        return pb.ExecInput(stdin=event.data)
    if isinstance(event, StdinClosed):
        return pb.ExecInput(stdin_closed=True)
    if isinstance(event, Resize):
        return pb.ExecInput(resize=pb.ExecInput.TerminalSize(rows=event.size.rows, cols=event.size.cols))
    return pb.ExecInput(signal=event.signum)


def exec_start_from_pb(msg: pb.ExecInput) -> ExecStart:
    """The first message of an interactive exec: its start (InvalidArgument if it is not)."""
    if msg.WhichOneof("event") != "start":
        raise InvalidArgument("an interactive exec's first message must be its start")
    s = msg.start
    size = TerminalSize(s.size.rows, s.size.cols) if s.HasField("size") else None
    return ExecStart(s.name, tuple(s.argv), dict(s.env), s.timeout_seconds, s.tty, size)


def exec_input_from_pb(msg: pb.ExecInput) -> ExecInputEvent:
    kind = msg.WhichOneof("event")
    if kind == "stdin":
        return StdinData(msg.stdin)
    if kind == "stdin_closed":
        return StdinClosed()
    if kind == "resize":
        return Resize(TerminalSize(msg.resize.rows, msg.resize.cols))
    if kind == "signal":
        return SendSignal(msg.signal)
    raise InvalidArgument(f"an interactive exec got {'a second start' if kind == 'start' else 'an empty message'}")
