"""An HA container's host that is cut off kills it before the fleet counts the host dead (its
lease runs out first), and nothing starts again by itself when the host comes back."""

import asyncio
import sys
import time

from conftest import events_of, running_copies, until
import lab as corral_lab


async def test_ha_needs_shared_storage_and_can_be_switched(corral, cleanup):
    cleanup.extend(["local1", "shared1"])
    refused = await corral("ct", "create", "local1", "-t", "busybox", "--ha", check=False)
    assert refused.returncode == 2 and "HA needs shared storage" in refused.stderr
    assert (await corral("ct", "show", "local1", check=False)).returncode == 3  # nothing was made
    await corral("ct", "create", "shared1", "-t", "busybox", "--storage", "shared")
    on = await corral.json("ct", "set", "shared1", "--ha", "--ha-priority", "7", "--ha-group", "db")
    assert (on["ha"], on["ha_priority"], on["ha_group"]) == (True, 7, "db")
    off = await corral.json("ct", "set", "shared1", "--no-ha")
    assert (off["ha"], off["ha_priority"], off["ha_group"]) == (False, 7, "db")
    alive = await corral("node", "fenced", "n1", "--yes", check=False)  # the operator's word, on a live node
    assert alive.returncode == 5 and "is ready (it heartbeats)" in alive.stderr
    unasked = await corral("node", "fenced", "n1", check=False)
    assert unasked.returncode == 2 and "--yes" in unasked.stderr


async def test_a_cut_off_host_kills_its_ha_containers_before_it_is_counted_dead(corral, cleanup, lab):
    cleanup.extend(["ha1", "plain1"])
    await corral("ct", "create", "ha1", "-t", "busybox", "--storage", "shared", "--ha", "--node", "n3", "--start")
    await corral("ct", "create", "plain1", "-t", "busybox", "--node", "n3", "--start")
    await asyncio.sleep(1.5)  # a heartbeat tells n3's agent that ha1 is HA
    since = max([e["seq"] for e in await events_of(corral)] or [0])

    await corral_lab.set_host_link(lab.name, "n3", up=False)
    try:
        cut = time.time()

        async def ha1_gone():
            return "n3" not in await running_copies(lab, "ha1")

        await until(ha1_gone, 10)
        fenced_at = time.time()
        assert await running_copies(lab, "plain1") == ["n3"]  # not HA: a partition is not a death

        async def n3_fenced():
            return (await corral.json("node", "show", "n3"))["state"] == "fenced"

        await until(n3_fenced, 20)  # dead past its lease and margin, then the lab's fence powers it off
        dead = [e for e in await events_of(corral, since) if e.get("node") == "n3" and e["fields"]["state"] == "dead"]
        assert dead and fenced_at < dead[0]["at"], (cut, fenced_at, dead)
    finally:
        await corral_lab.set_host_link(lab.name, "n3", up=True)
    await corral_lab.power_on(lab.name, "n3")

    async def n3_ready():
        return (await corral.json("node", "show", "n3"))["state"] == "ready"

    await until(n3_ready, 30)
    history = (await corral.json("node", "show", "n3"))["history"]  # node show says what happened
    assert [w for w in ("is suspect", "is dead", "is fenced", "is ready") if any(w in line for line in history)] == \
        ["is suspect", "is dead", "is fenced", "is ready"], history  # fmt: skip
    await asyncio.sleep(2)  # a few heartbeats later: nothing came back by itself
    assert await running_copies(lab, "ha1") == []
    shown = await corral.json("ct", "show", "ha1")
    assert (shown["node"], shown["state"], shown["desired_state"]) == ("n3", "stopped", "running")
    await corral("ct", "start", "ha1")  # the operator's word: its volume is taken again, it runs
    assert await running_copies(lab, "ha1") == ["n3"]


