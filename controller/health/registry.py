"""The live picture of the fleet's nodes, kept in memory and fed by heartbeats.

Heartbeats are frequent (1 s per host), so they touch memory only; a node's
facts are written to the store when it registers. How long a silence makes a
node suspect, then dead, is decided by controller.health.liveness; each change
of state is an event.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace

import structlog

from controller.events import EventBus
from controller.health.liveness import HealthPolicy, assess, describe
from controller.store.base import Store
from corral.errors import FailedPrecondition, NotFound
from corral.model import Node, NodeFacts, NodeState

log = structlog.get_logger("corral.controller.nodes")


@dataclass
class _Entry:
    facts: NodeFacts
    state: NodeState
    last_heartbeat: float  # wall clock, for display
    last_seen: float  # monotonic, for liveness


class NodeRegistry:
    def __init__(self, store: Store, policy: HealthPolicy | float, events: EventBus | None = None) -> None:
        self.store = store
        # A bare number: the silence before a node is suspect (its lease and margin as defaults).
        self.policy = policy if isinstance(policy, HealthPolicy) else HealthPolicy(suspect_after=policy)
        self.events = events or EventBus()
        self._nodes: dict[str, _Entry] = {}
        self._registered_this_run: set[str] = set()

    async def load(self) -> None:
        """Nodes known from before a controller restart are suspect until they beat: their leases
        are counted from now (a restarted controller cannot know when it last heard them)."""
        now = time.monotonic()
        for facts in await self.store.list_nodes():
            self._nodes[facts.name] = _Entry(facts, NodeState.SUSPECT, 0.0, now)

    def _set_state(self, name: str, entry: _Entry, state: NodeState, silent_for: float = 0.0) -> None:
        if entry.state == state:
            return
        previous, entry.state = entry.state, state
        why = describe(state, silent_for, self.policy) or f"heartbeats again (was {previous.value})"
        self.events.emit("node-state", f"node {name} is {state.value}: {why}", node=name, state=state.value,
                         previous=previous.value)  # fmt: skip

    async def register(self, facts: NodeFacts) -> None:
        await self.store.put_node(facts)
        previous = self._nodes.get(facts.name)
        entry = _Entry(facts, previous.state if previous else NodeState.SUSPECT, time.time(), time.monotonic())
        self._nodes[facts.name] = entry
        self._registered_this_run.add(facts.name)
        self._set_state(facts.name, entry, NodeState.READY)

    def heartbeat(self, facts: NodeFacts) -> bool:
        """Record a heartbeat; False if the node must register first."""
        entry = self._nodes.get(facts.name)
        if entry is None or facts.name not in self._registered_this_run:
            return False
        entry.facts = facts
        entry.last_heartbeat = time.time()
        entry.last_seen = time.monotonic()
        if entry.state == NodeState.FENCED:
            # Powered back on after a fence: it reports what it holds; nothing of it resumes by itself.
            log.warning("a fenced node heartbeats again", node=facts.name)
        self._set_state(facts.name, entry, NodeState.READY)
        return True

    def check_liveness(self) -> list[str]:
        """Move silent nodes on to suspect, then dead; returns the names whose state changed."""
        now = time.monotonic()
        changed = []
        for name, entry in self._nodes.items():
            if entry.state == NodeState.FENCED:
                continue  # stays fenced until it registers again
            silent_for = now - entry.last_seen
            state = assess(silent_for, self.policy)
            if state != NodeState.READY and state != entry.state:
                self._set_state(name, entry, state, silent_for)
                changed.append(name)
        return changed

    def why_not_lost(self, name: str) -> str | None:
        """None if `name` is proven unable to run anything: fenced. A dead node is not enough on
        its own: a host whose agent died cannot fence itself, and its containers may still run."""
        entry = self._nodes.get(name)
        if entry is None:
            return f"node {name} is not registered: nothing is known of it"
        if entry.state == NodeState.FENCED:
            return None
        silent_for = time.monotonic() - entry.last_seen
        if entry.state == NodeState.READY:
            return f"it is ready (heard {silent_for:.1f}s ago)"
        if entry.state == NodeState.SUSPECT:
            return (f"it is suspect: silent for {silent_for:.1f}s, maybe only cut off; its lease and margin "
                    f"run {self.policy.dead_after:g}s")  # fmt: skip
        return ("it is dead but not fenced: its agent may have died with its containers still running. "
                f"Power it off, then `corral node fenced {name}`")

    def mark_fenced(self, name: str, how: str) -> None:
        """The node is proven off (a fence command succeeded, or the operator says it is)."""
        entry = self._nodes.get(name)
        if entry is None:
            raise NotFound(f"node {name!r} is not registered")
        if entry.state == NodeState.READY:
            raise FailedPrecondition(f"node {name!r} is ready (it heartbeats): it is not fenced")
        entry.state, previous = NodeState.FENCED, entry.state
        self.events.emit("node-state", f"node {name} is fenced: {how}", node=name, state="fenced",
                         previous=previous.value)  # fmt: skip

    def health(self, name: str) -> str:
        entry = self._nodes.get(name)
        if entry is None:
            return ""
        return describe(entry.state, time.monotonic() - entry.last_seen, self.policy)

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
        return Node(entry.facts, entry.state, entry.last_heartbeat, health=self.health(name)) if entry else None

    def all(self) -> list[Node]:
        return [Node(e.facts, e.state, e.last_heartbeat, health=self.health(n)) for n, e in sorted(self._nodes.items())]

    def with_allocations(self, nodes: list[Node], allocated: dict[str, tuple]) -> list[Node]:
        return [
            replace(n, allocated=allocated[n.name][0], container_count=allocated[n.name][1])
            if n.name in allocated
            else n
            for n in nodes
        ]
