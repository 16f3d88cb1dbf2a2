"""Planning host maintenance, pure: evacuating a node, rebalancing the fleet, N+1 checks.

Each function takes a snapshot (nodes with their allocations, the containers) and
returns a plan with its reasons; the operations engine carries plans out. Every
move is placed by placement's own decision (constraints, groups, capacity), and
each one is added to its target before the next is placed, so a plan never
overfills a node.

- Evacuation: every container of the node goes elsewhere; a running one live
  where both hosts can, else cold only if the operator allowed it; a stopped one
  moves cold (nothing runs, nothing is lost). What cannot go stays, with why.
- Rebalance: the fewest moves, most loaded node first, that bring every node's
  load within `band` of the fleet's mean; nothing is planned unless the spread
  exceeds `band` by `hysteresis` (so a fleet that is nearly balanced does not
  churn). Running containers that can move live go first.
- N+1: for each node, would its HA containers fit on the others if it died.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Sequence

from controller.scheduler.failover import plan_failover
from controller.scheduler.placement import (
    Placement,
    PlacementPolicy,
    PlacementRequest,
    Snapshot,
    decide,
    load_with,
)
from corral.errors import NoCapacity
from corral.labels import Constraint
from corral.model import Container, ContainerState, Limits, Node, NodeState


@dataclass(frozen=True)
class Move:
    container: str
    source: str
    target: str
    live: bool
    reason: str


@dataclass(frozen=True)
class Stuck:
    container: str
    reason: str


@dataclass(frozen=True)
class MovePlan:
    moves: tuple[Move, ...]
    stuck: tuple[Stuck, ...] = ()


def _request(ct: Container, exclude: Iterable[str] = ()) -> PlacementRequest:
    return PlacementRequest(ct.name, ct.limits, "", ct.storage, tuple(Constraint.parse(c) for c in ct.constraints),
                            ct.group, frozenset(exclude))  # fmt: skip


def _groups(containers: Iterable[Container]) -> dict[str, set[str]]:
    groups: dict[str, set[str]] = {}
    for ct in containers:
        if ct.group:
            groups.setdefault(ct.node, set()).add(ct.group)
    return groups


class _Fleet:
    """A working copy of the snapshot that moves update: allocations, counts, groups."""

    def __init__(self, nodes: Sequence[Node], containers: Sequence[Container], cordoned: frozenset[str]) -> None:
        self.nodes = {n.name: n for n in nodes}
        self.groups = _groups(containers)
        self.cordoned = cordoned

    def snapshot(self) -> Snapshot:
        return Snapshot({n: frozenset(g) for n, g in self.groups.items()}, self.cordoned)

    def move(self, ct: Container, source: str, target: str) -> None:
        src, dst = self.nodes[source], self.nodes[target]
        self.nodes[source] = replace(src, allocated=_minus(src.allocated, ct.limits),
                                     container_count=max(0, src.container_count - 1))  # fmt: skip
        self.nodes[target] = replace(dst, allocated=dst.allocated + ct.limits, container_count=dst.container_count + 1)
        if ct.group:
            self.groups.get(source, set()).discard(ct.group)
            self.groups.setdefault(target, set()).add(ct.group)


def _minus(a: Limits, b: Limits) -> Limits:
    return Limits(*(max(0, x - y) for x, y in zip(
        (a.memory_bytes, a.cpu_millis, a.cpu_shares, a.pids_max, a.disk_bytes),
        (b.memory_bytes, b.cpu_millis, b.cpu_shares, b.pids_max, b.disk_bytes))))  # fmt: skip


def can_move_live(ct: Container, source: Node, target: Node) -> bool:
    return ct.state == ContainerState.RUNNING and bool(source.facts.live_strategies) \
        and bool(target.facts.live_strategies)  # fmt: skip


def plan_evacuation(node: str, nodes: Sequence[Node], containers: Sequence[Container], policy: PlacementPolicy,
                    *, allow_cold: bool, cordoned: frozenset[str] = frozenset()) -> MovePlan:  # fmt: skip
    """Every container of `node` elsewhere. The node itself takes nothing new (as if cordoned)."""
    fleet = _Fleet(nodes, containers, cordoned | {node})
    moves, stuck = [], []
    # Big ones first: they are the hardest to fit.
    leaving = sorted((c for c in containers if c.node == node),
                     key=lambda c: (-c.limits.memory_bytes, -c.limits.cpu_millis, c.name))  # fmt: skip
    for ct in leaving:
        running = ct.state == ContainerState.RUNNING
        if ct.in_doubt:
            stuck.append(Stuck(ct.name, f"in doubt ({ct.in_doubt}): settle it first"))
            continue
        source = fleet.nodes[node]
        # A running container goes live where it can: only live-capable targets first.
        no_live = {n for n, target in fleet.nodes.items() if running and not can_move_live(ct, source, target)}
        try:
            chosen = decide(_request(ct, exclude={node} | no_live), list(fleet.nodes.values()), policy,
                            fleet.snapshot())  # fmt: skip
            live = running
        except NoCapacity as exc:
            if not running or not allow_cold:
                why = exc.message if not running else (f"runs, and no node can take it live ({exc.message}); "
                                                       "--allow-cold would stop it for the move")  # fmt: skip
                stuck.append(Stuck(ct.name, why))
                continue
            try:
                chosen = decide(_request(ct, exclude={node}), list(fleet.nodes.values()), policy, fleet.snapshot())
            except NoCapacity as exc2:
                stuck.append(Stuck(ct.name, exc2.message))
                continue
            live = False
        how = "live" if live else ("cold (stopped)" if not running else "cold (stop, move, start: allowed)")
        moves.append(Move(ct.name, node, chosen.node, live, f"{how}; {chosen.reason}"))
        fleet.move(ct, node, chosen.node)
    return MovePlan(tuple(moves), tuple(stuck))


def node_loads(nodes: Iterable[Node], policy: PlacementPolicy) -> dict[str, float]:
    """Each ready node's load (the larger of its memory and CPU fractions)."""
    return {n.name: load_with(n, Limits(), policy) for n in nodes if n.state == NodeState.READY}


