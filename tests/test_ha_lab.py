"""HA faults in the lab, real containers on shared storage, with a sampler that asks every
host several times a second how many copies of each HA container run (never more than one):
a flapping link, an agent killed with no fence command configured, a partition with the
failover daemon running (the isolated copy stopped by self-fencing before the new one starts)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

import lab as corral_lab
from conftest import events_of, until
from lab.copies import CopySampler, failover_daemon


async def _last_seq(corral) -> int:
    return max([e["seq"] for e in await events_of(corral)] or [0])


async def _create_ha(corral, cleanup, name: str, node: str) -> None:
    cleanup.append(name)
    await corral("ct", "create", name, "-t", "busybox", "--storage", "image", "--ha", "--node", node, "--start")


def _agent_log(lab, node: str, since: int) -> list[dict]:
    """The agent's JSON log records of `node` after byte offset `since`."""
    with open(lab.host(node).log_file, "rb") as f:
        f.seek(since)
        lines = f.read().decode(errors="replace").splitlines()
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def _node_states(events: list[dict], node: str) -> list[str]:
    return [e["fields"]["state"] for e in events if e["kind"] == "node-state" and e.get("node") == node]


async def test_a_flapping_link_neither_fences_nor_fails_over(corral, cleanup, lab):
    await _create_ha(corral, cleanup, "flap1", "n3")
    await asyncio.sleep(1.5)  # a heartbeat tells n3's agent that flap1 is HA
    since, log_at = await _last_seq(corral), lab.host("n3").log_file.stat().st_size
    async with failover_daemon(lab), CopySampler(lab, ["flap1"]) as sampler:
        try:
            for _ in range(4):  # down 2 s, up 3 s: well inside the lease (5 s) and the dead threshold (7 s)
                await corral_lab.partition(lab.name, "n3")
                await asyncio.sleep(2)
                await corral_lab.heal(lab.name, "n3")
                await asyncio.sleep(3)
        finally:
            await corral_lab.heal(lab.name, "n3")

        async def n3_ready():
            return (await corral.json("node", "show", "n3"))["state"] == "ready"

        await until(n3_ready, 10)
    events = await events_of(corral, since)
    assert set(_node_states(events, "n3")) <= {"suspect", "ready"}, events
    assert not [e for e in events if e["kind"] == "fence-failed" or "failover of" in e["message"]], events
    agent_log = _agent_log(lab, "n3", log_at)
    told = [r for r in agent_log if r.get("level") in ("warning", "error") or "lease" in r.get("event", "")]
    assert not [r for r in agent_log if r.get("event") == "fenced"], ("n3's agent fenced itself", told)
    shown = await corral.json("ct", "show", "flap1")
    assert (shown["node"], shown["state"]) == ("n3", "running")
    assert sampler.samples and sampler.max_copies() == 1, sampler.doubles()
    assert all(s.hosts["flap1"] == ["n3"] for s in sampler.samples), "flap1 stopped or moved while the link flapped"


async def test_without_a_fence_command_a_host_whose_agent_died_is_not_failed_over(corral, cleanup, lab):
    """Its containers may still run (they do): a dead node is not a fenced one, and nothing
    can prove it off. The controller refuses and says why; the failover daemon does nothing."""
    await corral_lab.set_fencing(lab.name, False)
    try:
        await _create_ha(corral, cleanup, "nofence1", "n1")
        await asyncio.sleep(1.5)
        since = await _last_seq(corral)
        async with failover_daemon(lab), CopySampler(lab, ["nofence1"]) as sampler:
            await corral_lab.kill_agent(lab.name, "n1")  # SIGKILL; its containers keep running

            async def n1_dead():
                return (await corral.json("node", "show", "n1"))["state"] == "dead"

            await until(n1_dead, 20)
            shown = await corral.json("node", "show", "n1")
            assert "move only once it is fenced" in shown["health"], shown
            refused = await corral("ct", "failover", "nofence1", check=False)
            assert refused.returncode == 5, refused
            assert "dead but not fenced: its agent may have died with its containers still running" in refused.stderr
            assert "corral node fenced n1" in refused.stderr
            await asyncio.sleep(7)  # two sweeps of the daemon (every 3 s) and more: it must leave it alone
        events = await events_of(corral, since)
        assert _node_states(events, "n1") == ["suspect", "dead"], events  # never fenced: nothing could
        assert not [e for e in events if "failover of" in e["message"]], events
        assert (await corral.json("ct", "show", "nofence1"))["node"] == "n1"
        assert sampler.samples and all(s.hosts["nofence1"] == ["n1"] for s in sampler.samples), sampler.doubles()
    finally:
        await corral_lab.power_on(lab.name, "n1", wait_ready=True)  # its agent back: it finds the container running
        await corral_lab.set_fencing(lab.name, True)


async def test_a_partitioned_hosts_copies_stop_by_self_fencing_before_they_start_elsewhere(corral, cleanup, lab):
    names = ["part1", "part2"]
    for name in names:
        await _create_ha(corral, cleanup, name, "n2")
    await asyncio.sleep(1.5)
    since, log_at = await _last_seq(corral), lab.host("n2").log_file.stat().st_size
    async with failover_daemon(lab), CopySampler(lab, names) as sampler:
        try:
            cut = time.time()
            await corral_lab.partition(lab.name, "n2")

            async def all_moved():
                shown = [await corral.json("ct", "show", n) for n in names]
                return all(s["node"] != "n2" and s["state"] == "running" for s in shown) and shown

            moved = await until(all_moved, 30)
            took = time.time() - cut
        finally:
            await corral_lab.heal(lab.name, "n2")
        await corral_lab.power_on(lab.name, "n2", wait_ready=True)  # the lab's fence powered it off

        async def stale_copies_gone():
            return not any((lab.host("n2").lxc_path / n).exists() for n in names)

        await until(stale_copies_gone, 30)
        await asyncio.sleep(3)  # a few heartbeats of the host back: nothing starts again
    assert took < 15, took
    # From the host's side: its agent lost its lease and killed both (its log, wall clock).
    fenced = [r for r in _agent_log(lab, "n2", log_at) if r.get("event") == "fenced"]
    assert fenced and set(names) <= set(fenced[0]["ha"]), fenced
    self_fenced_at = float(fenced[0]["at"])
    # From the controller's side: the failovers began after that, and each started once.
    events = await events_of(corral, since)
    started = {e["container"]: e["at"] for e in events if e["message"].startswith("failover of")
               and e["message"].endswith("started")}  # fmt: skip
    assert sorted(started) == names, events
    assert len([e for e in events if e["message"].startswith("failover of") and e["message"].endswith("started")]) == 2
    for ct in moved:
        name, there = ct["name"], ct["node"]
        assert self_fenced_at < started[name], (self_fenced_at, started)
        # And from outside: last seen on n2 before first seen elsewhere.
        last_on_n2, first_elsewhere = sampler.last_seen_on(name, "n2"), sampler.first_seen_off(name, "n2")
        assert last_on_n2 is not None and first_elsewhere is not None and last_on_n2 < first_elsewhere
        assert sampler.samples[-1].hosts[name] == [there]  # still where it moved, once
    assert sampler.samples and sampler.max_copies() == 1, sampler.doubles()
