"""Host maintenance in the lab with real containers: evacuate a node (live where it can),
every container running exactly once afterwards and the node empty and cordoned; the
fleet's N+1 check and a rebalance of a balanced fleet."""

from conftest import running_copies


async def test_evacuating_a_node_moves_everything_live_and_leaves_it_empty(corral, cleanup, lab):
    names = ["ev1", "ev2", "ev3"]
    cleanup.extend(names)
    for name in names[:2]:
        await corral("ct", "create", name, "-t", "busybox", "--node", "n1", "--start")
    await corral("ct", "create", "ev3", "-t", "busybox", "--node", "n1")  # stopped

    plan = await corral.json("node", "evacuate", "n1", "--dry-run")
    assert {m["container"] for m in plan["moves"]} >= set(names) and not plan.get("stuck")
    assert all(m["live"] for m in plan["moves"] if m["container"] in names[:2])
    assert not (await corral.json("node", "show", "n1")).get("cordoned")  # a dry run changes nothing

    done = await corral("node", "evacuate", "n1")
    assert done.returncode == 0, done
    node = await corral.json("node", "show", "n1")
    assert node["cordoned"] and node["container_count"] == 0
    for name in names[:2]:
        shown = await corral.json("ct", "show", name)
        assert shown["node"] != "n1" and shown["state"] == "running"
        assert await running_copies(lab, name) == [shown["node"]]  # exactly once
    assert (await corral.json("ct", "show", "ev3"))["state"] == "stopped"
    ops = await corral.json("ops", "ls")
    evacuations = [o for o in ops if o["kind"] == "evacuate"]
    assert evacuations and evacuations[-1]["state"] == "succeeded"
    moves = {o["container"]: o for o in ops if o["kind"] == "migrate" and o["container"] in names}
    assert all(moves[n]["params"]["live"] for n in names[:2]), moves  # the running ones moved live
    await corral("node", "uncordon", "n1")


async def test_fleet_check_and_a_balanced_fleet(corral, cleanup):
    cleanup.append("nc1")
    await corral("ct", "create", "nc1", "-t", "busybox", "--storage", "shared", "--ha", "--memory", "64M")
    check = await corral.json("fleet", "check")
    assert {c["node"] for c in check["nodes"]} == {"n1", "n2", "n3"} and all(c["ok"] for c in check["nodes"])
    shown = (await corral("fleet", "rebalance")).stdout
    assert "balanced" in shown


async def test_rebalancing_a_skewed_fleet_moves_the_fewest_live_and_ends_balanced(corral, cleanup, lab):
    names = ["rb1", "rb2", "rb3"]
    cleanup.extend(names)
    memory = min(n["facts"]["memory_bytes"] for n in await corral.json("node", "ls"))
    share = f"{memory * 12 // 100 // (1 << 20)}M"  # three on n1: 36% of it, the others near 0
    for name in names:
        await corral("ct", "create", name, "-t", "busybox", "--node", "n1", "--memory", share, "--start")
    plan = await corral.json("fleet", "rebalance")
    ours = [m for m in plan["moves"] if m["container"] in names]
    assert ours and all(m["source"] == "n1" for m in ours) and all(m["live"] for m in plan["moves"]), plan
    done = await corral("fleet", "rebalance", "--apply")
    assert done.returncode == 0, done
    for move in plan["moves"]:
        shown = await corral.json("ct", "show", move["container"])
        assert (shown["node"], shown["state"]) == (move["target"], "running")
    for name in names:
        assert len(await running_copies(lab, name)) == 1  # each exactly once
    assert "balanced" in (await corral("fleet", "rebalance")).stdout  # and nothing more to do
