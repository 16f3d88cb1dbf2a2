"""Reaching a node's agent from inside an operation.

A plan talks to a registered node even while it is marked unreachable: one missed
heartbeat says little about the next call, which has its own deadline. Calls that
are safe to repeat are retried while the node cannot be reached, up to a wait.
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, TypeVar

import structlog

from controller.agents import AgentClient, AgentPool
from controller.health.registry import NodeRegistry
from corral.errors import NotFound, Unavailable

T = TypeVar("T")
RETRY_INTERVAL = 1.0


class Reach:
    def __init__(self, nodes: NodeRegistry, agents: AgentPool) -> None:
        self.nodes = nodes
        self.agents = agents

    def agent(self, node: str) -> AgentClient:
        """The node's agent, whatever its heartbeats say (NotFound if never registered)."""
        entry = self.nodes.get(node)
        if entry is None:
            raise NotFound(f"node {node!r} is not registered")
        return self.agents.client(entry.facts)

    async def retrying(
        self, node: str, action: Callable[[AgentClient], Awaitable[T]], wait: float, log=None
    ) -> T:
        """`action(agent)`, tried again while the node cannot be reached, for at most `wait` s
        (only for actions that are safe to repeat)."""
        deadline = time.monotonic() + wait
        while True:
            try:
                return await action(self.agent(node))
            except Unavailable as exc:
                if time.monotonic() >= deadline:
                    raise
                (log or structlog.get_logger("corral.controller.reach")).info(
                    "node unreachable; trying again", node=node, error=exc.message)  # fmt: skip
                await asyncio.sleep(RETRY_INTERVAL)
