"""Placement: where a container goes, a pure function of a snapshot of the fleet.

Filter, then rank (as Nomad's scheduler does). A node is *feasible* when it is
ready and not cordoned, is not excluded (a migration's source, a lost node), has
the storage, matches every constraint on its labels, and has room for the
container's memory, CPU and disk: capacity less the host's reservation, times the
overcommit ratio, less what is allocated. Members of a group are kept on
different nodes (anti-affinity); they share one only when no other node fits.
Then the strategy ranks what is left: `spread` picks the least loaded node,
`binpack` the most loaded (load: the larger of its memory and CPU fractions with
the container added); ties go to fewer containers, then the name. The decision
names the node and says why, and why each other node was not chosen.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from corral.errors import FailedPrecondition, NoCapacity, NotFound
from corral.labels import Constraint
from corral.model import Limits, Node, NodeState
from corral.units import format_cpus, format_size


class Strategy(enum.StrEnum):
    SPREAD = "spread"
    BINPACK = "binpack"


@dataclass(frozen=True)
class PlacementRequest:
    container: str
    limits: Limits
    node: str = ""  # pinned by the operator (--node / --to)
    storage: str = "dir"
    constraints: tuple[Constraint, ...] = ()
    group: str = ""  # kept apart from other members (anti-affinity)
    exclude: frozenset[str] = frozenset()  # never these (a migration's source, a lost node)


@dataclass(frozen=True)
class PlacementPolicy:
    # Sum of CPU quotas a node may carry, as a multiple of its CPUs (after the reservation).
    cpu_overcommit: float = 4.0
    # Sum of memory limits a node may carry, as a multiple of its memory (after the reservation).
    memory_overcommit: float = 1.0
    strategy: Strategy = Strategy.SPREAD
    # Kept for the host itself on every node: never allocated to containers.
    reserved: Limits = field(default_factory=Limits)
    # Refuse a placement that would leave a node whose HA containers could not all fail over.
    keep_n_plus_1: bool = False


@dataclass(frozen=True)
class Placement:
    node: str
    reason: str
    rejected: Mapping[str, str] = field(default_factory=dict)  # node -> why not


@dataclass(frozen=True)
class Snapshot:
    """What placement knows of each node beyond its Node: the groups it holds, whether cordoned."""

    groups: Mapping[str, frozenset[str]] = field(default_factory=dict)  # node -> groups placed there
    cordoned: frozenset[str] = frozenset()


def capacity(node: Node, policy: PlacementPolicy) -> Limits:
    """What containers may be allocated on `node` in all (not what is left)."""
    memory, cpu = _room(node, policy)
    return Limits(memory_bytes=memory, cpu_millis=cpu)


def _room(node: Node, policy: PlacementPolicy) -> tuple[int, int]:
    # capacity() without building a Limits: placement calls it for every node of every decision.
    f, reserved = node.facts, policy.reserved
    memory = f.memory_bytes - reserved.memory_bytes
    cpu = f.cpus * 1000 - reserved.cpu_millis
    return (int(memory * policy.memory_overcommit) if memory > 0 else 0,
            int(cpu * policy.cpu_overcommit) if cpu > 0 else 0)  # fmt: skip


def why_not(node: Node, request: PlacementRequest, policy: PlacementPolicy,
            snapshot: Snapshot = Snapshot()) -> str | None:  # fmt: skip
    """None if `node` can take the request, else the reason it cannot (groups aside)."""
    facts, want = node.facts, request.limits
    if node.name in request.exclude:
        return "excluded (it is where the container is, or is lost)"
    if node.state != NodeState.READY:
        return f"node is {node.state.value}"
    if node.name in snapshot.cordoned:
        return "cordoned (no new placements)"
    if request.storage and facts.storage_drivers and request.storage not in facts.storage_drivers:
        why = facts.unavailable.get(f"storage-{request.storage}")  # the agent's reason (corral/programs.py)
        return f"no {request.storage!r} storage" + (f" ({why})" if why else "")
    labels = facts.labels
    for c in request.constraints:
        if not c.allows(labels):
            has = labels.get(c.key)
            return f"constraint {c} not met ({c.key}={has} here)" if has is not None else \
                f"constraint {c} not met (no {c.key} label)"  # fmt: skip
    room_memory, room_cpu = _room(node, policy)
    memory_free = room_memory - node.allocated.memory_bytes
    if want.memory_bytes > memory_free:
        return f"needs {format_size(want.memory_bytes)} memory, {format_size(max(memory_free, 0))} unallocated"
    if want.cpu_millis > facts.cpus * 1000:
        return f"needs {format_cpus(want.cpu_millis)} CPUs, has {facts.cpus}"
    cpu_free = room_cpu - node.allocated.cpu_millis
    if want.cpu_millis > cpu_free:
        return f"needs {format_cpus(want.cpu_millis)} CPUs, {format_cpus(max(cpu_free, 0))} unallocated"
    if want.disk_bytes > facts.disk_free_bytes:
        return f"needs {format_size(want.disk_bytes)} disk, {format_size(facts.disk_free_bytes)} free"
    return None


def load_with(node: Node, want: Limits, policy: PlacementPolicy) -> float:
    """The node's load once `want` is added: the larger of its memory and CPU fractions."""
    room_memory, room_cpu = _room(node, policy)
    memory = (node.allocated.memory_bytes + want.memory_bytes) / room_memory if room_memory else 1.0
    cpu = (node.allocated.cpu_millis + want.cpu_millis) / room_cpu if room_cpu else 1.0
    return max(memory, cpu)


