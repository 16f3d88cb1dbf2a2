"""The scheduler in the lab: the operator asks where a container would go (--dry-run) and is
told why; constraints on the hosts' labels (the lab gives n1 and n3 zone=a, n2 zone=b),
groups kept apart, a cordoned node left alone, and a migration whose target it chooses."""


async def test_constraints_dry_runs_and_cordons(corral, cleanup):
    cleanup.extend(["pz1", "pz2"])
    plan = await corral.json("ct", "create", "pz1", "-t", "busybox", "--constraint", "zone=b", "--dry-run")
    assert plan["node"] == "n2" and "of 1 fitting" in plan["reason"]
    assert plan["rejected"] == {"n1": "constraint zone=b not met (zone=a here)",
                                "n3": "constraint zone=b not met (zone=a here)"}
    assert (await corral("ct", "show", "pz1", check=False)).returncode == 3  # a dry run made nothing
    shown = await corral.json("ct", "create", "pz1", "-t", "busybox", "--constraint", "zone=b")
    assert shown["node"] == "n2" and shown["constraints"] == ["zone=b"]

    await corral("node", "cordon", "n2")
    try:
        assert "ready,cordoned" in (await corral("node", "ls")).stdout
        refused = await corral("ct", "create", "pz2", "-t", "busybox", "--constraint", "zone=b", check=False)
        assert refused.returncode != 0 and "n2: cordoned (no new placements)" in refused.stderr, refused
        assert (await corral("ct", "show", "pz2", check=False)).returncode == 3
        moved = await corral("ct", "migrate", "pz1", "--dry-run", check=False)  # zone b is n2 only
        assert moved.returncode != 0 and "n1: constraint zone=b not met" in moved.stderr, moved
    finally:
        await corral("node", "uncordon", "n2")
    bad = await corral("ct", "create", "pz2", "-t", "busybox", "--constraint", "zone", check=False)
    assert bad.returncode == 2 and "LABEL=VALUE" in bad.stderr


async def test_a_group_is_spread_and_a_migration_can_leave_the_choice_to_the_scheduler(corral, cleanup):
    cleanup.extend(["pg1", "pg2", "pg3"])
    nodes = set()
    for name in ("pg1", "pg2", "pg3"):
        nodes.add((await corral.json("ct", "create", name, "-t", "busybox", "--group", "web"))["node"])
    assert nodes == {"n1", "n2", "n3"}  # one member per node while it can be
    plan = await corral.json("ct", "migrate", "pg1", "--dry-run")
    source = (await corral.json("ct", "show", "pg1"))["node"]
    assert plan["node"] != source and "every fitting node already holds group web" in plan["reason"]
    done = await corral("ct", "migrate", "pg1")
    assert f"migrating pg1 to {plan['node']}" in done.stderr
    assert (await corral.json("ct", "show", "pg1"))["node"] == plan["node"]
