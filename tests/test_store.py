"""The store keeps its contract: compare-and-set on revisions, observations beside the desired
state, one transaction per logical change, and no write reported committed that was not."""

import asyncio
import contextlib
import os
import sqlite3
import time
from dataclasses import replace

import pytest

from controller.model import Operation, OpState
from controller.store.sqlite import SqliteStore
from corral.errors import Conflict, FailedPrecondition, NotFound
from corral.model import Container, ContainerState, DesiredState, Limits


def web(**changes) -> Container:
    return replace(Container("web", "n1", "busybox", ContainerState.STOPPED, created_at=time.time()), **changes)


async def test_a_stale_writer_gets_a_conflict_never_a_silent_overwrite(store):
    created = await store.insert_container(web())
    assert created.revision == 1
    ours, theirs = await store.get_container("web"), await store.get_container("web")
    moved = await store.update_container(replace(ours, node="n2"))
    assert moved.revision == 2
    with pytest.raises(Conflict, match="changed meanwhile"):
        await store.update_container(replace(theirs, limits=Limits(memory_bytes=1 << 30)))
    record = await store.get_container("web")
    assert record.node == "n2" and record.limits == Limits() and record.revision == 2
    with pytest.raises(Conflict):
        await store.delete_container("web", revision=1)
    await store.delete_container("web", revision=2)
    with pytest.raises(NotFound):
        await store.update_container(moved)


async def test_heartbeats_write_observed_state_only(store):
    await store.insert_container(web(desired_state=DesiredState.RUNNING))
    record = await store.update_container(replace(await store.get_container("web"), node="n2"))
    now = time.time()
    # The old node still reports its stopped copy: not this record's node any more (review L1).
    assert not await store.observe_container("web", "n1", ContainerState.STOPPED, 0, now)
    assert await store.observe_container("web", "n2", ContainerState.RUNNING, 42, now)
    seen = await store.get_container("web")
    assert (seen.node, seen.state, seen.init_pid, seen.observed_at) == ("n2", ContainerState.RUNNING, 42, now)
    assert seen.revision == record.revision and seen.desired_state == DesiredState.RUNNING
    # A report older than the last one written changes nothing.
    assert not await store.observe_container("web", "n2", ContainerState.STOPPED, 0, now - 1)
    assert (await store.get_container("web")).state == ContainerState.RUNNING
    # Desired-state writes leave the observation alone.
    await store.update_container(replace(seen, state=ContainerState.STOPPED, desired_state=DesiredState.STOPPED))
    again = await store.get_container("web")
    assert again.state == ContainerState.RUNNING and again.desired_state == DesiredState.STOPPED


async def test_a_transaction_commits_all_or_nothing(store):
    await store.insert_container(web())
    op = Operation.new("migrate", "web", {})
    with pytest.raises(RuntimeError):
        async with store.transaction() as tx:
            record = await tx.get_container("web")
            await tx.update_container(replace(record, node="n2"))
            await tx.put_operation(op)
            raise RuntimeError("crash between the two")
    assert (await store.get_container("web")).node == "n1"
    assert await store.get_operation(op.id) is None


async def test_one_failed_write_never_undoes_another_that_reported_success(store, tmp_path):
    """Review M1: on one connection, B's failed statement used to roll back A's executed write,
    whose commit then still returned normally."""
    await store.insert_container(web())
    async with store._read() as db, db.execute("PRAGMA page_count") as cur:
        pages = (await cur.fetchone())[0]
    await store.db.execute(f"PRAGMA max_page_count={pages + 3}")  # the disk is nearly full

    async def a_moves_it():
        await store.update_container(replace(await store.get_container("web"), node="n2"))

    async def b_writes_too_much():
        huge = Operation.new("migrate", "web", {"blob": "x" * 400_000})
        await store.put_operation(huge)

    a, b = await asyncio.gather(a_moves_it(), b_writes_too_much(), return_exceptions=True)
    assert a is None, a  # A reported success...
    assert isinstance(b, sqlite3.OperationalError) and "full" in str(b)  # ...B reported its failure
    on_disk = sqlite3.connect(tmp_path / "state.db").execute("SELECT node FROM containers").fetchone()[0]
    assert on_disk == "n2"  # ...and A's write is really there


async def test_an_older_operation_snapshot_never_overtakes_a_newer_one(store):
    op = Operation.new("migrate", "web", {})
    newer = op.changed(state=OpState.SUCCEEDED)
    await store.put_operation(newer)
    await store.put_operation(op.changed(state=OpState.RUNNING))  # a late progress write, same revision
    await store.put_operation(op)  # an even older one
    assert (await store.get_operation(op.id)).state == OpState.SUCCEEDED


async def test_a_store_made_by_an_older_version_opens_with_its_records(tmp_path):
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE containers (name TEXT PRIMARY KEY, node TEXT NOT NULL, template TEXT NOT NULL,
            state TEXT NOT NULL, limits TEXT NOT NULL, network TEXT NOT NULL, storage TEXT NOT NULL,
            created_at REAL NOT NULL, message TEXT NOT NULL DEFAULT '');
        CREATE TABLE operations (id TEXT PRIMARY KEY, container TEXT NOT NULL, state TEXT NOT NULL,
            data TEXT NOT NULL, created_at REAL NOT NULL);
        INSERT INTO containers VALUES ('web', 'n1', 'busybox', 'running', '{}', '{}', 'dir', 1.0, '');
    """)
    db.commit()
    db.close()
    store = SqliteStore(path)
    await store.open()
    record = await store.get_container("web")
    assert record.revision == 1 and record.state == ContainerState.RUNNING and record.volume_generation == 0
    await store.update_container(replace(record, node="n2"))
    await store.close()


async def test_one_controller_per_store(store, tmp_path):
    """Review H4: two controllers on one store would both resume the same operations."""
    second = SqliteStore(tmp_path / "state.db")
    with pytest.raises(FailedPrecondition, match=f"another controller \\(pid {os.getpid()}\\) uses the store"):
        await second.open()
    await store.close()
    await second.open()  # free once the first has let go (or died: the kernel drops its lock)
    await second.close()


async def test_a_write_cancelled_at_its_start_leaves_the_store_usable(store):
    """A request past its deadline is cancelled, maybe while its BEGIN runs: the store must not be
    left inside a transaction (every later write would fail until a restart)."""
    from corral.model import NodeFacts

    for delay in (0, 0.0001, 0.001, 0.005):
        task = asyncio.create_task(store.put_node(NodeFacts("n1", "10.0.0.1:7701")))
        await asyncio.sleep(delay)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await store.put_node(NodeFacts("n2", "10.0.0.2:7701"))  # a later write goes through
    assert "n2" in {n.name for n in await store.list_nodes()}
