"""Fencing a dead node with the operator's fence command (IPMI, a PDU, a cloud API...).

A dead node is silent past its lease, but that does not prove its containers
stopped: its agent may have died with them running. So its HA containers move
only once it is *fenced*: the configured command (argv with `{node}`) exited 0
within its timeout, or the operator said so (`corral node fenced`). The
command is tried again every RETRY seconds while the node stays dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import structlog

from controller.health.registry import NodeRegistry
from corral.model import NodeState

log = structlog.get_logger("corral.controller.fencing")

RETRY = 10.0


class Fencer:
    def __init__(self, nodes: NodeRegistry, command: tuple[str, ...], timeout: float) -> None:
        self.nodes = nodes
        self.command = command
        self.timeout = timeout
        self._tried: dict[str, float] = {}  # node -> monotonic time of the last attempt

    async def run(self, interval: float = 0.5) -> None:
        while True:
            await asyncio.sleep(interval)
            for node in self.nodes.all():
                if node.state != NodeState.DEAD:
                    self._tried.pop(node.name, None)
                    continue
                if time.monotonic() - self._tried.get(node.name, -RETRY) >= RETRY:
                    self._tried[node.name] = time.monotonic()
                    await self.fence(node.name)

    async def fence(self, node: str) -> bool:
        argv = [a.replace("{node}", node) for a in self.command]
        shown = " ".join(argv)
        began = time.monotonic()
        # The operator's program, from the config (not one of ours: corral/programs.py lists those).
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )  # fmt: skip
        try:
            async with asyncio.timeout(self.timeout):
                out, err = await proc.communicate()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            self._failed(node, f"`{shown}` did not finish within {self.timeout:g}s")
            return False
        ms = (time.monotonic() - began) * 1000
        if proc.returncode != 0:
            why = (err or out).decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            self._failed(node, f"`{shown}` exited {proc.returncode}: {why[0][:300]}")
            return False
        if self.nodes.get(node) is not None and self.nodes.get(node).state == NodeState.DEAD:
            self.nodes.mark_fenced(node, f"fence command `{shown}` succeeded in {ms:.0f} ms")
        return True

    def _failed(self, node: str, why: str) -> None:
        log.error("fencing failed; trying again", node=node, why=why, retry_in=RETRY)
        self.nodes.events.emit("fence-failed", f"fencing {node} failed: {why}", node=node)
