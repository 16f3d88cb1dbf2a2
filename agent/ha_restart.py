"""Local restarts of HA containers that stopped unasked (their init died, the OOM killer).

Each heartbeat reply lists the HA containers the fleet wants running on this host and
the policy: at most `max_restart` restarts in `window` seconds. A listed container that
is stopped although this agent did not stop it (ContainerManager.stopped_unasked) is
started again, within that budget, and only while this host holds its lease: without
it, the container may be running elsewhere by now. Past the budget it stays stopped;
the heartbeat reports the restarts made (Container.ha_restarts) and the controller
relocates it (controller/scheduler/recovery.py). One this host killed when its
lease ran out (self-fencing) is started again, outside that budget, once the lease
is back and the fleet still lists it here: then nothing else can be running it.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable, Sequence

import structlog

from agent.containers import ContainerManager
from agent.lease import Lease
from corral.errors import CorralError

log = structlog.get_logger("corral.agent.ha_restart")


class LocalRestarts:
    def __init__(self, containers: ContainerManager, lease: Lease | None,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.containers = containers
        self.lease = lease
        self._clock = clock
        self._made: dict[str, deque[float]] = {}  # container -> when each restart was made
        self._window = 600.0
        self._gave_up: set[str] = set()

    def count(self, name: str) -> int:
        """Restarts made within the window (reported with each heartbeat)."""
        made = self._made.get(name)
        if not made:
            return 0
        while made and self._clock() - made[0] > self._window:
            made.popleft()
        return len(made)

    def _lease_held(self) -> bool:
        if self.lease is None:
            return False
        left = self.lease.remaining()
        return left is not None and left > 0 and not self.lease.fenced

    async def tend(self, keep_running: Sequence[str], max_restart: int, window: float) -> None:
        """Start again, within the budget, what the fleet wants running and stopped unasked."""
        if window > 0:
            self._window = window
        for name in keep_running:
            if not self._lease_held():
                return
            if self.containers.self_fenced(name):
                # Killed when the lease ran out, and the fleet still places it here now that the
                # lease is back (a cut shorter than the dead threshold): nothing else runs it.
                try:
                    await self.containers.restart_after_fence(name)
                except CorralError as exc:
                    log.error("restarting a fenced HA container failed", container=name, error=exc.message)
                continue
            if not await self.containers.stopped_unasked(name):
                continue
            made = self.count(name)
            if made >= max_restart:
                if name not in self._gave_up:
                    self._gave_up.add(name)
                    log.error("HA container stopped unasked again; restarts used up, the fleet relocates it",
                              container=name, restarts=made, max_restart=max_restart)  # fmt: skip
                continue
            self._gave_up.discard(name)
            self._made.setdefault(name, deque()).append(self._clock())
            log.warning("HA container stopped unasked; starting it again here", container=name,
                        restart=made + 1, max_restart=max_restart)  # fmt: skip
            try:
                await self.containers.start(name)
            except CorralError as exc:
                log.error("restarting an HA container failed", container=name, error=exc.message)
        for name in list(self._made):
            if name not in keep_running and not self.count(name):
                del self._made[name]
