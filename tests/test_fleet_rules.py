"""Fleet rules that need no real host, checked on the in-memory fake hosts in milliseconds."""

import asyncio
from dataclasses import replace

import pytest

from controller.model import OpState
from corral.errors import Conflict, FailedPrecondition, NoCapacity
from corral.model import Limits
from fakes.controller import ControllerLife
from fakes.hosts import FakeWorld

BIG = Limits(memory_bytes=40 << 30)  # the fake hosts have 64 GiB each


@pytest.fixture
async def life(tmp_path):
    life = await ControllerLife(FakeWorld(), tmp_path / "state.db").open()
    yield life
    await life.close()


async def test_two_migrations_cannot_both_fill_one_target(life):
    """Review L4: a migration in progress holds room on its target."""
    await life.fleet.create("a", "busybox", "n1", BIG, "dir", start=True)
    await life.fleet.create("b", "busybox", "n3", BIG, "dir", start=True)
    first, second = await asyncio.gather(
        life.fleet.migrate("a", "n2", live=False, postcopy=False, fallback_cold=False),
        life.fleet.migrate("b", "n2", live=False, postcopy=False, fallback_cold=False),
        return_exceptions=True,
    )
    assert not isinstance(first, Exception), first
    assert isinstance(second, NoCapacity), second
    assert (await life.wait(first.id)).state == OpState.SUCCEEDED
    assert life.world.running("a") == ["n2"] and life.world.running("b") == ["n3"]


async def test_a_busy_container_refuses_every_other_change_with_the_holder_named(life):
    await life.fleet.create("web", "busybox", "n1", Limits(), "dir", start=True)
    op = await life.fleet.migrate("web", "n2", live=True, postcopy=False, fallback_cold=False)
    attempts = {
        "start": life.fleet.start("web"),
        "stop": life.fleet.stop("web", force=True, timeout=0),
        "limits": life.fleet.set_limits("web", Limits(pids_max=100)),
        "migrate": life.fleet.migrate("web", "n3", live=False, postcopy=False, fallback_cold=False),
        "destroy": life.fleet.destroy("web", force=True),
    }
    for what, attempt in attempts.items():
        with pytest.raises(Conflict, match=f"busy with operation {op.id}"):
            await attempt
    assert (await life.wait(op.id)).state == OpState.SUCCEEDED
    assert life.world.running("web") == ["n2"]
    assert (await life.fleet.start("web")).node == "n2"  # free again once it is over


async def test_a_container_in_doubt_is_neither_started_nor_moved_nor_destroyed(life):
    await life.fleet.create("web", "busybox", "n1", Limits(), "dir", start=False)
    record = await life.store.get_container("web")
    await life.store.update_container(replace(record, in_doubt="a rollback could not reach n2", doubt_nodes=("n2",)))
    for attempt in (life.fleet.start("web"), life.fleet.destroy("web", force=True),
                    life.fleet.migrate("web", "n3", live=False, postcopy=False, fallback_cold=False)):  # fmt: skip
        with pytest.raises(FailedPrecondition, match="in doubt"):
            await attempt
    assert life.world.running("web") == []
    assert await life.fleet.settle_doubt("web")  # n2 answers that it holds nothing: settled where it was
    assert (await life.fleet.start("web")).node == "n1"


async def test_operations_and_doubt_are_events(life):
    await life.fleet.create("web", "busybox", "n1", Limits(), "dir", start=True)
    op = await life.fleet.migrate("web", "n2", live=False, postcopy=False, fallback_cold=False)
    await life.wait(op.id)
    record = await life.store.get_container("web")
    await life.store.update_container(replace(record, in_doubt="test", doubt_nodes=("n3",)))
    await life.fleet.settle_doubt("web")
    said = [e.message async for e in life.engine.events.watch(follow=False) if e.kind != "node-state"]
    assert said[:2] == ["create of web started", said[1]] and said[1].startswith("create of web succeeded in ")
    assert said[2] == "migrate of web started" and said[3].startswith("migrate of web succeeded in ")
    assert said[4] == "web is settled on n2 (its nodes answered)"


async def test_a_stop_and_copy_tells_the_target_how_much_memory_is_coming(tmp_path):
    """The target prepares page cache for the images before the freeze (agent/transfer/landing.py):
    a live stop-and-copy passes it what the pre-flight saw; post-copy (its pages are pulled
    lazily) and a cold migration (no images) pass nothing."""
    from fakes.hosts import PREFLIGHT_MEMORY_BYTES

    life = await ControllerLife(FakeWorld(live_strategies=("stop-and-copy", "post-copy")), tmp_path / "s.db").open()
    try:
        for name in ("a", "b", "c"):
            await life.fleet.create(name, "busybox", "n1", Limits(), "dir", start=True)
        moves = {
            "a": await life.fleet.migrate("a", "n2", live=True, postcopy=False, fallback_cold=False),
            "b": await life.fleet.migrate("b", "n2", live=True, postcopy=True, fallback_cold=False),
            "c": await life.fleet.migrate("c", "n2", live=False, postcopy=False, fallback_cold=False),
        }
        for op in moves.values():
            assert (await life.wait(op.id)).state == OpState.SUCCEEDED
        expected = life.world.hosts["n2"].expected_images
        assert expected[moves["a"].id] == PREFLIGHT_MEMORY_BYTES
        assert expected[moves["b"].id] == 0 and expected[moves["c"].id] == 0
    finally:
        await life.close()
