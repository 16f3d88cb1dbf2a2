"""Placement and bad input, through the CLI against the lab: clear errors, nothing changed."""

import pytest


async def _names(corral):
    return sorted(c["name"] for c in await corral.json("ct", "ls"))


async def test_placement_honours_node_flag(corral, cleanup):
    cleanup += ["place-1", "place-3"]
    one = await corral.json("ct", "create", "place-1", "-t", "busybox", "--node", "n1")
    three = await corral.json("ct", "create", "place-3", "-t", "busybox", "--node", "n3")
    assert (one["node"], three["node"]) == ("n1", "n3")
    assert one["network"]["ipv4_cidr"] != three["network"]["ipv4_cidr"]


async def test_scheduler_spreads_by_free_memory(corral, cleanup):
    cleanup += ["spread-big", "spread-next"]
    big = await corral.json("ct", "create", "spread-big", "-t", "busybox", "--memory", "8G")
    nxt = await corral.json("ct", "create", "spread-next", "-t", "busybox", "--memory", "1G")
    assert nxt["node"] != big["node"]


async def test_memory_larger_than_any_host_is_refused_and_nothing_is_created(corral):
    before = await _names(corral)
    result = await corral("ct", "create", "too-big", "-t", "busybox", "--memory", "100T", check=False)
    assert result.returncode == 6
    assert "no node can take 'too-big'" in result.stderr and "n1: needs" in result.stderr
    assert await _names(corral) == before
    on_node = await corral("ct", "create", "too-big", "-t", "busybox", "--memory", "100T", "--node", "n2", check=False)
    assert on_node.returncode == 6 and "node 'n2' cannot take" in on_node.stderr
    assert await _names(corral) == before


@pytest.mark.parametrize(
    "name, message",
    [
        ("a/b", "path separator"),
        ("..", "path separator"),
        ("with space", "is invalid"),
        ("", "is empty"),
        ("x" * 200, "200 characters"),
        ("cafe\u0301", "non-ASCII"),
    ],
)
async def test_bad_names_are_refused_before_anything_is_touched(corral, lab, name, message):
    before = await _names(corral)
    on_hosts = {h.node: sorted(p.name for p in h.lxc_path.iterdir()) for h in lab.hosts}
    result = await corral("ct", "create", name, "-t", "busybox", check=False)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert result.stderr.count("\n") == 1  # one line, no traceback
    assert await _names(corral) == before
    assert on_hosts == {h.node: sorted(p.name for p in h.lxc_path.iterdir()) for h in lab.hosts}


@pytest.mark.parametrize("size", ["12XB", "-1M", "0", "1.5"])
async def test_malformed_sizes_are_refused(corral, size):
    result = await corral("ct", "create", "sized", "-t", "busybox", "--memory", size, check=False)
    assert result.returncode == 2 and "invalid memory size" in result.stderr
    assert "sized" not in await _names(corral)


async def test_unknown_node_template_and_container(corral):
    node = await corral("ct", "create", "nowhere", "-t", "busybox", "--node", "n9", check=False)
    assert node.returncode == 3 and "node 'n9' is not registered" in node.stderr
    template = await corral("ct", "create", "nowhere", "-t", "gentoo", check=False)
    assert template.returncode == 2 and "'gentoo' is not one of 'busybox', 'debian'" in template.stderr
    missing = await corral("ct", "start", "never-made", check=False)
    assert missing.returncode == 3 and "does not exist" in missing.stderr
    unknown_node = await corral("node", "show", "n9", check=False)
    assert unknown_node.returncode == 3


async def test_duplicate_name_is_refused(corral, cleanup):
    cleanup.append("dup")
    first = await corral.json("ct", "create", "dup", "-t", "busybox", "--node", "n1")
    again = await corral("ct", "create", "dup", "-t", "busybox", "--node", "n2", check=False)
    assert again.returncode == 4 and "already exists" in again.stderr
    shown = await corral.json("ct", "show", "dup")
    assert shown["node"] == first["node"] == "n1"


async def test_destroying_a_running_container_needs_force(corral, cleanup):
    cleanup.append("busy")
    await corral("ct", "create", "busy", "-t", "busybox", "--start")
    refused = await corral("ct", "destroy", "busy", check=False)
    assert refused.returncode == 5 and "stop it first or use --force" in refused.stderr
    assert (await corral.json("ct", "show", "busy"))["state"] == "running"
