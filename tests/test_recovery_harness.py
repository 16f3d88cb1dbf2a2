"""The controller dies at every durable write of every operation, and comes back.

For each operation the fleet runs (create, destroy, every kind of migration) the harness
first runs it once and counts its durable writes W. Then, for every k in 1..W, it runs the
same story again on fresh fake hosts and kills the controller at write k, either instead of
the write or just after it landed; a new controller opens the same store, the hosts report
in again, and the engine recovers what was active. Whatever happened, when the dust settles:

- the container exists exactly once: its record, and one host's copy, on the node the
  record names, with its disk whole (never a copy of it taken while it ran);
- it runs if it ran before (exactly one running copy, and at no moment two: the fake
  world watches every start), and a live migration never rebooted it;
- a create either made it (record and copy) or left nothing (no record, its address free);
  a destroy either removed it everywhere or changed nothing;
- the fleet can go on: a failed operation can be tried again, a moved container moved back.

No LXC, no lab, no network: the hosts are in memory (tests/fakes/hosts.py).
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import structlog

from controller.model import OpState, StepState
from controller.operations import engine as engine_module
from controller.operations import lifecycle, migrate, reach
from controller.operations.steps import StepName
from controller.store.sqlite import SqliteStore
from corral.errors import CorralError, FailedPrecondition
from corral.model import Limits, NodeState

from fakes.controller import ControllerLife
from fakes.crash import AFTER, BEFORE
from fakes.hosts import FakeWorld, data_of

NAME = "web"
SHM = Path("/dev/shm")

# Module constants a fake fleet wants different: no timed progress writes (they would make the
# write count depend on the clock), and short waits for hosts that do not answer.
FAST = {
    (engine_module, "PROGRESS_PERSIST_INTERVAL"): 1e12,
    (lifecycle, "REACH_WAIT"): 0.3,
    (reach, "RETRY_INTERVAL"): 0.02,
    (migrate, "RETRY_INTERVAL"): 0.02,
    (migrate, "TARGET_REACH_WAIT"): 0.3,
    (migrate, "SOURCE_NOTICE_WAIT"): 0.3,
    (migrate, "RECOVERY_NODE_WAIT"): 0.3,
}


@dataclass(frozen=True)
class Scenario:
    id: str
    kind: str  # create | destroy | migrate | from-checkpoint
    storage: str = "dir"
    running: bool = True
    live: bool = False
    postcopy: bool = False
    strategies: tuple[str, ...] = ("stop-and-copy", "pre-copy", "post-copy")
    source: str = "n1"
    target: str = "n2"
    refuse: tuple[str, str] | None = None  # (host, call) that fails once: the crashes land in the rollback


SCENARIOS = [
    Scenario("create", "create"),
    Scenario("create-image", "create", storage="image"),
    Scenario("destroy", "destroy"),
    Scenario("cold-dir", "migrate"),
    Scenario("cold-dir-stopped", "migrate", running=False),
    Scenario("cold-image", "migrate", storage="image"),
    Scenario("stop-and-copy", "migrate", live=True, strategies=("stop-and-copy",)),
    Scenario("stop-and-copy-image", "migrate", storage="image", live=True, strategies=("stop-and-copy",)),
    Scenario("pre-copy", "migrate", live=True, strategies=("stop-and-copy", "pre-copy")),
    Scenario("post-copy", "migrate", live=True, postcopy=True),
    # After a failed post-copy (the record on n2, the checkpoint kept on n1): back to n1 from it.
    Scenario("from-checkpoint", "from-checkpoint", live=True, postcopy=True, source="n2", target="n1"),
    # The target fails its last step: the crashes land in the rollback, which must resume too.
    Scenario("cold-dir-rollback", "migrate", refuse=("n2", "start")),
    Scenario("cold-image-rollback", "migrate", storage="image", refuse=("n2", "start")),
    Scenario("stop-and-copy-rollback", "migrate", live=True, strategies=("stop-and-copy",),
             refuse=("n2", "restore")),
    Scenario("stop-and-copy-image-rollback", "migrate", storage="image", live=True, strategies=("stop-and-copy",),
             refuse=("n2", "restore")),
    Scenario("post-copy-rollback", "migrate", live=True, postcopy=True, refuse=("n2", "restore")),
    Scenario("create-rollback", "create", refuse=("n1", "start")),
]
BY_ID = {sc.id: sc for sc in SCENARIOS}


# -- the story of each scenario ---------------------------------------------------------------


@dataclass
class Before:
    """What was true before the operation began (what the checks compare with)."""

    ops: set[str]
    mem: str | None = None  # the running container's memory (a live move keeps it)
    kept_op: str = ""


async def set_up(sc: Scenario, life: ControllerLife) -> Before:
    fleet = life.fleet
    if sc.kind != "create":
        await fleet.create(NAME, "busybox", "n1", Limits(), sc.storage, start=sc.running)
    kept_op = ""
    if sc.kind == "from-checkpoint":
        # A post-copy whose page transfer breaks once the container has resumed on n2.
        life.world.fail_pages = True
        op = await fleet.migrate(NAME, "n2", live=True, postcopy=True, fallback_cold=False)
        failed = await life.wait(op.id)
        life.world.fail_pages = False
        assert failed.state == OpState.FAILED and failed.params["kept_checkpoint"], failed.error
        kept_op = op.id
    ops = {op.id for op in await life.store.list_operations()}
    copy = life.world.hosts["n1"].containers.get(NAME)
    mem = life.world.hosts["n1"].checkpoints[kept_op].mem if kept_op else (copy.mem if copy else None)
    return Before(ops, mem, kept_op)


async def act(sc: Scenario, life: ControllerLife, before: Before) -> None:
    """The operator's request, as the CLI would make it; a refusal or failure is an outcome too."""
    fleet = life.fleet
    try:
        if sc.kind == "create":
            await fleet.create(NAME, "busybox", "n1", Limits(), sc.storage, start=True)
        elif sc.kind == "destroy":
            await fleet.destroy(NAME, force=True)
        elif sc.kind == "migrate":
            op = await fleet.migrate(NAME, sc.target, live=sc.live, postcopy=sc.postcopy, fallback_cold=False)
            await life.wait(op.id)
        else:
            op = await fleet.migrate(NAME, sc.target, live=False, postcopy=False, fallback_cold=False,
                                     from_checkpoint=before.kept_op)  # fmt: skip
            await life.wait(op.id)
    except CorralError:
        pass