def plan_rebalance(nodes: Sequence[Node], containers: Sequence[Container], policy: PlacementPolicy, *,
                   band: float = 0.15, hysteresis: float = 0.05, max_moves: int = 20,
                   cordoned: frozenset[str] = frozenset()) -> MovePlan:  # fmt: skip
    """The fewest moves that bring node loads within `band` of the mean (see the module doc)."""
    fleet = _Fleet(nodes, containers, cordoned)
    where = {c.name: c for c in containers}
    loads = node_loads(fleet.nodes.values(), policy)
    if len(loads) < 2 or max(loads.values()) - min(loads.values()) <= band + hysteresis:
        return MovePlan(())
    moves: list[Move] = []
    while len(moves) < max_moves:
        loads = node_loads(fleet.nodes.values(), policy)
        mean = sum(loads.values()) / len(loads)
        hot = max(loads, key=lambda n: (loads[n], n))
        if loads[hot] - mean <= band:
            break
        best: tuple[tuple, Move, Container] | None = None
        for ct in (c for c in where.values() if c.node == hot and not c.in_doubt):
            try:
                chosen = decide(_request(ct, exclude={hot}), list(fleet.nodes.values()), policy, fleet.snapshot())
            except NoCapacity:
                continue
            after_hot = load_with(fleet.nodes[hot], Limits(), policy) - _share(ct, fleet.nodes[hot], policy)
            after_target = load_with(fleet.nodes[chosen.node], ct.limits, policy)
            if after_target >= loads[hot]:
                continue  # it would only move the hot spot
            live = can_move_live(ct, fleet.nodes[hot], fleet.nodes[chosen.node])
            if ct.state == ContainerState.RUNNING and not live:
                continue  # rebalancing never stops a running container
            # Prefer the move that leaves the smaller peak; then live ones; then by name.
            key = (max(after_hot, after_target), not live, ct.name)
            move = Move(ct.name, hot, chosen.node, live,
                        f"{hot} at {loads[hot]:.0%} (mean {mean:.0%}); {chosen.node} at {after_target:.0%} with it")  # fmt: skip
            if best is None or key < best[0]:
                best = (key, move, ct)
        if best is None:
            break
        _, move, ct = best
        moves.append(move)
        fleet.move(ct, move.source, move.target)
        where[ct.name] = replace(ct, node=move.target)
    return MovePlan(tuple(moves))


