"""The controller's event stream: node health changes, operations, containers in doubt.

Events are numbered; the last `KEEP` stay in memory so that a watcher can resume
after a reconnect (`since`). A watcher that falls more than its queue behind is
told it missed events and must catch up from `since` (a bounded queue each:
a stalled watcher never grows the controller).
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import structlog

log = structlog.get_logger("corral.controller.events")

KEEP = 10_000
QUEUE = 1_000


@dataclass(frozen=True)
class Event:
    seq: int
    at: float  # wall clock
    kind: str  # node-state, operation, container-doubt, ...
    message: str
    node: str = ""
    container: str = ""
    op: str = ""
    fields: dict[str, str] = field(default_factory=dict)


class Lagged(Exception):
    """The watcher fell too far behind; resume with since=last seen."""


class EventBus:
    def __init__(self) -> None:
        self._seq = 0
        self._kept: collections.deque[Event] = collections.deque(maxlen=KEEP)
        self._watchers: set[asyncio.Queue] = set()

    def emit(self, kind: str, message: str, *, node: str = "", container: str = "", op: str = "",
             **fields: object) -> Event:  # fmt: skip
        self._seq += 1
        event = Event(self._seq, time.time(), kind, message, node, container, op,
                      {k: str(v) for k, v in fields.items()})  # fmt: skip
        self._kept.append(event)
        log.info("event", kind=kind, event_message=message, node=node or None, container=container or None,
                 op=op or None, **fields)  # fmt: skip
        for queue in list(self._watchers):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                self._watchers.discard(queue)  # it drains what it has, then hears it lagged
        return event

    def recent(self, *, node: str, limit: int = 8) -> list[Event]:
        """The last `limit` kept events about `node`, oldest first."""
        found: list[Event] = []
        for event in reversed(self._kept):
            if event.node == node:
                found.append(event)
                if len(found) == limit:
                    break
        return found[::-1]

    async def watch(self, since: int = 0, follow: bool = True) -> AsyncIterator[Event]:
        """Kept events after `since`, then (with `follow`) new ones as they come. Raises Lagged
        if this watcher falls behind by more than its queue."""
        queue: asyncio.Queue[Event] = asyncio.Queue(QUEUE)
        self._watchers.add(queue)
        try:
            last = since
            for event in list(self._kept):
                if event.seq > last:
                    last = event.seq
                    yield event
            while follow:
                if queue not in self._watchers and queue.empty():
                    raise Lagged(f"missed events after {last}: watch again with since={last}")
                event = await queue.get()
                if event.seq > last:
                    last = event.seq
                    yield event
        finally:
            self._watchers.discard(queue)
