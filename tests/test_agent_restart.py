"""Restarting an agent leaves its containers running; the new agent finds them."""

import asyncio
import os
import time
from datetime import datetime

import lab as corral_lab


async def _wait_node_back(corral, node, since: float, timeout=20.0):
    """Until the restarted agent has reported in (a heartbeat newer than its restart)."""
    async with asyncio.timeout(timeout):
        while True:
            shown = await corral.json("node", "show", node)
            beat = shown["last_heartbeat"]  # RFC 3339
            if shown["state"] == "ready" and beat and datetime.fromisoformat(beat).timestamp() > since:
                return
            await asyncio.sleep(0.3)


async def test_containers_survive_agent_restart(corral, cleanup, lab):
    cleanup.append("survivor")
    await corral("ct", "create", "survivor", "-t", "busybox", "--node", "n2", "--start")
    pid_before = (await corral.json("ct", "show", "survivor"))["init_pid"]

    await corral_lab.kill_agent(lab.name, "n2")
    os.kill(pid_before, 0)  # the container's init still runs without its agent
    restarted = time.time()
    await corral_lab.start_agent(lab.name, "n2")
    await _wait_node_back(corral, "n2", restarted)

    shown = await corral.json("ct", "show", "survivor")
    assert shown["state"] == "running" and shown["init_pid"] == pid_before
    assert "survivor" in [c["name"] for c in await corral.json("ct", "ls", "--node", "n2")]
    hi = await corral("ct", "exec", "survivor", "--", "echo", "still here")
    assert hi.stdout == "still here\n"
