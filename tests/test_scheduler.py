"""The scheduler decided alone: constraints, groups, overcommit, the host's reservation,
spread and binpack, each with its explanation; and properties over random fleets: no
decision ever exceeds a node's capacity or puts two members of a group on one node
while another node could take one."""

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.scheduler.placement import (
    PlacementPolicy,
    PlacementRequest,
    Snapshot,
    Strategy,
    capacity,
    decide,
    why_not,
)
from corral.labels import Constraint, check_labels
from corral.errors import FailedPrecondition, InvalidArgument, NoCapacity
from corral.model import Limits, Node, NodeFacts, NodeState

GB = 1 << 30


def node(name, *, gb=8, used_gb=0, cpus=4, used_cpus=0, labels=None, state=NodeState.READY, storage=("dir", "image")):
    facts = NodeFacts(name, f"{name}:7701", cpus=cpus, memory_bytes=gb * GB, disk_free_bytes=100 * GB,
                      storage_drivers=storage, labels=labels or {})  # fmt: skip
    return Node(facts, state, 0.0, allocated=Limits(memory_bytes=used_gb * GB, cpu_millis=used_cpus * 1000))


def want(name="web", gb=1, cpus=0, **kw):
    return PlacementRequest(name, Limits(memory_bytes=gb * GB, cpu_millis=cpus * 1000), **kw)


FLEET = [node("n1", used_gb=6, labels={"zone": "a"}), node("n2", used_gb=2, labels={"zone": "b", "ssd": "yes"}),
         node("n3", used_gb=4, labels={"zone": "a", "ssd": "yes"})]


@pytest.mark.parametrize("request_, policy, snapshot, chosen, explained", [
    (want(), PlacementPolicy(), Snapshot(), "n2", "spread: the least loaded (38% with it) of 3"),
    (want(), PlacementPolicy(strategy=Strategy.BINPACK), Snapshot(), "n1", "binpack: the most loaded (88% with it)"),
    (want(constraints=(Constraint.parse("zone=a"),)), PlacementPolicy(), Snapshot(), "n3", "of 2 fitting"),
    (want(constraints=(Constraint.parse("zone!=a"),)), PlacementPolicy(), Snapshot(), "n2", "of 1 fitting"),
    (want(constraints=(Constraint.parse("zone=a"), Constraint.parse("ssd=yes"))), PlacementPolicy(), Snapshot(),
     "n3", "of 1 fitting"),
    (want(group="db"), PlacementPolicy(), Snapshot(groups={"n2": frozenset({"db"})}), "n3", "none holding group db"),
    (want(group="db"), PlacementPolicy(), Snapshot(groups={n: frozenset({"db"}) for n in ("n1", "n2", "n3")}),
     "n2", "every fitting node already holds group db"),
    (want(), PlacementPolicy(), Snapshot(cordoned=frozenset({"n2"})), "n3", "of 2 fitting"),
    (want(exclude=frozenset({"n2"})), PlacementPolicy(), Snapshot(), "n3", "of 2 fitting"),
    (want(gb=3), PlacementPolicy(), Snapshot(), "n2", "of 2 fitting"),  # n1 has 2G left
    (want(gb=3), PlacementPolicy(memory_overcommit=1.5), Snapshot(), "n2", "of 3 fitting"),
])  # fmt: skip
def test_decisions_and_their_reasons(request_, policy, snapshot, chosen, explained):
    decision = decide(request_, FLEET, policy, snapshot)
    assert decision.node == chosen and explained in decision.reason, decision
    assert set(decision.rejected) == {"n1", "n2", "n3"} - {chosen}  # every other node says why not


def test_each_rejected_node_says_why():
    decision = decide(want(gb=3, constraints=(Constraint.parse("ssd=yes"),)), FLEET, PlacementPolicy(),
                      Snapshot(cordoned=frozenset({"n3"})))  # fmt: skip
    assert decision.node == "n2"
    assert decision.rejected == {"n1": "constraint ssd=yes not met (no ssd label)", "n3": "cordoned (no new placements)"}


def test_no_node_fits_names_every_reason():
    with pytest.raises(NoCapacity) as refused:
        decide(want(gb=7, constraints=(Constraint.parse("zone=b"),)), FLEET, PlacementPolicy())
    assert "n1: constraint zone=b not met (zone=a here)" in refused.value.message
    assert "n2: needs 7G memory, 6G unallocated" in refused.value.message


def test_host_reservation_is_never_allocated():
    policy = PlacementPolicy(reserved=Limits(memory_bytes=2 * GB, cpu_millis=1000))
    assert capacity(node("n"), policy) == Limits(memory_bytes=6 * GB, cpu_millis=12000)
    with pytest.raises(NoCapacity, match="needs 7G memory, 6G unallocated"):
        decide(want(gb=7), [node("n")], policy)


