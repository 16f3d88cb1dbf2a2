"""Node health as a pure decision, and the event stream, without a lab."""

import asyncio

import pytest

from controller.events import EventBus, Lagged
from controller.health.liveness import HealthPolicy, assess, describe
from controller.health.registry import NodeRegistry
from corral.model import NodeFacts, NodeState

POLICY = HealthPolicy(suspect_after=3.0, lease=5.0, margin=2.0)


@pytest.mark.parametrize("silent_for, state", [
    (0.0, NodeState.READY), (2.9, NodeState.READY), (3.1, NodeState.SUSPECT), (6.9, NodeState.SUSPECT),
    (7.1, NodeState.DEAD), (3600, NodeState.DEAD),
])  # fmt: skip
def test_a_silent_node_is_suspect_first_and_dead_only_past_its_lease_and_margin(silent_for, state):
    assert assess(silent_for, POLICY) == state


def test_what_the_operator_reads():
    assert "nothing is moved off it (dead in 2.0s" in describe(NodeState.SUSPECT, 5.0, POLICY)
    assert "its lease (5s) has expired" in describe(NodeState.DEAD, 8.0, POLICY)
    assert describe(NodeState.READY, 0.0, POLICY) == ""


async def test_each_change_of_a_nodes_state_is_one_event(store, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("controller.health.registry.time.monotonic", lambda: clock[0])
    events = EventBus()
    nodes = NodeRegistry(store, POLICY, events)
    await nodes.register(NodeFacts("n1", "10.0.0.1:7701"))
    for step in (1.0, 2.5, 1.0, 3.0, 1.0):  # silent 1, 3.5, 4.5, 7.5, 8.5 s
        clock[0] += step
        nodes.check_liveness()
    assert nodes.get("n1").state == NodeState.DEAD
    nodes.heartbeat(NodeFacts("n1", "10.0.0.1:7701"))
    states = [e.fields["state"] for e in [e async for e in events.watch(follow=False)]]
    assert states == ["ready", "suspect", "dead", "ready"]


async def test_a_watcher_resumes_after_the_last_event_it_saw():
    bus = EventBus()
    for n in range(5):
        bus.emit("operation", f"op {n}")
    seen = [e.seq async for e in bus.watch(since=3, follow=False)]
    assert seen == [4, 5]

    async def follow():
        return [e.message async for e in _first(bus.watch(since=5), 2)]

    task = asyncio.create_task(follow())
    await asyncio.sleep(0)
    bus.emit("operation", "later 1")
    bus.emit("operation", "later 2")
    assert await asyncio.wait_for(task, 2) == ["later 1", "later 2"]


async def test_a_stalled_watcher_is_told_it_lagged_instead_of_growing_the_controller(monkeypatch):
    monkeypatch.setattr("controller.events.QUEUE", 3)
    bus = EventBus()
    stream = bus.watch()
    bus.emit("operation", "first")
    assert (await anext(stream)).message == "first"  # now it is watching, with a queue of 3
    for n in range(10):
        bus.emit("operation", f"op {n}")  # it does not read meanwhile
    with pytest.raises(Lagged, match="watch again with since="):
        async for _ in stream:
            pass


async def _first(stream, n):
    got = 0
    async for item in stream:
        yield item
        got += 1
        if got == n:
            return


async def test_a_dead_node_is_not_lost_until_fenced_and_a_fence_command_must_succeed(store, monkeypatch, tmp_path):
    import sys

    from controller.health.fencing import Fencer

    clock = [1000.0]
    monkeypatch.setattr("controller.health.registry.time.monotonic", lambda: clock[0])
    events = EventBus()
    nodes = NodeRegistry(store, POLICY, events)
    await nodes.register(NodeFacts("n1", "10.0.0.1:7701"))
    clock[0] += 8.0
    nodes.check_liveness()
    assert nodes.get("n1").state == NodeState.DEAD
    assert "dead but not fenced" in nodes.why_not_lost("n1")  # its agent may have died with them running

    failing = Fencer(nodes, (sys.executable, "-c", "import sys; sys.exit('no power switch for ' + sys.argv[1])",
                              "{node}"), timeout=10)  # fmt: skip
    assert not await failing.fence("n1")
    assert nodes.get("n1").state == NodeState.DEAD
    said = [e.message async for e in events.watch(follow=False)]
    assert any("fencing n1 failed" in m and "no power switch for n1" in m for m in said), said

    marker = tmp_path / "off"
    working = Fencer(nodes, (sys.executable, "-c", f"open({str(marker)!r} + '-' + __import__('sys').argv[1], 'w')",
                              "{node}"), timeout=10)  # fmt: skip
    assert await working.fence("n1")
    assert (tmp_path / "off-n1").exists() and nodes.get("n1").state == NodeState.FENCED
    assert nodes.why_not_lost("n1") is None
    nodes.heartbeat(NodeFacts("n1", "10.0.0.1:7701"))  # back (powered on): it heartbeats again
    assert nodes.get("n1").state == NodeState.READY