async def run(sc: Scenario, db: Path, crash_at: int | None = None, mode: str = BEFORE, while_down=None):
    """The scenario with a crash at write `crash_at`; returns (the controller now running,
    what was true before, the writes counted, whether it crashed). `while_down(db, before)`
    runs while no controller is up."""
    world = FakeWorld(live_strategies=sc.strategies)
    life = await ControllerLife(world, db, crash_at, mode).open()
    before = await set_up(sc, life)
    life.store.arm()
    if sc.refuse:
        world.hosts[sc.refuse[0]].refuse.add(sc.refuse[1])
    crashed = await life.until_crash(act(sc, life, before))
    writes = life.store.writes
    if crashed:
        await life.die()
        if while_down is not None:
            await while_down(db, before)
        life = await ControllerLife(world, db).open()
        await life.recover()
    return life, before, writes, crashed


# -- what must hold afterwards -------------------------------------------------------------------


async def new_ops(life: ControllerLife, before: Before):
    return [op for op in await life.store.list_operations(NAME) if op.id not in before.ops]


async def check(sc: Scenario, life: ControllerLife, before: Before) -> str:
    """Assert the fleet is whole; returns the outcome ("done" or "undone") for the follow-up."""
    world, store = life.world, life.store
    assert not world.violations, f"rule 1 broken: {world.violations}"
    assert await store.list_operations(active_only=True) == [], "an operation is still active"
    ops = await new_ops(life, before)
    assert len(ops) <= 1
    op = ops[0] if ops else None
    record = await store.get_container(NAME)
    holders = world.holders(NAME)

    if sc.kind in ("create", "destroy"):
        gone = record is None
        if gone:
            assert holders == [], f"no record, but copies on {holders} (an orphan)"
            assert NAME not in world.san.volumes, "no record, but its shared volume is left"
            assert "10.77.0.10" not in await life.fleet._addresses_in_use(), "its address is still taken"
            if sc.kind == "destroy":
                assert op is not None and op.state == OpState.SUCCEEDED, op
            else:
                assert op is None or op.state != OpState.SUCCEEDED, op
            return "done" if sc.kind == "destroy" else "undone"
        assert not record.in_doubt, record.in_doubt
        assert holders == [record.node] == [sc.source], f"record on {record.node}, copies on {holders}"
        assert world.running(NAME) == [record.node], f"running on {world.running(NAME)}"
        assert world.hosts[record.node].disk(NAME) == data_of(NAME)
        if sc.kind == "create":
            assert op is not None and op.state == OpState.SUCCEEDED, op
            return "done"
        assert op is None or op.state == OpState.FAILED, op  # destroy changed nothing
        return "undone"

    # Migrations: the container is where its record says, and only there.
    assert record is not None, "the container's record is gone"
    assert not record.in_doubt, f"in doubt: {record.in_doubt}"
    # (No operation: the controller died before the request was recorded; nothing happened.)
    if op is not None and op.state == OpState.SUCCEEDED:
        assert record.node == sc.target, f"succeeded, but the record says {record.node}"
    else:
        assert record.node == sc.source, f"failed, but the record says {record.node} (rolled back half-way?)"
    assert holders == [record.node] or (sc.kind == "from-checkpoint" and record.node == sc.source), (
        f"record on {record.node}, copies on {holders}")  # fmt: skip
    node = world.hosts[record.node]
    if sc.kind == "from-checkpoint" and record.node == sc.source:
        # Nothing changed: still stopped on n2, the checkpoint still kept on n1 for another try.
        assert world.running(NAME) == [], f"running on {world.running(NAME)}"
        assert world.hosts[sc.target].checkpoints[before.kept_op].kept, "the kept checkpoint is lost"
        return "undone"
    expected_running = [record.node] if sc.running else []
    assert world.running(NAME) == expected_running, f"running on {world.running(NAME)}, record on {record.node}"
    assert node.disk(NAME) == data_of(NAME), f"disk on {record.node} is {node.disk(NAME)!r}"
    if sc.live:
        assert node.containers[NAME].mem == before.mem, "a live migration rebooted the container"
    if sc.storage == "image":
        volume = world.san.volumes[NAME]
        assert (volume.node, volume.attached) == (record.node, True), volume
        # The next handover is given record.volume_generation + 1: it must be newer than the marker's.
        assert record.volume_generation >= volume.generation, (record.volume_generation, volume)
    leftovers = {h.name: sorted(h.staging) for h in world.hosts.values() if any(s.open for s in h.staging.values())}
    assert not leftovers, f"transfer channels left open: {leftovers}"
    return "done" if record.node == sc.target else "undone"


