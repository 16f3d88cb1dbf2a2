"""Where a lost node's HA containers go: a pure decision with its reasons.

Given the fleet (nodes with what is allocated on them) and the HA containers of
a lost node, pick a target for each: highest priority first; only ready nodes
that can take the container (placement's own checks: storage, capacity);
containers of one HA group kept on different nodes where possible; then the
node with the most unallocated memory. Each choice adds the container to its
target before the next is placed, so a plan never overfills a node.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from controller.scheduler.placement import PlacementPolicy, PlacementRequest, why_not
from corral.model import Container, Node


@dataclass(frozen=True)
class FailoverChoice:
    container: str
    target: str | None  # None: no node can take it (the reason says why)
    reason: str


def plan_failover(
    lost: Sequence[Container], nodes: Sequence[Node], placed: Sequence[Container], policy: PlacementPolicy
) -> list[FailoverChoice]:
    """`lost`: the HA containers to move; `placed`: every container on the other nodes (for groups)."""
    groups: dict[str, set[str]] = {}  # node -> HA groups it already holds
    for ct in placed:
        if ct.ha_group:
            groups.setdefault(ct.node, set()).add(ct.ha_group)
    lost_nodes = {ct.node for ct in lost}
    fleet = {n.name: n for n in nodes if n.name not in lost_nodes}
    plan = []
    for ct in sorted(lost, key=lambda c: (-c.ha_priority, c.name)):
        request = PlacementRequest(ct.name, ct.limits, "", ct.storage)
        refusals = {name: why_not(n, request, policy) for name, n in fleet.items()}
        fits = [n for name, n in fleet.items() if refusals[name] is None]
        if not fits:
            detail = "; ".join(f"{name}: {why}" for name, why in sorted(refusals.items())) or "no other node"
            plan.append(FailoverChoice(ct.name, None, f"no node can take it: {detail}"))
            continue
        apart = [n for n in fits if not ct.ha_group or ct.ha_group not in groups.get(n.name, set())]
        pool = apart or fits
        best = min(pool, key=lambda n: (-(n.facts.memory_bytes - n.allocated.memory_bytes), n.container_count, n.name))
        why = f"most unallocated memory of {len(pool)} node(s) that can take it"
        if ct.ha_group:
            why += (f", none holding group {ct.ha_group}" if apart else
                    f"; every such node already holds group {ct.ha_group}")  # fmt: skip
        plan.append(FailoverChoice(ct.name, best.name, why))
        fleet[best.name] = replace(best, allocated=best.allocated + ct.limits, container_count=best.container_count + 1)
        if ct.ha_group:
            groups.setdefault(best.name, set()).add(ct.ha_group)
    return plan
