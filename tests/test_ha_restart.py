"""An HA container that stops unasked comes back where it was first: its host restarts it
(ha_max_restart, 1 by default); stopped again, the fleet moves it to another node
(ha_max_relocate, 1); after that it is marked failed and waits for the operator."""

import asyncio
import os
import signal

from conftest import events_of, running_copies, until
import lab as corral_lab


async def crash(corral, lab, name: str) -> tuple[str, int]:
    """Kill the container's init from its host, as the OOM killer would."""
    shown = await corral.json("ct", "show", name)
    node, pid = shown["node"], shown["init_pid"]
    assert shown["state"] == "running" and pid, shown
    os.kill(pid, signal.SIGKILL)  # lab hosts share this machine's PID namespace
    return node, pid


async def test_restarted_in_place_then_relocated_then_failed(corral, cleanup, lab):
    cleanup.append("hr1")
    await corral("ct", "create", "hr1", "-t", "busybox", "--storage", "shared", "--ha", "--node", "n1", "--start")
    await asyncio.sleep(1.5)  # a heartbeat tells n1's agent to keep it running
    since = max([e["seq"] for e in await events_of(corral)] or [0])
    counts: list[int] = []

    async def sample():
        while True:
            counts.append(len(await running_copies(lab, "hr1")))
            await asyncio.sleep(0.1)

    async def running_again(node: str, old_pid: int):
        shown = await corral.json("ct", "show", "hr1")
        return shown if (shown["node"], shown["state"]) == (node, "running") and shown["init_pid"] != old_pid \
            else None  # fmt: skip

    sampler = asyncio.create_task(sample())
    try:
        node, pid = await crash(corral, lab, "hr1")  # 1st: its host starts it again
        shown = await until(lambda: running_again("n1", pid), 15)
        assert (await until(lambda: _restarts(corral, 1), 5))
        node, pid = await crash(corral, lab, "hr1")  # 2nd: restarts used up on n1, it moves
        moved = await until(lambda: _moved_from(corral, "n1"), 40)
        assert moved["ha_relocations"] == 1 and moved["state"] == "running", moved
        relocated = [e for e in await events_of(corral, since) if e["kind"] == "ha-relocate"]
        assert len(relocated) == 1 and "after 1 restart(s)" in relocated[0]["message"], relocated

        there = moved["node"]
        node, pid = await crash(corral, lab, "hr1")  # 3rd: its new host restarts it once
        await until(lambda: running_again(there, pid), 15)
        await crash(corral, lab, "hr1")  # 4th: restarts and relocations used up: failed

        async def failed():
            shown = await corral.json("ct", "show", "hr1")
            return shown if shown["ha_failed"] else None

        shown = await until(failed, 20)
        assert shown["node"] == there and "relocation(s) did not keep it running" in shown["ha_failed"]
        assert "failed" in (await corral("ct", "ls")).stdout
        await asyncio.sleep(2)  # it stays down: nobody restarts a failed container
        assert await running_copies(lab, "hr1") == []
        assert [e["kind"] for e in await events_of(corral, since) if e["kind"].startswith("ha-")] == \
            ["ha-relocate", "ha-failed"]  # fmt: skip
    finally:
        sampler.cancel()
    assert counts and max(counts) <= 1, counts

    await corral("ct", "start", "hr1")  # the operator's go: counts start again
    shown = await corral.json("ct", "show", "hr1")
    assert (shown["state"], shown["ha_failed"], shown["ha_relocations"]) == ("running", "", 0)


async def test_a_stop_asked_for_is_not_undone(corral, cleanup, lab):
    cleanup.append("hr2")
    await corral("ct", "create", "hr2", "-t", "busybox", "--storage", "shared", "--ha", "--node", "n2", "--start")
    await asyncio.sleep(1.5)
    await corral("ct", "stop", "hr2", "--force")
    await asyncio.sleep(3)  # heartbeats go on: a stopped-on-request container stays stopped
    assert await running_copies(lab, "hr2") == []
    shown = await corral.json("ct", "show", "hr2")
    assert (shown["state"], shown["ha_restarts"]) == ("stopped", 0)


async def _restarts(corral, n: int):
    return (await corral.json("ct", "show", "hr1"))["ha_restarts"] == n


async def _moved_from(corral, node: str):
    shown = await corral.json("ct", "show", "hr1")
    return shown if shown["node"] != node and shown["state"] == "running" else None


async def test_a_cut_between_lease_and_death_fences_then_runs_again_where_it_was(corral, cleanup, lab):
    """Cut off for 5.5 s: longer than the agent's lease (it kills its HA container), shorter than
    the dead threshold (nothing moves it). Once the lease is back and the fleet still places it
    there, the host starts it again: it does not stay down, and it never runs twice."""
    cleanup.append("hr3")
    await corral("ct", "create", "hr3", "-t", "busybox", "--storage", "shared", "--ha", "--node", "n3", "--start")
    await asyncio.sleep(1.5)
    before = (await corral.json("ct", "show", "hr3"))["init_pid"]
    since = max([e["seq"] for e in await events_of(corral)] or [0])
    counts: list[int] = []

    async def sample():
        while True:
            counts.append(len(await running_copies(lab, "hr3")))
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample())
    try:
        await corral_lab.partition(lab.name, "n3")
        try:
            await until(lambda: _gone(lab, "hr3"), 6)  # the agent fenced it when its lease ran out
            await asyncio.sleep(1)
        finally:
            await corral_lab.heal(lab.name, "n3")

        async def back():
            shown = await corral.json("ct", "show", "hr3")
            return shown if shown["state"] == "running" and shown["init_pid"] != before else None

        shown = await until(back, 15)
        assert shown["node"] == "n3" and shown["ha_restarts"] == 0  # not a crash: no restart counted
    finally:
        sampler.cancel()
    assert counts and max(counts) <= 1 and 0 in counts, counts
    states = [e["fields"]["state"] for e in await events_of(corral, since)
              if e["kind"] == "node-state" and e["node"] == "n3"]  # fmt: skip
    assert "dead" not in states and "fenced" not in states


async def _gone(lab, name: str) -> bool:
    return await running_copies(lab, name) == []