def test_pinned_nodes_are_checked_too():
    assert decide(want(node="n1"), FLEET, PlacementPolicy()).reason == "requested with --node"
    with pytest.raises(NoCapacity, match="n1.*needs 3G memory"):
        decide(want(gb=3, node="n1"), FLEET, PlacementPolicy())
    with pytest.raises(FailedPrecondition, match="cordoned"):
        decide(want(node="n1"), FLEET, PlacementPolicy(), Snapshot(cordoned=frozenset({"n1"})))


@pytest.mark.parametrize("text", ["zone", "=a", "zone=", "Zone=a", "zone==a", "zone=a b", "zone=a\n"])
def test_bad_constraints_and_labels_are_refused(text):
    with pytest.raises(InvalidArgument):
        Constraint.parse(text)


def test_labels_are_checked():
    assert check_labels({"zone": "a", "rack/row": "r1"}) == {"zone": "a", "rack/row": "r1"}
    for bad in ({"Zone": "a"}, {"zone": ""}, {"zone": "a b"}, {"zone": 3}):
        with pytest.raises(InvalidArgument):
            check_labels(bad)


# --- properties over random fleets -------------------------------------------------------

nodes_st = st.lists(
    st.builds(lambda i, gb, used, cpus, used_cpus, zone, up: node(
        f"n{i}", gb=gb, used_gb=min(used, gb), cpus=cpus, used_cpus=min(used_cpus, cpus * 4), labels={"zone": zone},
        state=NodeState.READY if up else NodeState.SUSPECT),
        st.integers(0, 999), st.integers(1, 64), st.integers(0, 64), st.integers(1, 32), st.integers(0, 128),
        st.sampled_from("abc"), st.booleans()),
    min_size=1, max_size=12, unique_by=lambda n: n.name)  # fmt: skip
requests_st = st.lists(st.tuples(st.integers(0, 16), st.integers(0, 8), st.sampled_from(["", "g1", "g2"]),
                                 st.sampled_from(["", "zone=a", "zone!=b"])), min_size=1, max_size=30)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(nodes_st, requests_st, st.sampled_from(list(Strategy)), st.sampled_from([1.0, 1.5]))
def test_placing_many_never_overfills_a_node_nor_needlessly_joins_a_group(nodes, requests, strategy, overcommit):
    policy = PlacementPolicy(strategy=strategy, memory_overcommit=overcommit)
    fleet = {n.name: n for n in nodes}
    groups: dict[str, set[str]] = {}
    for i, (gb, cpus, group, constraint) in enumerate(requests):
        request = want(f"c{i}", gb=gb, cpus=cpus, group=group,
                       constraints=(Constraint.parse(constraint),) if constraint else ())  # fmt: skip
        snapshot = Snapshot(groups={n: frozenset(g) for n, g in groups.items()})
        try:
            decision = decide(request, list(fleet.values()), policy, snapshot)
        except NoCapacity:
            continue
        chosen = fleet[decision.node]
        assert chosen.state == NodeState.READY
        assert all(c.allows(chosen.facts.labels) for c in request.constraints)
        if group and group in groups.get(chosen.name, set()):
            # Shared only if no node free of the group could take it.
            for other in fleet.values():
                if group not in groups.get(other.name, set()):
                    assert why_not(other, request, policy, snapshot) is not None, decision
        chosen = replace(chosen, allocated=chosen.allocated + request.limits)
        room = capacity(chosen, policy)
        assert chosen.allocated.memory_bytes <= room.memory_bytes
        assert chosen.allocated.cpu_millis <= room.cpu_millis
        fleet[chosen.name] = chosen
        if group:
            groups.setdefault(chosen.name, set()).add(group)


def test_placement_settings_in_the_controller_config(tmp_path):
    from controller.config import ControllerConfig
    from corral.config import ConfigError

    for name in ("ca.pem", "c.pem", "c.key"):
        (tmp_path / name).write_text("")
    base = ('listen: ["127.0.0.1:7000"]\nstore: {path: /tmp/x.db}\ntls: {ca: ca.pem, cert: c.pem, key: c.key}\n'
            "network: {subnet: 10.9.0.0/24, gateway: 10.9.0.1, range_start: 10.9.0.10, range_end: 10.9.0.20}\n")
    path = tmp_path / "c.yaml"
    path.write_text(base)
    assert ControllerConfig.load(path).placement == PlacementPolicy()
    path.write_text(base + "placement: {strategy: binpack, reserved_memory: 1G, reserved_cpus: 1}\n")
    policy = ControllerConfig.load(path).placement
    assert (policy.strategy, policy.reserved) == (Strategy.BINPACK, Limits(memory_bytes=GB, cpu_millis=1000))
    for bad in ("{strategy: random}", "{reserved_memory: lots}", "{reserved_cpus: -1}", "{spread: yes}"):
        path.write_text(base + f"placement: {bad}\n")
        with pytest.raises(ConfigError):
            ControllerConfig.load(path)
