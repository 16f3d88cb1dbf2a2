"""The controller's Prometheus metrics (`metrics_listen`, README, Observing).

Measured at each scrape: nodes by state, containers by observed and by desired state. Counted as
things happen: heartbeats handled and their handling time (controller/service.py), and, from the
event bus (controller/events.py), operations by kind and outcome with their durations, migration
downtime (the `downtime` timing the migration engine records) and failovers.
"""

from __future__ import annotations

from collections import Counter as Tally

import structlog
from prometheus_client import Counter, Histogram
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from controller.events import EventBus, Lagged
from controller.fleet import Fleet
from controller.health.registry import NodeRegistry
from controller.model import OpState
from controller.operations.engine import Engine
from controller.operations.steps import OpKind
from corral.errors import CorralError
from corral.model import ContainerState, DesiredState, NodeState

log = structlog.get_logger("corral.controller.metrics")

HEARTBEATS = Counter("corral_controller_heartbeats", "Heartbeats handled")
HEARTBEAT_SECONDS = Histogram(
    "corral_controller_heartbeat_handling_seconds", "Time the controller took to handle a heartbeat",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)  # fmt: skip
OPERATIONS = Counter("corral_controller_operations", "Operations finished, by kind and outcome", ["kind", "outcome"])
OPERATION_SECONDS = Histogram(
    "corral_controller_operation_duration_seconds", "From an operation's submission to its end",
    ["kind", "outcome"], buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)  # fmt: skip
MIGRATION_DOWNTIME = Histogram(
    "corral_controller_migration_downtime_seconds", "How long a moved container did not run (live migrations "
    "and failovers that succeeded)", ["kind"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
)  # fmt: skip
FAILOVERS = Counter("corral_controller_failovers", "Failover operations finished, by outcome", ["outcome"])

_FINISHED = {s.value for s in OpState if s.finished}


class ControllerMetrics:
    def __init__(self, fleet: Fleet, nodes: NodeRegistry, engine: Engine, events: EventBus) -> None:
        self.fleet = fleet
        self.nodes = nodes
        self.engine = engine
        self.events = events

    async def gather(self) -> list[Metric]:
        """The fleet's states now (corral.metrics: at each scrape, on the event loop)."""
        nodes = GaugeMetricFamily("corral_controller_nodes", "Registered nodes by state", labels=["state"])
        _by(nodes, [n.state for n in self.nodes.all()], NodeState)
        containers = await self.fleet.list()
        observed = GaugeMetricFamily("corral_controller_containers", "Containers by observed state", labels=["state"])
        _by(observed, [c.state for c in containers], ContainerState)
        desired = GaugeMetricFamily("corral_controller_containers_desired", "Containers by desired state",
                                    labels=["state"])  # fmt: skip
        _by(desired, [c.desired_state for c in containers], DesiredState)
        return [nodes, observed, desired]

    async def follow(self) -> None:
        """Count operations as the event bus tells of their ends, until cancelled."""
        since = 0
        while True:
            try:
                async for event in self.events.watch(since):
                    since = event.seq
                    if event.kind == "operation" and event.fields.get("state") in _FINISHED and event.op:
                        await self._finished(event.op)
            except Lagged:
                continue  # resume after the last seen; the missed ones are in the kept events

    async def _finished(self, op_id: str) -> None:
        try:
            op = await self.engine.get(op_id)
        except CorralError as exc:
            log.warning("an operation that ended cannot be read", op=op_id, error=exc.message)
            return
        outcome = op.state.value
        OPERATIONS.labels(op.kind, outcome).inc()
        OPERATION_SECONDS.labels(op.kind, outcome).observe(max(0.0, op.updated_at - op.created_at))
        if op.kind == OpKind.FAILOVER:
            FAILOVERS.labels(outcome).inc()
        if op.state == OpState.SUCCEEDED and "downtime" in op.timings:
            MIGRATION_DOWNTIME.labels(op.kind).observe(op.timings["downtime"] / 1000)


def _by(family: GaugeMetricFamily, values: list, states) -> None:
    """One sample a state: every state of the enum (0 where none), so a series never vanishes."""
    counts = Tally(values)
    for state in states:
        family.add_metric([state.value], counts.get(state, 0))