async def follow_up(sc: Scenario, life: ControllerLife, before: Before, outcome: str) -> None:
    """The fleet goes on: what failed is tried again; what moved moves back."""
    again = sc
    if outcome == "done":
        if sc.kind in ("create", "destroy", "from-checkpoint"):
            return
        again = Scenario(sc.id, sc.kind, sc.storage, sc.running, sc.live, sc.postcopy, sc.strategies,
                         source=sc.target, target=sc.source)  # fmt: skip
    for host in life.world.hosts.values():
        host.refuse.clear()  # whatever failed before has passed
    before = Before({op.id for op in await life.store.list_operations()}, before.mem, before.kept_op)
    await act(again, life, before)
    assert await check(again, life, before) == "done", f"{again.kind} {again.source}->{again.target} did not work"


# -- crash points ----------------------------------------------------------------------------------


def _scratch() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="corral-crash-", dir=SHM if SHM.is_dir() else None)


def _crash_points(sc: Scenario) -> range:
    """Every write of the scenario; where a step is made to fail, every write of its rollback
    (the writes before it are the same as in the scenario without the failure)."""
    saved = {key: getattr(*key) for key in FAST}
    for (module, attr), value in FAST.items():
        setattr(module, attr, value)
    try:
        with _scratch() as tmp:

            async def count() -> range:
                life, _, writes, _ = await run(sc, Path(tmp) / "state.db")
                await life.close()
                first = 1
                if sc.refuse:
                    first = next(i for i, w in enumerate(life.store.log, 1) if "rolling-back" in w)
                return range(first, writes + 1)

            return asyncio.run(count())
    finally:
        for (module, attr), value in saved.items():
            setattr(module, attr, value)


