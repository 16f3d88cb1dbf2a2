"""Domain objects shared by the agent and the controller.

Protobuf stays at the API edge (`corral.api.convert`); everything inside the
daemons works with these typed dataclasses.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any


class ContainerState(enum.Enum):
    CREATING = "creating"
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    FROZEN = "frozen"
    DESTROYING = "destroying"
    UNKNOWN = "unknown"
    ERROR = "error"


class DesiredState(enum.Enum):
    """What the operator asked for; only operations and lifecycle requests change it."""

    RUNNING = "running"
    STOPPED = "stopped"


class NodeState(enum.Enum):
    READY = "ready"
    SUSPECT = "suspect"  # silent: maybe cut off, maybe gone; its lease may still run
    DEAD = "dead"  # silent past its lease and a margin
    FENCED = "fenced"  # proven down by a fence command


@dataclass(frozen=True)
class Limits:
    """Resource limits; 0 means not limited."""

    memory_bytes: int = 0
    cpu_millis: int = 0
    cpu_shares: int = 0
    pids_max: int = 0
    disk_bytes: int = 0

    def merged(self, update: "Limits") -> "Limits":
        """These limits with every non-zero field of `update` applied."""
        changes = {k: v for k, v in update.__dict__.items() if v}
        return replace(self, **changes)

    def __add__(self, other: "Limits") -> "Limits":
        return Limits(
            self.memory_bytes + other.memory_bytes,
            self.cpu_millis + other.cpu_millis,
            self.cpu_shares + other.cpu_shares,
            self.pids_max + other.pids_max,
            self.disk_bytes + other.disk_bytes,
        )


@dataclass(frozen=True)
class NetworkAttachment:
    ipv4_cidr: str = ""
    gateway: str = ""
    mac: str = ""

    @property
    def ipv4(self) -> str:
        return self.ipv4_cidr.split("/", 1)[0]


@dataclass(frozen=True)
class Container:
    """A container as the fleet records it.

    Desired state (node, desired_state, limits, ...) changes only through requests and
    operations, each a compare-and-set on `revision`. Observed state (`state`, `init_pid`,
    `observed_at`) is what the host last reported, written beside it by heartbeats.
    `in_doubt` says why the controller cannot tell whether a copy runs on one of
    `doubt_nodes`: nothing starts the container until that is settled.
    """

    name: str
    node: str
    template: str
    state: ContainerState
    limits: Limits = field(default_factory=Limits)
    network: NetworkAttachment = field(default_factory=NetworkAttachment)
    storage: str = "dir"
    init_pid: int = 0
    created_at: float = 0.0
    message: str = ""
    volume_generation: int = 0
    desired_state: DesiredState = DesiredState.STOPPED
    observed_at: float = 0.0
    revision: int = 0
    in_doubt: str = ""
    doubt_nodes: tuple[str, ...] = ()
    # High availability: its host kills it when it loses its lease (needs shared storage).
    ha: bool = False
    ha_priority: int = 0
    ha_group: str = ""
    # Observed: restarts its host made after it stopped unasked, in the host's restart window.
    ha_restarts: int = 0
    # Desired side: moves to another node after its host gave up restarting it, and why it
    # now waits for the operator once those ran out too ("" while it does not).
    ha_relocations: int = 0
    ha_failed: str = ""
    # Placement: label constraints ("zone=a", "ssd!=yes") its node must meet; its anti-affinity group.
    constraints: tuple[str, ...] = ()
    group: str = ""
    # Observed: stopped with its processes saved on its node (`ct stop --stateful`); the next
    # start restores them.
    stateful_stopped: bool = False


@dataclass(frozen=True)
class Snapshot:
    """One snapshot of a container, kept on its node: its disk, and its processes if stateful."""

    name: str
    created_at: float
    stateful: bool = False
    size_bytes: int = 0  # what it holds on the node's disk


@dataclass(frozen=True)
class NodeFacts:
    name: str
    address: str
    cpus: int = 0
    memory_bytes: int = 0
    memory_available_bytes: int = 0
    disk_bytes: int = 0
    disk_free_bytes: int = 0
    kernel: str = ""
    lxc_version: str = ""
    criu_version: str = ""
    criu_ok: bool = False
    criu_detail: str = ""
    agent_version: str = ""
    storage_drivers: tuple[str, ...] = ()
    live_strategies: tuple[str, ...] = ()
    live_unavailable: dict[str, str] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)  # capability -> why not (corral/programs.py)
    labels: dict[str, str] = field(default_factory=dict)  # the operator's, from the agent's config (zone: a)


@dataclass(frozen=True)
class Node:
    facts: NodeFacts
    state: NodeState
    last_heartbeat: float
    allocated: Limits = field(default_factory=Limits)
    container_count: int = 0
    unmanaged_containers: tuple[str, ...] = ()  # held by the node, unknown to the fleet's records
    health: str = ""  # why it is not ready, for the operator
    history: tuple[str, ...] = ()  # what happened to it lately, oldest first
    cordoned: bool = False  # no new placements

    @property
    def name(self) -> str:
        return self.facts.name


MIN_MEMORY_BYTES = 16 << 20


def validate_limits(limits: Limits) -> Limits:
    """Refuse limits no container could run with; 0 (unlimited) is always fine."""
    from corral.errors import InvalidArgument

    if limits.memory_bytes and limits.memory_bytes < MIN_MEMORY_BYTES:
        raise InvalidArgument(f"memory limit {limits.memory_bytes} bytes is below the minimum of 16M")
    if limits.cpu_shares and not 2 <= limits.cpu_shares <= 262144:
        raise InvalidArgument(f"cpu shares {limits.cpu_shares} out of range 2..262144")
    if limits.cpu_millis and limits.cpu_millis < 10:
        raise InvalidArgument(f"CPU quota {limits.cpu_millis / 1000:g} is below the minimum of 0.01 CPU")
    if limits.disk_bytes and limits.disk_bytes < MIN_MEMORY_BYTES:
        raise InvalidArgument(f"disk size {limits.disk_bytes} bytes is below the minimum of 16M")
    return limits


# -- operations and events as API clients see them (corral.client; corral.api.convert) --------

OPERATION_FINISHED = frozenset({"succeeded", "failed", "cancelled"})


@dataclass(frozen=True)
class OperationStep:
    name: str
    state: str  # started, done, failed, undone
    started_at: float = 0.0
    finished_at: float = 0.0
    detail: str = ""


@dataclass(frozen=True)
class OperationProgress:
    phase: str = ""
    bytes_done: int = 0
    bytes_total: int = 0
    rate_bps: float = 0.0
    eta_s: float = -1.0  # seconds left, -1 when unknown
    message: str = ""


@dataclass(frozen=True)
class Operation:
    """A long action (create, migrate, evacuate, failover) as the controller reports it.
    `params` and `result` hold the decoded JSON values the API carries."""

    id: str
    kind: str
    container: str
    state: str  # pending, running, rolling-back, succeeded, failed, cancelled
    params: dict[str, Any] = field(default_factory=dict)
    steps: tuple[OperationStep, ...] = ()
    progress: OperationProgress = field(default_factory=OperationProgress)
    timings_ms: dict[str, float] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    cancel_requested: bool = False
    created_at: float = 0.0
    updated_at: float = 0.0

    @property
    def finished(self) -> bool:
        return self.state in OPERATION_FINISHED

    @property
    def succeeded(self) -> bool:
        return self.state == "succeeded"


@dataclass(frozen=True)
class Event:
    """Something that happened in the fleet; `seq` numbers events from the controller's start."""

    seq: int
    at: float
    kind: str  # node-state, operation, container-doubt, ...
    message: str
    node: str = ""
    container: str = ""
    operation: str = ""
    fields: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Lease:
    """A named lease's answer: granted to the asker or not, who holds it, for how long."""

    granted: bool
    holder: str
    seconds_left: float


