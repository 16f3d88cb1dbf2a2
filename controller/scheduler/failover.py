"""Where a lost node's HA containers go: a pure decision with its reasons.

Given the fleet (nodes with what is allocated on them) and the HA containers of
a lost node, pick a target for each: highest priority first, each placed by
placement's own decision (ready nodes that can take it, its HA group kept apart
where possible, the policy's strategy). Each choice adds the container to its
target before the next is placed, so a plan never overfills a node.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from controller.scheduler.placement import PlacementPolicy, PlacementRequest, Snapshot, decide
from corral.errors import NoCapacity
from corral.labels import Constraint
from corral.model import Container, Node


@dataclass(frozen=True)
class FailoverChoice:
    container: str
    target: str | None  # None: no node can take it (the reason says why)
    reason: str


def plan_failover(
    lost: Sequence[Container], nodes: Sequence[Node], placed: Sequence[Container], policy: PlacementPolicy,
    cordoned: frozenset[str] = frozenset(),
) -> list[FailoverChoice]:
    """`lost`: the HA containers to move; `placed`: every container on the other nodes (for groups);
    `cordoned`: nodes that take no new placements."""
    groups: dict[str, set[str]] = {}  # node -> HA groups it already holds
    for ct in placed:
        if ct.ha_group:
            groups.setdefault(ct.node, set()).add(ct.ha_group)
    lost_nodes = {ct.node for ct in lost}
    fleet = {n.name: n for n in nodes if n.name not in lost_nodes}
    plan = []
    for ct in sorted(lost, key=lambda c: (-c.ha_priority, c.name)):
        constraints = tuple(Constraint.parse(c) for c in ct.constraints)
        request = PlacementRequest(ct.name, ct.limits, "", ct.storage, constraints, group=ct.ha_group)
        snapshot = Snapshot(groups={n: frozenset(g) for n, g in groups.items()}, cordoned=cordoned)
        try:
            chosen = decide(request, list(fleet.values()), policy, snapshot)
        except NoCapacity as exc:
            detail = exc.message.partition(": ")[2] if fleet else "no other node"
            plan.append(FailoverChoice(ct.name, None, f"no node can take it: {detail}"))
            continue
        plan.append(FailoverChoice(ct.name, chosen.node, chosen.reason))
        best = fleet[chosen.node]
        fleet[best.name] = replace(best, allocated=best.allocated + ct.limits, container_count=best.container_count + 1)
        if ct.ha_group:
            groups.setdefault(best.name, set()).add(ct.ha_group)
    return plan
