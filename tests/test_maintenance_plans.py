"""Evacuation, rebalancing and N+1 planned alone (controller/scheduler/maintenance.py): who
goes where, live or cold, what stays and why; decided in milliseconds from a snapshot."""

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from controller.scheduler.maintenance import check_n_plus_1, node_loads, plan_evacuation, plan_rebalance
from controller.scheduler.placement import PlacementPolicy, capacity
from corral.model import Container, ContainerState, Limits, Node, NodeFacts, NodeState

GB = 1 << 30
POLICY = PlacementPolicy()


def node(name, gb=8, live=True, state=NodeState.READY, labels=None):
    facts = NodeFacts(name, f"{name}:7701", cpus=4, memory_bytes=gb * GB, disk_free_bytes=100 * GB,
                      storage_drivers=("dir", "image"), live_strategies=("pre-copy",) if live else (),
                      labels=labels or {})  # fmt: skip
    return Node(facts, state, 0.0)


def ct(name, on, gb=1, running=True, **kw):
    state = ContainerState.RUNNING if running else ContainerState.STOPPED
    return Container(name, on, "busybox", state, limits=Limits(memory_bytes=gb * GB), **kw)


def fleet(nodes, containers):
    """Nodes with what the containers allocate on them (as Fleet.list_nodes gives them)."""
    out = []
    for n in nodes:
        mine = [c for c in containers if c.node == n.name]
        allocated = Limits(memory_bytes=sum(c.limits.memory_bytes for c in mine))
        out.append(replace(n, allocated=allocated, container_count=len(mine)))
    return out


def test_evacuation_moves_everything_live_where_it_can_and_says_why_not_elsewhere():
    cts = [ct("a", "n1", 3), ct("b", "n1", 2), ct("c", "n1", 1, running=False), ct("d", "n2", 1)]
    nodes = fleet([node("n1"), node("n2"), node("n3", live=False)], cts)
    plan = plan_evacuation("n1", nodes, cts, POLICY, allow_cold=False)
    moved = {m.container: (m.target, m.live) for m in plan.moves}
    assert moved["a"] == ("n2", True) and "live" in plan.moves[0].reason  # biggest first, live to n2
    assert moved["c"][1] is False  # stopped: cold, nothing lost
    # b runs: n3 cannot take it live (no CRIU there); n2 could: it goes live there if it fits.
    assert "b" in moved and moved["b"] == ("n2", True)
    assert not plan.stuck


def test_evacuation_without_live_needs_allow_cold():
    cts = [ct("a", "n1")]
    nodes = fleet([node("n1"), node("n2", live=False)], cts)
    refused = plan_evacuation("n1", nodes, cts, POLICY, allow_cold=False)
    assert not refused.moves and "--allow-cold" in refused.stuck[0].reason
    allowed = plan_evacuation("n1", nodes, cts, POLICY, allow_cold=True)
    assert allowed.moves[0].target == "n2" and not allowed.moves[0].live and "allowed" in allowed.moves[0].reason


def test_evacuation_never_overfills_and_says_what_stays():
    cts = [ct("a", "n1", 5), ct("b", "n1", 5)]
    nodes = fleet([node("n1", 16), node("n2", 8)], cts)
    plan = plan_evacuation("n1", nodes, cts, POLICY, allow_cold=True)
    assert [m.container for m in plan.moves] == ["a"] and plan.stuck[0].container == "b"
    assert "needs 5G memory, 3G unallocated" in plan.stuck[0].reason


def test_rebalance_does_nothing_to_a_balanced_fleet_and_moves_the_fewest_otherwise():
    balanced = [ct("a", "n1", 2), ct("b", "n2", 2), ct("c", "n3", 3)]
    assert plan_rebalance(fleet([node("n1"), node("n2"), node("n3")], balanced), balanced, POLICY).moves == ()
    skewed = [ct(f"c{i}", "n1", 1) for i in range(6)]
    nodes = fleet([node("n1"), node("n2"), node("n3")], skewed)
    plan = plan_rebalance(nodes, skewed, POLICY, band=0.15)
    assert 2 <= len(plan.moves) <= 4 and all(m.source == "n1" and m.live for m in plan.moves), plan
    after = fleet([node("n1"), node("n2"), node("n3")],
                  [replace(c, node=next((m.target for m in plan.moves if m.container == c.name), c.node))
                   for c in skewed])  # fmt: skip
    loads = node_loads(after, POLICY)
    mean = sum(loads.values()) / len(loads)
    assert max(loads.values()) - mean <= 0.15


def test_rebalance_never_stops_a_running_container():
    skewed = [ct(f"c{i}", "n1", 1) for i in range(6)]
    nodes = fleet([node("n1"), node("n2", live=False)], skewed)
    assert plan_rebalance(nodes, skewed, POLICY).moves == ()


def test_n_plus_1_says_which_node_could_not_be_lost():
    cts = [ct("db", "n1", 6, ha=True, storage="image"), ct("web", "n2", 3, ha=True, storage="image"),
           ct("big", "n3", 5)]  # fmt: skip
    checks = {c.node: c for c in check_n_plus_1(fleet([node("n1"), node("n2"), node("n3")], cts), cts, POLICY)}
    assert not checks["n1"].ok and "db: no node can take it" in checks["n1"].detail
    assert checks["n2"].ok and "web -> " in checks["n2"].detail
    assert checks["n3"].ok and checks["n3"].detail == "no HA containers"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=12), st.integers(2, 5), st.booleans())
def test_an_evacuation_plan_never_exceeds_a_node(sizes, n_nodes, allow_cold):
    cts = [ct(f"c{i}", "n1", gb) for i, gb in enumerate(sizes)]
    nodes = fleet([node(f"n{i}", 8, live=i % 2 == 0) for i in range(1, n_nodes + 1)], cts)
    plan = plan_evacuation("n1", nodes, cts, POLICY, allow_cold=allow_cold)
    assert len(plan.moves) + len(plan.stuck) == len(cts)
    placed = {n.name: n.allocated.memory_bytes for n in nodes}
    for m in plan.moves:
        assert m.target != "n1"
        placed[m.target] += next(c.limits.memory_bytes for c in cts if c.name == m.container)
    for n in nodes:
        if n.name != "n1":
            assert placed[n.name] <= capacity(n, POLICY).memory_bytes


def test_placement_can_keep_n_plus_1():
    from controller.scheduler.maintenance import place_keeping_n_plus_1
    from controller.scheduler.placement import PlacementRequest, Snapshot, decide
    from corral.errors import NoCapacity
    import pytest

    cts = [ct("db", "n1", 6, ha=True, storage="image"), ct("a", "n2", 4)]
    nodes = fleet([node("n1"), node("n2"), node("n3")], cts)
    request = PlacementRequest("b", Limits(memory_bytes=4 * GB))
    assert decide(request, nodes, POLICY, Snapshot()).node == "n3"  # spread alone: n1's db could not fail over
    kept = place_keeping_n_plus_1(request, False, nodes, cts, POLICY, Snapshot())
    assert kept.node == "n2" and "N+1 kept" in kept.reason and "would break N+1" in kept.rejected["n3"]
    with pytest.raises(NoCapacity, match=r"would break N\+1"):
        place_keeping_n_plus_1(PlacementRequest("c", Limits(memory_bytes=4 * GB), "n3"), False, nodes, cts, POLICY,
                               Snapshot())  # fmt: skip
