"""The live picture of the fleet's nodes, kept in memory and fed by heartbeats.

Heartbeats are frequent (1 s per host), so they touch memory only; a node's
facts are written to the store when it registers. A node that misses its
heartbeats for `timeout` seconds is marked unreachable.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace

import structlog

from controller.store.base import Store
from corral.model import Node, NodeFacts, NodeState

log = structlog.get_logger("corral.controller.nodes")


@dataclass
class _Entry:
    facts: NodeFacts
    state: NodeState
    last_heartbeat: float  # wall clock, for display
    last_seen: float  # monotonic, for liveness


class NodeRegistry:
    def __init__(self, store: Store, timeout: float) -> None:
        self.store = store
        self.timeout = timeout
        self._nodes: dict[str, _Entry] = {}
        self._registered_this_run: set[str] = set()

    async def load(self) -> None:
        """Nodes known from before a controller restart start as unreachable until they beat."""
        for facts in await self.store.list_nodes():
            self._nodes[facts.name] = _Entry(facts, NodeState.UNREACHABLE, 0.0, 0.0)

    async def register(self, facts: NodeFacts) -> None:
        await self.store.put_node(facts)
        previous = self._nodes.get(facts.name)
        self._nodes[facts.name] = _Entry(facts, NodeState.READY, time.time(), time.monotonic())
        self._registered_this_run.add(facts.name)
        if previous is None or previous.state != NodeState.READY:
            log.info("node ready", node=facts.name, address=facts.address)

    def heartbeat(self, facts: NodeFacts) -> bool:
        """Record a heartbeat; False if the node must register first."""
        entry = self._nodes.get(facts.name)
        if entry is None or facts.name not in self._registered_this_run:
            return False
        entry.facts = facts
        entry.last_heartbeat = time.time()
        entry.last_seen = time.monotonic()
        if entry.state != NodeState.READY:
            entry.state = NodeState.READY
            log.info("node ready again", node=facts.name)
        return True

    def check_liveness(self) -> list[str]:
        """Mark silent nodes unreachable; returns the names newly marked."""
        now = time.monotonic()
        lost = []
        for name, entry in self._nodes.items():
            if entry.state == NodeState.READY and now - entry.last_seen > self.timeout:
                entry.state = NodeState.UNREACHABLE
                lost.append(name)
                log.warning("node unreachable", node=name, silent_for=round(now - entry.last_seen, 1))
        return lost

    async def watch(self, interval: float = 0.5) -> None:
        while True:
            await asyncio.sleep(interval)
            self.check_liveness()

    async def wait_ready(self, name: str, timeout: float) -> bool:
        """Wait (polling) until the node has re-registered and beats; False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            entry = self._nodes.get(name)
            if entry is not None and entry.state == NodeState.READY and name in self._registered_this_run:
                return True
            await asyncio.sleep(0.2)
        return False

    def get(self, name: str) -> Node | None:
        entry = self._nodes.get(name)
        return Node(entry.facts, entry.state, entry.last_heartbeat) if entry else None

    def all(self) -> list[Node]:
        return [Node(e.facts, e.state, e.last_heartbeat) for _, e in sorted(self._nodes.items())]

    def with_allocations(self, nodes: list[Node], allocated: dict[str, tuple]) -> list[Node]:
        return [
            replace(n, allocated=allocated[n.name][0], container_count=allocated[n.name][1])
            if n.name in allocated
            else n
            for n in nodes
        ]
