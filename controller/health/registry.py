"""The live picture of the fleet's nodes, kept in memory and fed by heartbeats.

Heartbeats are frequent (1 s per host), so they touch memory only; a node's
facts are written to the store when it registers. How long a silence makes a
node suspect, then dead, is decided by controller.health.liveness; each change
of state is an event, and is told at once to whoever subscribed (the Fencer
starts fencing a node the moment it turns dead). `watch` wakes at the next
moment a silent node's state is due to change, so a node is declared dead on
time, not up to a poll later. Both clocks are injectable (the scenario
simulator runs this code on simulated time).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace
from typing import Callable

import structlog

from controller.events import EventBus
from controller.health.liveness import HealthPolicy, assess, describe, next_change, why_not_lost
from controller.store.base import Store
from corral.errors import FailedPrecondition, NotFound
from corral.model import Node, NodeFacts, NodeState

log = structlog.get_logger("corral.controller.nodes")

DUE_SLACK = 0.001  # seconds past a deadline at which watch looks: the state has changed by then

Clock = Callable[[], float]
StateListener = Callable[[str, NodeState], None]


# Looked up at each call rather than bound at import: tests patch time.monotonic.
def default_clock() -> float:
    return time.monotonic()


def default_wall_clock() -> float:
    return time.time()


@dataclass
class _Entry:
    facts: NodeFacts
    state: NodeState
    last_heartbeat: float  # wall clock, for display
    last_seen: float  # on the registry's monotonic clock, for liveness


class NodeRegistry:
    def __init__(self, store: Store, policy: HealthPolicy | float, events: EventBus | None = None,
                 clock: Clock = default_clock, wall_clock: Clock = default_wall_clock) -> None:  # fmt: skip
        self.store = store
        # A bare number: the silence before a node is suspect (its lease and margin as defaults).
        self.policy = policy if isinstance(policy, HealthPolicy) else HealthPolicy(suspect_after=policy)
        self.events = events or EventBus()
        self.clock = clock
        self._wall = wall_clock
        self._nodes: dict[str, _Entry] = {}
        self._registered_this_run: set[str] = set()
        self._listeners: list[StateListener] = []
        self._changed = asyncio.Event()  # a heartbeat or registration moved a deadline: watch recomputes

    def subscribe(self, listener: StateListener) -> Callable[[], None]:
        """Call `listener(node, new_state)` on every change of a node's state, synchronously (it must
        not block: set a flag, wake a task). Returns the function that unsubscribes it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def _tell(self, name: str, state: NodeState) -> None:
        for listener in list(self._listeners):
            try:
                listener(name, state)
            except Exception:  # a listener's bug must not stop liveness for the others
                log.exception("a node-state listener failed", node=name, state=state.value)

    async def load(self) -> None:
        """Nodes known from before a controller restart are suspect until they beat: their leases
        are counted from now (a restarted controller cannot know when it last heard them)."""
        now = self.clock()
        for facts in await self.store.list_nodes():
            self._nodes[facts.name] = _Entry(facts, NodeState.SUSPECT, 0.0, now)

    def _set_state(self, name: str, entry: _Entry, state: NodeState, silent_for: float = 0.0) -> None:
        if entry.state == state:
            return
        previous, entry.state = entry.state, state
        why = describe(state, silent_for, self.policy) or f"heartbeats again (was {previous.value})"
        self.events.emit("node-state", f"node {name} is {state.value}: {why}", node=name, state=state.value,
                         previous=previous.value)  # fmt: skip
        self._tell(name, state)

    async def register(self, facts: NodeFacts) -> None:
        await self.store.put_node(facts)
        previous = self._nodes.get(facts.name)
        entry = _Entry(facts, previous.state if previous else NodeState.SUSPECT, self._wall(), self.clock())
        self._nodes[facts.name] = entry
        self._registered_this_run.add(facts.name)
        self._changed.set()
        self._set_state(facts.name, entry, NodeState.READY)

    def heartbeat(self, facts: NodeFacts) -> bool:
        """Record a heartbeat; False if the node must register first."""
        entry = self._nodes.get(facts.name)
        if entry is None or facts.name not in self._registered_this_run:
            return False
        entry.facts = facts
        entry.last_heartbeat = self._wall()
        entry.last_seen = self.clock()
        if entry.state == NodeState.FENCED:
            # Powered back on after a fence: it reports what it holds; nothing of it resumes by itself.
            log.warning("a fenced node heartbeats again", node=facts.name)
        self._set_state(facts.name, entry, NodeState.READY)
        return True

    def check_liveness(self) -> list[str]:
        """Move silent nodes on to suspect, then dead; returns the names whose state changed."""
        now = self.clock()
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
        """None if `name` is proven unable to run anything (fenced); else why not (liveness.why_not_lost)."""
        entry = self._nodes.get(name)
        if entry is None:
            return f"node {name} is not registered: nothing is known of it"
        return why_not_lost(name, entry.state, self.clock() - entry.last_seen, self.policy)

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
        self._tell(name, NodeState.FENCED)

    def health(self, name: str) -> str:
        entry = self._nodes.get(name)
        if entry is None:
            return ""
        return describe(entry.state, self.clock() - entry.last_seen, self.policy)

    def next_deadline(self) -> float | None:
        """Seconds until the earliest change of state a silence could bring (None: none pending)."""
        now = self.clock()
        due = [next_change(now - e.last_seen, self.policy) for e in self._nodes.values() if e.state != NodeState.FENCED]
        return min((d for d in due if d is not None), default=None)

    async def watch(self, interval: float = 0.5) -> None:
        """Check liveness at each due change (just past it: `assess` is strict), and at least every
        `interval`; a registration wakes it to count the new node's deadline."""
        while True:
            due = self.next_deadline()
            wait = interval if due is None else min(interval, due + DUE_SLACK)
            self._changed.clear()
            try:
                async with asyncio.timeout(wait):
                    await self._changed.wait()
            except TimeoutError:
                pass
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