@dataclass(frozen=True)
class Resolution:
    """How a container in doubt is (or would be) settled: the copy kept, those removed."""

    name: str
    keep: str
    remove: tuple[str, ...]
    reason: str
    done: bool


@dataclass(frozen=True)
class NodeCheck:
    """N+1 for one node: would its HA containers fit on the others if it died now."""

    node: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class ContainerStats:
    """What one container uses and how often it hit its limits, from its host's cgroup counters
    (cumulative since it started) and its storage driver; limits 0 = not limited."""

    name: str
    node: str
    state: ContainerState
    sampled_at: float  # wall clock of its host
    cpu_usage_usec: int = 0
    cpu_throttled_count: int = 0  # periods held back by the CPU quota
    cpu_throttled_usec: int = 0
    cpu_limit_millis: int = 0
    memory_bytes: int = 0
    memory_limit_bytes: int = 0
    memory_high_events: int = 0  # reached memory.high (cgroup v2)
    memory_max_events: int = 0  # reached the limit (v2 memory.events max; v1 memory.failcnt)
    memory_oom_events: int = 0
    memory_oom_kill_events: int = 0
    pids: int = 0
    pids_limit: int = 0
    pids_max_events: int = 0  # forks refused at the limit
    disk_used_bytes: int = 0
    disk_limit_bytes: int = 0
    message: str = ""  # what could not be measured, and why

    def cpu_rate(self, earlier: "ContainerStats") -> float | None:
        """CPUs used on average between `earlier` and this sample (1.0 = one CPU), or None."""
        elapsed = self.sampled_at - earlier.sampled_at
        if elapsed <= 0 or self.cpu_usage_usec < earlier.cpu_usage_usec:
            return None
        return (self.cpu_usage_usec - earlier.cpu_usage_usec) / 1e6 / elapsed
