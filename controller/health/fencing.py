"""Fencing a dead node with the operator's fence command (IPMI, a PDU, a cloud API...).

A dead node is silent past its lease, but that does not prove its containers
stopped: its agent may have died with them running. So its HA containers move
only once it is *fenced*: the fence action (by default the configured command,
argv with `{node}`) succeeded within its timeout, or the operator said so
(`corral node fenced`). Fencing starts the moment the registry declares a node
dead (it tells its subscribers), each node on its own (a hung fence of one node
never delays another's), and is tried again every RETRY seconds while the node
stays dead; a slower poll is the safety net for a missed change. The clock and
the action are injectable (the scenario simulator fences simulated hosts).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from typing import Awaitable, Callable

import structlog

from controller.health.registry import Clock, NodeRegistry, default_clock
from corral.model import NodeState

log = structlog.get_logger("corral.controller.fencing")

RETRY = 10.0
POLL = 2.0  # the safety net: fencing is started by the registry's news, not by this poll

# Fences `node`; returns whether it is proven off, and what happened (for the log and the events).
FenceAction = Callable[[str], Awaitable[tuple[bool, str]]]


def fence_command(command: tuple[str, ...]) -> FenceAction:
    """The operator's program (argv with `{node}`), from the config (not one of ours:
    corral/programs.py lists those). Cancelled (a timeout), its whole process group is killed."""

    async def run(node: str) -> tuple[bool, str]:
        argv = [a.replace("{node}", node) for a in command]
        shown = " ".join(argv)
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )  # fmt: skip
        try:
            out, err = await proc.communicate()
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            raise
        if proc.returncode != 0:
            why = (err or out).decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            return False, f"`{shown}` exited {proc.returncode}: {why[0][:300]}"
        return True, f"fence command `{shown}` succeeded"

    return run


class Fencer:
    def __init__(self, nodes: NodeRegistry, command: tuple[str, ...], timeout: float,
                 action: FenceAction | None = None, clock: Clock = default_clock) -> None:  # fmt: skip
        self.nodes = nodes
        self.command = command
        self.timeout = timeout
        self.action = action or fence_command(command)
        self.clock = clock
        self._tried: dict[str, float] = {}  # node -> when its last attempt began, on `clock`
        self._fencing: dict[str, asyncio.Task] = {}  # node -> its attempt in progress
        self._wake = asyncio.Event()  # a node died, or an attempt ended (a retry may be due at once)

    async def run(self, poll: float = POLL) -> None:
        def changed(node: str, state: NodeState) -> None:
            if state == NodeState.DEAD:
                self._wake.set()

        unsubscribe = self.nodes.subscribe(changed)
        try:
            while True:
                self._wake.clear()
                wait = min(poll, self._start_due())
                try:
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
                except TimeoutError:
                    pass
        finally:
            unsubscribe()
            for task in self._fencing.values():
                task.cancel()
            await asyncio.gather(*self._fencing.values(), return_exceptions=True)

    def _start_due(self) -> float:
        """Start an attempt for each dead node due one; returns the seconds until the next retry."""
        now, next_retry = self.clock(), RETRY
        for node in self.nodes.all():
            name = node.facts.name
            if node.state != NodeState.DEAD:
                self._tried.pop(name, None)
                continue
            if name in self._fencing:
                continue
            left = self._tried.get(name, now - RETRY) + RETRY - now
            if left > 0:
                next_retry = min(next_retry, left)
                continue
            self._tried[name] = now
            task = asyncio.create_task(self.fence(name))
            self._fencing[name] = task
            task.add_done_callback(lambda _, name=name: self._ended(name))
        return next_retry

    def _ended(self, node: str) -> None:
        self._fencing.pop(node, None)
        self._wake.set()

    async def fence(self, node: str) -> bool:
        began = self.clock()
        try:
            async with asyncio.timeout(self.timeout):
                ok, detail = await self.action(node)
        except TimeoutError:
            ok, detail = False, f"{self._what(node)} did not finish within {self.timeout:g}s"
        except Exception as exc:  # the action's bug: a failed attempt, tried again later
            log.exception("the fence action failed", node=node)
            ok, detail = False, f"{self._what(node)} failed: {exc}"
        if not ok:
            self._failed(node, detail)
            return False
        ms = (self.clock() - began) * 1000
        entry = self.nodes.get(node)
        if entry is not None and entry.state == NodeState.DEAD:
            self.nodes.mark_fenced(node, f"{detail} in {ms:.0f} ms")
        return True

    def _what(self, node: str) -> str:
        return f"`{' '.join(a.replace('{node}', node) for a in self.command)}`" if self.command else "the fence action"

    def _failed(self, node: str, why: str) -> None:
        log.error("fencing failed; trying again", node=node, why=why, retry_in=RETRY)
        self.nodes.events.emit("fence-failed", f"fencing {node} failed: {why}", node=node)