def decide(request: PlacementRequest, nodes: Sequence[Node], policy: PlacementPolicy = PlacementPolicy(),
           snapshot: Snapshot = Snapshot()) -> Placement:  # fmt: skip
    """The node for `request`, with the reasons; NoCapacity (with each node's reason) if none."""
    if request.node:
        return _pinned(request, nodes, policy, snapshot)
    if not nodes:
        raise NoCapacity("no nodes are registered")
    rejected = {n.name: why for n in nodes if (why := why_not(n, request, policy, snapshot)) is not None}
    fits = [n for n in nodes if n.name not in rejected]
    if not fits:
        detail = "; ".join(f"{name}: {why}" for name, why in sorted(rejected.items()))
        raise NoCapacity(f"no node can take {request.container!r}: {detail}")
    pool, apart = fits, ""
    if request.group:
        alone = [n for n in fits if request.group not in snapshot.groups.get(n.name, ())]
        if alone:
            for n in fits:
                if request.group in snapshot.groups.get(n.name, ()):
                    rejected[n.name] = f"already holds a member of group {request.group}"
            pool, apart = alone, f", none holding group {request.group}"
        else:
            apart = f"; every fitting node already holds group {request.group}"
    loads = {n.name: load_with(n, request.limits, policy) for n in pool}
    sign = 1 if policy.strategy == Strategy.SPREAD else -1
    best = min(pool, key=lambda n: (sign * loads[n.name], sign * n.container_count, n.name))
    for n in pool:
        if n is not best:
            rejected[n.name] = f"{'more' if sign > 0 else 'less'} loaded ({loads[n.name]:.0%} with it)"
    how = "least" if sign > 0 else "most"
    reason = (f"{policy.strategy.value}: the {how} loaded ({loads[best.name]:.0%} with it) of {len(pool)} "
              f"fitting node(s){apart}")  # fmt: skip
    return Placement(best.name, reason, rejected)


def _pinned(request: PlacementRequest, nodes: Sequence[Node], policy: PlacementPolicy,
            snapshot: Snapshot) -> Placement:  # fmt: skip
    chosen = next((n for n in nodes if n.name == request.node), None)
    if chosen is None:
        raise NotFound(f"node {request.node!r} is not registered")
    reason = why_not(chosen, request, policy, snapshot)
    if reason is not None:
        if chosen.state != NodeState.READY or chosen.name in snapshot.cordoned:
            raise FailedPrecondition(f"node {request.node!r} cannot take {request.container!r}: {reason}")
        raise NoCapacity(f"node {request.node!r} cannot take {request.container!r}: {reason}")
    return Placement(chosen.name, "requested with --node")


def place(request: PlacementRequest, nodes: Sequence[Node], policy: PlacementPolicy = PlacementPolicy(),
          snapshot: Snapshot = Snapshot()) -> Placement:  # fmt: skip
    return decide(request, nodes, policy, snapshot)
