"""A host where a program is missing: its agent says which capability that takes away and
why, and the controller refuses what needs it before anything is touched."""

from __future__ import annotations

import asyncio

import lab as corral_lab
from corral import programs
from corral.model import NodeState

NFT_MISSING = "nft not found (Debian package nftables)"


async def _restart_agent(lab, node: str, search_path: str | None = None) -> None:
    await corral_lab.kill_agent(lab.name, node)
    await corral_lab.start_agent(lab.name, node, search_path=search_path)


async def _node_when(fleet, node: str, ready_and) -> object:
    async with asyncio.timeout(60):
        while True:
            n = await fleet.get_node(node)
            if n.state == NodeState.READY and ready_and(n):
                return n
            await asyncio.sleep(0.2)


async def test_a_host_without_nft_offers_no_post_copy_and_the_request_is_refused_before_the_freeze(
    corral, cleanup, lab, fleet, tmp_path
):
    # n3 as a host where every declared program is installed but nftables.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for p in programs.PROGRAMS:
        found = programs.find(p.name)
        if found and p.name != "nft":
            (bin_dir / p.name).symlink_to(found)
    cleanup.append("nonft")
    await corral("ct", "create", "nonft", "-t", "busybox", "--node", "n3", "--start")
    before = await fleet.get_container("nonft")
    await _restart_agent(lab, "n3", search_path=str(bin_dir))
    try:
        n3 = await _node_when(fleet, "n3", lambda n: "post-copy" not in n.facts.live_strategies)
        assert n3.facts.unavailable[programs.POST_COPY] == NFT_MISSING
        assert n3.facts.live_unavailable["post-copy"] == NFT_MISSING
        assert "stop-and-copy" in n3.facts.live_strategies  # what does not need nft stays
        shown = await corral("node", "show", "n3")
        assert NFT_MISSING in shown.stdout, shown.stdout

        refused = await corral("ct", "migrate", "nonft", "--to", "n1", "--live", "--postcopy", check=False)
        assert refused.returncode == 5, refused.stderr
        assert NFT_MISSING in refused.stderr, refused.stderr
        after = await fleet.get_container("nonft")
        assert (after.node, after.state, after.init_pid) == ("n3", before.state, before.init_pid)
        ops = await fleet.list_operations("nonft")
        assert [op.kind for op in ops] == ["create"], "a refused migration starts no operation"
    finally:
        await _restart_agent(lab, "n3")
        await _node_when(fleet, "n3", lambda n: "post-copy" in n.facts.live_strategies)