def _share(ct: Container, node: Node, policy: PlacementPolicy) -> float:
    """The part of `node`'s load that is `ct`'s."""
    return load_with(node, Limits(), policy) - load_with(replace(node, allocated=_minus(node.allocated, ct.limits)),
                                                         Limits(), policy)  # fmt: skip


@dataclass(frozen=True)
class NodeCheck:
    node: str
    ok: bool
    detail: str


def check_n_plus_1(nodes: Sequence[Node], containers: Sequence[Container], policy: PlacementPolicy,
                   cordoned: frozenset[str] = frozenset()) -> list[NodeCheck]:  # fmt: skip
    """For each ready node: if it died now, would every HA container on it find a place?"""
    checks = []
    for node in sorted((n for n in nodes if n.state == NodeState.READY), key=lambda n: n.name):
        ha = [c for c in containers if c.node == node.name and c.ha]
        if not ha:
            checks.append(NodeCheck(node.name, True, "no HA containers"))
            continue
        others = [c for c in containers if c.node != node.name]
        plan = plan_failover(ha, nodes, others, policy, cordoned)
        lost = [c for c in plan if c.target is None]
        if lost:
            checks.append(NodeCheck(node.name, False, "; ".join(f"{c.container}: {c.reason}" for c in lost)))
        else:
            where = ", ".join(f"{c.container} -> {c.target}" for c in plan)
            checks.append(NodeCheck(node.name, True, f"{len(plan)} HA container(s) would fit: {where}"))
    return checks


def place_keeping_n_plus_1(request: PlacementRequest, ha: bool, nodes: Sequence[Node],
                           containers: Sequence[Container], policy: PlacementPolicy,
                           snapshot: Snapshot) -> Placement:  # fmt: skip
    """Placement's decision, skipping each node where the new container would leave some node
    whose HA containers could not all fail over (checked with the container placed). A fleet
    already short of N+1 is not made a reason to refuse: the check is about what this adds."""
    if not all(c.ok for c in check_n_plus_1(nodes, containers, policy, snapshot.cordoned)):
        return decide(request, nodes, policy, snapshot)
    breaks: dict[str, str] = {}
    while True:
        candidates = [n for n in nodes if n.name not in breaks]
        try:
            chosen = decide(request, candidates, policy, snapshot)
        except NoCapacity as exc:
            if not breaks:
                raise
            why = "; ".join(f"{n}: {b}" for n, b in sorted(breaks.items()))
            raise NoCapacity(f"{exc.message}; and {why}") from None
        placed = replace(Container(request.container, chosen.node, "", ContainerState.RUNNING, limits=request.limits,
                                   storage=request.storage, ha=ha, group=request.group),
                         constraints=tuple(str(c) for c in request.constraints))  # fmt: skip
        trial = [replace(n, allocated=n.allocated + request.limits, container_count=n.container_count + 1)
                 if n.name == chosen.node else n for n in nodes]  # fmt: skip
        broken = [c for c in check_n_plus_1(trial, [*containers, placed], policy, snapshot.cordoned) if not c.ok]
        if not broken:
            return replace(chosen, reason=f"{chosen.reason}; N+1 kept", rejected={**chosen.rejected, **breaks})
        breaks[chosen.node] = f"would break N+1 (if {broken[0].node} died: {broken[0].detail})"
        if request.node:
            raise NoCapacity(f"node {request.node!r} cannot take {request.container!r}: {breaks[chosen.node]}")