def pytest_generate_tests(metafunc):
    if "crash_point" in metafunc.fixturenames:
        _quiet()
        points = []
        for sc in SCENARIOS:
            for k in _crash_points(sc):
                for mode in (BEFORE, AFTER):
                    points.append(pytest.param((sc.id, k, mode), id=f"{sc.id}-write{k}-{mode}"))
        metafunc.parametrize("crash_point", points)


def _quiet() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))


@pytest.fixture(autouse=True)
def fast(monkeypatch):
    for (module, attr), value in FAST.items():
        monkeypatch.setattr(module, attr, value)


@pytest.fixture(scope="module", autouse=True)
def quiet_logs():
    saved = structlog.get_config()
    _quiet()
    yield
    structlog.configure(**saved)


@pytest.fixture
def db(tmp_path):
    with _scratch() as tmp:
        yield Path(tmp) / "state.db"


# -- the tests ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("sc", SCENARIOS, ids=lambda sc: sc.id)
async def test_without_a_crash_the_operation_completes(sc, db):
    life, before, writes, crashed = await run(sc, db)
    assert not crashed and writes > 0
    try:
        outcome = await check(sc, life, before)
        assert outcome == ("undone" if sc.refuse else "done")
        await follow_up(sc, life, before, outcome)
    finally:
        await life.close()


async def test_crash_at_every_write(crash_point, db):
    sc_id, k, mode = crash_point
    sc = BY_ID[sc_id]
    life, before, _, crashed = await run(sc, db, crash_at=k, mode=mode)
    try:
        assert crashed, f"no write {k}: the operation wrote less than when counted"
        outcome = await check(sc, life, before)
        await follow_up(sc, life, before, outcome)
    finally:
        await life.close()


# -- targeted stories --------------------------------------------------------------------------------


def _write_of(sc: Scenario, what: str, db: Path) -> int:
    """The number of the write whose description contains `what`, in the scenario run once."""

    async def find() -> int:
        life, _, _, _ = await run(sc, db)
        try:
            return next(i for i, w in enumerate(life.store.log, 1) if what in w)
        finally:
            await life.close()

    return find()


async def test_h3_a_crash_in_the_switch_window_finishes_forward_and_keeps_the_targets_copy(db):
    """Review H3: the record already names the target but the switch step is not recorded
    done (as a controller that wrote them apart left it). The restarted controller must go
    forward (remove the source's copy), never release the copy the record names."""
    sc = BY_ID["cold-dir"]
    k = await _write_of(sc, "switch:done", db.with_name("count.db"))
    forged = []

    async def back_into_the_window(db: Path, before: Before) -> None:
        raw = SqliteStore(db)
        await raw.open()
        (op,) = [o for o in await raw.list_operations(NAME) if o.id not in before.ops]
        assert (await raw.get_container(NAME)).node == "n2"
        switch = op.step(StepName.SWITCH)
        await raw.put_operation(op.with_step(replace(switch, state=StepState.STARTED, finished_at=0.0)).changed())
        await raw.close()
        forged.append(op.id)

    life, before, _, crashed = await run(sc, db, crash_at=k, mode=AFTER, while_down=back_into_the_window)
    try:
        assert crashed and forged
        world = life.world
        assert not any(call == "release" for call, _ in world.hosts["n2"].calls), "the target's copy was released"
        assert world.running(NAME) == ["n2"] and world.holders(NAME) == ["n2"]
        assert (await life.store.get_container(NAME)).node == "n2"
        assert (await life.store.get_operation(forged[0])).state == OpState.SUCCEEDED
    finally:
        await life.close()


