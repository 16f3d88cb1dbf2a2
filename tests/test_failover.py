"""Failover decided alone (the planner) and carried out on fake hosts: never for a node that is
only suspect, always onto a node that can take it, the volume taken over at a newer generation."""

import time
from dataclasses import replace

import pytest

from controller.fleet import HaSettings
from controller.model import OpState
from controller.scheduler.failover import plan_failover
from controller.scheduler.placement import PlacementPolicy
from corral.errors import FailedPrecondition
from corral.model import Container, ContainerState, Limits, Node, NodeFacts, NodeState
from fakes.controller import ControllerLife
from fakes.hosts import FakeWorld

GB = 1 << 30


def node(name, free_gb=8, state=NodeState.READY):
    facts = NodeFacts(name, f"{name}:7701", cpus=4, memory_bytes=8 * GB, storage_drivers=("dir", "image"))
    return Node(facts, state, 0.0, allocated=Limits(memory_bytes=(8 - free_gb) * GB))


def ha(name, on="n1", gb=1, priority=0, group=""):
    return Container(name, on, "busybox", ContainerState.RUNNING, limits=Limits(memory_bytes=gb * GB),
                     storage="image", ha=True, ha_priority=priority, ha_group=group)  # fmt: skip


def test_higher_priority_first_and_a_plan_never_overfills_a_node():
    nodes = [node("n1", state=NodeState.DEAD), node("n2", free_gb=3), node("n3", free_gb=2)]
    plan = plan_failover([ha("low", gb=2), ha("high", gb=2, priority=9)], nodes, [], PlacementPolicy())
    assert [(c.container, c.target) for c in plan] == [("high", "n2"), ("low", "n3")]
    full = plan_failover([ha("a", gb=3), ha("b", gb=3)], nodes, [], PlacementPolicy())
    assert full[0].target == "n2" and full[1].target is None
    assert "n2: needs 3G memory" in full[1].reason and "n3: needs 3G memory, 2G unallocated" in full[1].reason
    assert "n1" not in full[1].reason  # the lost node is no candidate


def test_one_group_is_kept_on_different_nodes_where_it_can_be():
    nodes = [node("n1", state=NodeState.DEAD), node("n2", free_gb=6), node("n3", free_gb=4)]
    on_n2 = replace(ha("db-a", on="n2", group="db"))
    plan = plan_failover([ha("db-b", group="db")], nodes, [on_n2], PlacementPolicy())
    assert plan[0].target == "n3" and "none holding group db" in plan[0].reason
    squeezed = plan_failover([ha("db-b", gb=5, group="db")], nodes, [on_n2], PlacementPolicy())
    assert squeezed[0].target == "n2" and "already holds group db" in squeezed[0].reason


@pytest.fixture
async def life(tmp_path):
    life = await ControllerLife(FakeWorld(), tmp_path / "state.db").open()
    yield life
    await life.close()


def lose(life, name: str, silent_for: float) -> None:
    entry = life.nodes._nodes[name]
    entry.last_seen = time.monotonic() - silent_for
    life.nodes.check_liveness()


async def test_a_suspect_or_merely_dead_node_is_not_failed_over_a_fenced_one_is(life):
    await life.fleet.create("db", "busybox", "n1", Limits(), "image", start=True)
    await life.fleet.set_ha("db", HaSettings(ha=True))
    before = await life.store.get_container("db")
    lose(life, "n1", 5.5)  # suspect: maybe only cut off; its lease may still run
    with pytest.raises(FailedPrecondition, match="not proven unable to run it"):
        await life.fleet.failover("db")
    lose(life, "n1", 8.0)  # dead: past its lease and the margin, but its agent may have died with it running
    with pytest.raises(FailedPrecondition, match="dead but not fenced"):
        await life.fleet.failover("db")
    life.world.hosts["n1"].containers["db"].state = "stopped"  # powered off
    life.nodes.mark_fenced("n1", "powered off at the PDU")
    op = await life.fleet.failover("db")
    final = await life.wait(op.id)
    assert final.state == OpState.SUCCEEDED, final.error
    after = await life.store.get_container("db")
    assert after.node == final.result["to"] != "n1"
    assert after.volume_generation == before.volume_generation + 1
    assert life.world.running("db") == [after.node] and not life.world.violations
    assert life.world.san.volumes["db"].node == after.node