async def test_a_dead_hosts_ha_container_fails_over_and_runs_once_throughout(corral, cleanup, lab):
    cleanup.append("ha2")
    await corral("ct", "create", "ha2", "-t", "busybox", "--storage", "shared", "--ha", "--node", "n3", "--start")
    await asyncio.sleep(1.5)  # a heartbeat tells n3's agent that ha2 is HA
    counts: list[int] = []

    async def sample():  # how many hosts run it, several times a second, whatever happens
        while True:
            counts.append(len(await running_copies(lab, "ha2")))
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample())
    try:
        await corral_lab.set_host_link(lab.name, "n3", up=False)
        try:
            early = await corral("ct", "failover", "ha2", check=False)  # suspect only: refused
            assert early.returncode == 5 and "not proven unable to run it" in early.stderr, early

            async def n3_fenced():
                return (await corral.json("node", "show", "n3"))["state"] == "fenced"

            await until(n3_fenced, 20)
            done = await corral("ct", "failover", "ha2")
            assert "failing ha2 over from n3 to" in done.stderr
            shown = await corral.json("ct", "show", "ha2")
            assert shown["node"] in ("n1", "n2") and shown["state"] == "running"
            assert await running_copies(lab, "ha2") == [shown["node"]]
        finally:
            await corral_lab.set_host_link(lab.name, "n3", up=True)
        await corral_lab.power_on(lab.name, "n3")

        async def stale_copy_gone():
            return not (lab.host("n3").lxc_path / "ha2").exists()

        await until(stale_copy_gone, 30)  # n3 came back: its stopped leftover is removed, never started
        assert await running_copies(lab, "ha2") == [shown["node"]]
    finally:
        sampler.cancel()
    assert counts and max(counts) == 1, counts
    events = [e["message"] for e in await events_of(corral)]
    assert any(m.startswith("failover of ha2 succeeded") for m in events)
    assert any(m.startswith("removed the stopped copy of ha2 left on n3") for m in events)
    assert any(m.startswith("remove-stale-copy of ha2 succeeded") for m in events)  # a recorded operation


async def test_the_failover_daemon_moves_a_lost_hosts_ha_containers_and_only_one_daemon_acts(corral, cleanup, lab):
    cleanup.extend(["ha3", "ha4"])
    await corral("ct", "create", "ha3", "-t", "busybox", "--storage", "shared", "--ha", "--ha-priority", "5",
                 "--node", "n2", "--start")
    await corral("ct", "create", "ha4", "-t", "busybox", "--storage", "shared", "--ha", "--node", "n2", "--start")
    await asyncio.sleep(1.5)
    daemons = [await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controller.failoverd", "--config", str(lab.cli_config), "--holder", f"d{i}",
        "--lease-ttl", "3", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    ) for i in (1, 2)]  # fmt: skip
    counts: list[int] = []

    async def sample():
        while True:
            counts.append(max([len(await running_copies(lab, n)) for n in ("ha3", "ha4")]))
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample())
    try:
        since = max([e["seq"] for e in await events_of(corral)] or [0])
        await corral_lab.set_host_link(lab.name, "n2", up=False)
        cut = time.monotonic()

        async def both_moved():
            shown = [await corral.json("ct", "show", n) for n in ("ha3", "ha4")]
            return all(s["node"] != "n2" and s["state"] == "running" for s in shown)

        await until(both_moved, 30)
        took = time.monotonic() - cut
        print(f"host cut -> both HA containers running elsewhere: {took:.1f} s")
        assert took < 15, took  # dead at 7 s (lease 5 + margin 2), fenced, then the failover itself
        started = [e for e in await events_of(corral, since) if e["message"].startswith("failover of")
                   and e["message"].endswith("started")]  # fmt: skip
        assert sorted(e["container"] for e in started) == ["ha3", "ha4"]  # each once: one daemon acted
        assert started[0]["container"] == "ha3"  # higher priority first
    finally:
        sampler.cancel()
        for d in daemons:
            d.terminate()
            await d.wait()
        await corral_lab.set_host_link(lab.name, "n2", up=True)
        await corral_lab.power_on(lab.name, "n2", wait_ready=True)
    assert counts and max(counts) == 1, counts


async def test_a_host_whose_agent_died_is_fenced_before_its_ha_container_runs_elsewhere(corral, cleanup, lab):
    """Its agent cannot fence itself: the container keeps running there until the fence
    command powers the host off; only then may it start elsewhere."""
    cleanup.append("ha5")
    await corral("ct", "create", "ha5", "-t", "busybox", "--storage", "shared", "--ha", "--node", "n1", "--start")
    await asyncio.sleep(1.5)
    samples: list[tuple[float, list[str]]] = []

    async def sample():
        while True:
            samples.append((time.monotonic(), await running_copies(lab, "ha5")))
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample())
    try:
        killed = time.monotonic()
        await corral_lab.kill_agent(lab.name, "n1")  # the agent dies, its containers do not

        async def n1_fenced():
            return (await corral.json("node", "show", "n1"))["state"] == "fenced"

        await until(n1_fenced, 25)
        # It kept running while its host was only silent, then dead: nothing there could stop it.
        assert any(t - killed > 6.0 and copies == ["n1"] for t, copies in samples), samples
        assert await running_copies(lab, "ha5") == []  # the fence powered the host off
        await corral("ct", "failover", "ha5")
        moved = await corral.json("ct", "show", "ha5")
        assert moved["node"] in ("n2", "n3") and await running_copies(lab, "ha5") == [moved["node"]]
    finally:
        sampler.cancel()
        await corral_lab.power_on(lab.name, "n1", wait_ready=True)
    assert samples and max(len(copies) for _, copies in samples) == 1, samples