async def test_h2_a_rollback_that_cannot_reach_the_target_leaves_the_container_in_doubt(db):
    """Review H2: the target started the container, then dropped off the network before it
    answered. The rollback cannot prove that copy stopped, so the source must not run again:
    the container is in doubt, nothing starts it, until the target answers."""
    world = FakeWorld()
    life = await ControllerLife(world, db).open()
    try:
        await life.fleet.create(NAME, "busybox", "n1", Limits(), "dir", start=True)
        world.hosts["n2"].cut_after.add("start")
        op = await life.fleet.migrate(NAME, "n2", live=False, postcopy=False, fallback_cold=False)
        final = await life.wait(op.id)
        assert final.state == OpState.FAILED and "rollback failed" in final.error
        record = await life.store.get_container(NAME)
        assert record.in_doubt and record.doubt_nodes == ("n2",)
        assert world.running(NAME) == ["n2"], "the source ran again without proof the target's copy stopped"
        with pytest.raises(FailedPrecondition, match="in doubt"):
            await life.fleet.start(NAME)
        assert not world.violations

        assert not await life.fleet.settle_doubt(NAME)  # the target still does not answer
        world.hosts["n2"].reachable = True
        assert await life.fleet.settle_doubt(NAME)
        record = await life.store.get_container(NAME)
        # The one running copy is on n2: the record follows it; n1's stopped copy is stated.
        assert (record.node, record.in_doubt) == ("n2", "") and "n1" in record.message
        assert world.running(NAME) == ["n2"] and world.hosts["n2"].disk(NAME) == data_of(NAME)
    finally:
        await life.close()


async def test_a_lost_reply_to_create_leaves_no_orphan(db):
    """The host made the container but its reply was lost: the rollback asks it anyway and
    removes what it made; the record and its address go."""
    world = FakeWorld()
    life = await ControllerLife(world, db).open()
    try:
        world.hosts["n1"].lost_replies.add("create")
        with pytest.raises(CorralError):
            await life.fleet.create(NAME, "busybox", "n1", Limits(), "dir", start=True)
        assert world.holders(NAME) == [], "the host kept a container the fleet has no record of"
        assert await life.store.get_container(NAME) is None
        assert "10.77.0.10" not in await life.fleet._addresses_in_use()
        await life.fleet.create(NAME, "busybox", "n1", Limits(), "dir", start=True)  # the name is free again
        assert world.running(NAME) == ["n1"]
    finally:
        await life.close()


async def test_a_missed_heartbeat_of_the_target_does_not_fail_a_migration(db):
    """Review M9: one missed heartbeat marks the target unreachable in the registry, but the
    host answers: the migration's calls have their own deadlines, so it goes through."""
    world = FakeWorld()
    life = await ControllerLife(world, db).open()
    try:
        await life.fleet.create(NAME, "busybox", "n1", Limits(), "dir", start=True)
        op = await life.fleet.migrate(NAME, "n2", live=True, postcopy=False, fallback_cold=False)
        life.nodes._nodes["n2"].state = NodeState.SUSPECT  # as check_liveness does after a silence
        final = await life.wait(op.id)
        assert final.state == OpState.SUCCEEDED, final.error
        assert world.running(NAME) == ["n2"] and world.holders(NAME) == ["n2"]
    finally:
        await life.close()


async def test_a_lost_reply_to_restoring_a_kept_checkpoint_does_not_hide_where_it_runs(db):
    """After a failed post-copy, the checkpoint kept on n1 was restored but the reply was lost.
    The operation must not end saying nothing changed while n1 runs it and the record names
    n2: a later start would run it twice."""
    sc = BY_ID["from-checkpoint"]
    world = FakeWorld()
    life = await ControllerLife(world, db).open()
    try:
        before = await set_up(sc, life)
        world.hosts["n1"].lost_replies.add("resume_source")
        await act(sc, life, before)
        record = await life.store.get_container(NAME)
        assert world.running(NAME) == ["n1"]
        assert record.node == "n1" or record.in_doubt, f"runs on n1, the record says {record.node}"
        if not record.in_doubt:
            await life.fleet.start(NAME)
        assert not world.violations
    finally:
        await life.close()
