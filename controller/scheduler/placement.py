"""Placement v0: where a new container goes.

A pure function of a snapshot of the nodes; it decides and explains, it does
nothing. A node fits when it is ready and has the memory, CPU and disk the
container asks for; among those the one with the most free memory wins
(spreading load), then the one with fewest containers, then by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from corral.errors import FailedPrecondition, NoCapacity, NotFound
from corral.model import Limits, Node, NodeState
from corral.units import format_cpus, format_size


@dataclass(frozen=True)
class PlacementRequest:
    container: str
    limits: Limits
    node: str = ""
    storage: str = "dir"


@dataclass(frozen=True)
class PlacementPolicy:
    # Sum of CPU quotas a node may carry, as a multiple of its CPUs.
    cpu_overcommit: float = 4.0
    # Sum of memory limits a node may carry, as a multiple of its memory.
    memory_overcommit: float = 1.0


@dataclass(frozen=True)
class Placement:
    node: str
    reason: str


def why_not(node: Node, request: PlacementRequest, policy: PlacementPolicy) -> str | None:
    """None if `node` can take the request, else the reason it cannot."""
    facts, want = node.facts, request.limits
    if node.state != NodeState.READY:
        return f"node is {node.state.value}"
    if request.storage and facts.storage_drivers and request.storage not in facts.storage_drivers:
        why = facts.unavailable.get(f"storage-{request.storage}")  # the agent's reason (corral/programs.py)
        return f"no {request.storage!r} storage" + (f" ({why})" if why else "")
    memory_free = int(facts.memory_bytes * policy.memory_overcommit) - node.allocated.memory_bytes
    if want.memory_bytes > memory_free:
        return f"needs {format_size(want.memory_bytes)} memory, {format_size(max(memory_free, 0))} unallocated"
    if want.cpu_millis > facts.cpus * 1000:
        return f"needs {format_cpus(want.cpu_millis)} CPUs, has {facts.cpus}"
    cpu_free = int(facts.cpus * 1000 * policy.cpu_overcommit) - node.allocated.cpu_millis
    if want.cpu_millis > cpu_free:
        return f"needs {format_cpus(want.cpu_millis)} CPUs, {format_cpus(max(cpu_free, 0))} unallocated"
    if want.disk_bytes > facts.disk_free_bytes:
        return f"needs {format_size(want.disk_bytes)} disk, {format_size(facts.disk_free_bytes)} free"
    return None


def place(request: PlacementRequest, nodes: Sequence[Node], policy: PlacementPolicy = PlacementPolicy()) -> Placement:
    if request.node:
        chosen = next((n for n in nodes if n.name == request.node), None)
        if chosen is None:
            raise NotFound(f"node {request.node!r} is not registered")
        reason = why_not(chosen, request, policy)
        if reason is not None:
            if chosen.state != NodeState.READY:
                raise FailedPrecondition(f"node {request.node!r} cannot take {request.container!r}: {reason}")
            raise NoCapacity(f"node {request.node!r} cannot take {request.container!r}: {reason}")
        return Placement(chosen.name, "requested with --node")
    if not nodes:
        raise NoCapacity("no nodes are registered")
    refusals = {n.name: why_not(n, request, policy) for n in nodes}
    fits = [n for n in nodes if refusals[n.name] is None]
    if not fits:
        detail = "; ".join(f"{name}: {why}" for name, why in sorted(refusals.items()))
        raise NoCapacity(f"no node can take {request.container!r}: {detail}")
    best = min(
        fits,
        key=lambda n: (-(n.facts.memory_bytes - n.allocated.memory_bytes), n.container_count, n.name),
    )
    return Placement(best.name, f"most unallocated memory of {len(fits)} fitting node(s)")
