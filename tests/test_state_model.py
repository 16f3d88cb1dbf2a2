"""One source of truth per container, in the lab: a busy container refuses a second change with
a clear conflict, create and destroy are operations, and a controller that lost its records
never hands out the address of a container its hosts still hold."""

import asyncio
import shutil
import sqlite3

import pytest

from conftest import running_copies, until
import lab as corral_lab
from lab.readiness import wait_nodes_ready
from corral.errors import Conflict, NotFound


async def wait_for_phase(fleet, op_id: str, phase: str):
    async for snapshot in fleet.watch_operation(op_id):
        if snapshot.progress.phase.startswith(phase) or snapshot.state not in ("pending", "running"):
            return snapshot


async def test_start_or_stop_during_a_migration_gets_a_conflict(corral, cleanup, fleet, lab):
    cleanup.append("busy1")
    await corral("ct", "create", "busy1", "-t", "busybox", "--node", "n1", "--start")
    # Enough data that the rootfs pre-copy takes a moment.
    await corral("ct", "exec", "busy1", "--", "dd", "if=/dev/urandom", "of=/root/blob", "bs=1M", "count=150")
    op = await fleet.migrate("busy1", "n2")
    seen = await wait_for_phase(fleet, op.id, "precopy-rootfs")
    assert seen.state == "running", seen

    for verb in ("start", "stop"):
        refused = await corral("ct", verb, "busy1", check=False)
        assert refused.returncode == 5, refused
        assert f"busy with operation {op.id} (migrate)" in refused.stderr
    again = await corral("ct", "migrate", "busy1", "--to", "n3", check=False)
    assert again.returncode == 5 and op.id in again.stderr

    final = None
    async for final in fleet.watch_operation(op.id):
        pass
    assert final.state == "succeeded", final.error
    shown = await corral.json("ct", "show", "busy1")
    assert shown["node"] == "n2" and shown["state"] == "running" and shown["desired_state"] == "running"
    assert await running_copies(lab, "busy1") == ["n2"]


async def test_migrate_and_destroy_at_once_one_wins_and_the_record_agrees(corral, cleanup, fleet, lab):
    cleanup.append("race1")
    await corral("ct", "create", "race1", "-t", "busybox", "--node", "n1")
    destroy, migrate = await asyncio.gather(
        fleet.destroy_container("race1", force=True), fleet.migrate("race1", "n2"), return_exceptions=True
    )
    if isinstance(migrate, Exception):
        # The destroy got there first: the migration was refused, the container is gone everywhere.
        assert destroy is None, destroy
        assert isinstance(migrate, (Conflict, NotFound)), migrate
        with pytest.raises(NotFound):
            await fleet.get_container("race1")
        assert not any((h.lxc_path / "race1").exists() for h in lab.hosts)
    else:
        # The migration got there first: the destroy was refused, the container moved.
        assert isinstance(destroy, Conflict) and migrate.id in str(destroy), destroy
        final = None
        async for final in fleet.watch_operation(migrate.id):
            pass
        assert final.state == "succeeded", final.error
        assert (await fleet.get_container("race1")).node == "n2"
        assert [h.node for h in lab.hosts if (h.lxc_path / "race1").exists()] == ["n2"]


async def test_create_and_destroy_are_recorded_as_operations(corral, cleanup):
    cleanup.append("opsct")
    await corral("ct", "create", "opsct", "-t", "busybox", "--start")
    await corral("ct", "destroy", "--force", "opsct")
    ops = await corral.json("ops", "ls", "--container", "opsct")
    assert [(o["kind"], o["state"]) for o in ops] == [("create", "succeeded"), ("destroy", "succeeded")]
    assert [s["name"] for s in ops[0]["steps"]] == ["create-on-node", "start"]
    assert [s["name"] for s in ops[1]["steps"]] == ["destroy-on-node"]  # the record goes with its end


async def test_a_controller_that_lost_its_records_keeps_the_addresses_its_hosts_still_use(corral, cleanup, lab):
    cleanup.append("kept1")
    kept = await corral.json("ct", "create", "kept1", "-t", "busybox", "--node", "n1", "--start")
    db = lab.controller_log.parent / "state.db"
    aside = db.parent / "state-aside"
    await corral_lab.kill_controller(lab.name)
    aside.mkdir()
    for f in db.parent.glob("state.db*"):
        shutil.move(f, aside / f.name)
    try:
        await corral_lab.start_controller(lab.name)  # a fresh controller: no records at all
        await wait_nodes_ready(lab.cli_config, [h.node for h in lab.hosts])
        assert await corral.json("ct", "ls") == []
        newbie = await corral.json("ct", "create", "newbie", "-t", "busybox", "--node", "n2")
        assert newbie["network"]["ipv4_cidr"] != kept["network"]["ipv4_cidr"]
        assert newbie["network"]["mac"] != kept["network"]["mac"]
        await corral("ct", "destroy", "newbie")
        assert "has no record of" in lab.controller_log.read_text()
        assert (await corral.json("node", "show", "n1"))["unmanaged_containers"] == ["kept1"]
        assert "kept1" in (await corral("node", "show", "n1")).stdout
    finally:
        await corral_lab.kill_controller(lab.name)
        for f in db.parent.glob("state.db*"):
            f.unlink()
        for f in aside.iterdir():
            shutil.move(f, db.parent / f.name)
        aside.rmdir()
        await corral_lab.start_controller(lab.name)
        await wait_nodes_ready(lab.cli_config, [h.node for h in lab.hosts])
    assert await running_copies(lab, "kept1") == ["n1"]


async def _with_record_changed(lab, sql: str, *args, up=("n1", "n2", "n3")) -> None:
    """Stop the controller, change its store as a half-finished operation would have left it,
    start it again (a crash and restart, with that record)."""
    await corral_lab.kill_controller(lab.name)
    db = sqlite3.connect(lab.controller_log.parent / "state.db")
    db.execute(sql, args)
    db.commit()
    db.close()
    await corral_lab.start_controller(lab.name)
    await wait_nodes_ready(lab.cli_config, list(up))


async def test_a_container_in_doubt_is_started_by_nothing_until_the_operator_resolves_it(corral, cleanup, lab):
    cleanup.append("doubt1")
    await corral("ct", "create", "doubt1", "-t", "busybox", "--node", "n1")
    # As a failed migration's rollback leaves it: the record names n2 (where no copy is), a copy on n1.
    await _with_record_changed(lab, "UPDATE containers SET node='n2', in_doubt=?, doubt_nodes='[\"n1\"]' "
                                    "WHERE name='doubt1'", "migration op-x could not prove the copy on n1 stopped")
    shown = await corral.json("ct", "show", "doubt1")
    assert shown["in_doubt"].startswith("migration op-x") and shown["doubt_nodes"] == ["n1"]
    assert "in-doubt" in (await corral("ct", "ls")).stdout

    for args in (["ct", "start", "doubt1"], ["ct", "migrate", "doubt1", "--to", "n3"], ["ct", "destroy", "doubt1"]):
        refused = await corral(*args, check=False)
        assert refused.returncode == 5 and "in doubt" in refused.stderr, (args, refused)
        assert "corral ct resolve doubt1 --on NODE" in refused.stderr

    wrong = await corral("ct", "resolve", "doubt1", "--on", "n3", "--yes", check=False)
    assert wrong.returncode == 5 and "holds no copy" in wrong.stderr
    preview = await corral("ct", "resolve", "doubt1", "--on", "n1", "--dry-run")
    assert "would keep the copy on n1" in preview.stdout
    unasked = await corral("ct", "resolve", "doubt1", "--on", "n1", check=False)  # not a terminal: no silent go
    assert unasked.returncode == 2 and "--yes" in unasked.stderr
    assert (await corral.json("ct", "show", "doubt1"))["in_doubt"]

    done = await corral("ct", "resolve", "doubt1", "--on", "n1", "--yes")
    assert "kept the copy on n1" in done.stdout
    shown = await corral.json("ct", "show", "doubt1")
    assert shown["node"] == "n1" and not shown.get("in_doubt")
    await corral("ct", "start", "doubt1")
    assert await running_copies(lab, "doubt1") == ["n1"]


async def test_doubt_settles_by_itself_once_the_node_in_question_answers(corral, cleanup, lab):
    cleanup.append("doubt2")
    await corral("ct", "create", "doubt2", "-t", "busybox", "--node", "n1", "--start")
    await corral_lab.kill_agent(lab.name, "n2")  # the node that might run a copy cannot be asked
    try:
        await _with_record_changed(lab, "UPDATE containers SET in_doubt='a rollback could not reach n2', "
                                        "doubt_nodes='[\"n2\"]' WHERE name='doubt2'", up=("n1", "n3"))
        await asyncio.sleep(3)  # heartbeats from n1 come and go: n2 still cannot say
        assert (await corral.json("ct", "show", "doubt2"))["in_doubt"]
        unreachable = await corral("ct", "resolve", "doubt2", "--on", "n1", "--yes", check=False)
        assert unreachable.returncode == 7 and "n2" in unreachable.stderr  # nothing proven, nothing done
    finally:
        await corral_lab.start_agent(lab.name, "n2")

    async def settled():
        shown = await corral.json("ct", "show", "doubt2")
        return shown if not shown.get("in_doubt") else None

    shown = await until(settled, interval=0.3)
    assert shown["node"] == "n1" and shown["state"] == "running"
    assert await running_copies(lab, "doubt2") == ["n1"]
