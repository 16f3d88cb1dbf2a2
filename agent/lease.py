"""This host's lease from the controller, and self-fencing when it runs out.

Each acknowledged heartbeat renews the lease for `lease_seconds`, counted from
when the heartbeat was *sent*, and this agent gives it up `MARGIN` earlier than
that; the controller declares the node dead only later still (its own margin).
When the lease runs out unrenewed, the agent kills the HA containers the fleet
placed here and lets go of their volumes, so that they can be started elsewhere
without ever running twice (DESIGN rule 1). It restarts nothing by itself when
the controller comes back: it reports what it holds.

The clock is CLOCK_BOOTTIME (monotonic, and it survives an agent restart): the
lease and the HA list are kept in state_dir/lease.json, so an agent restarted
after its lease ran out fences at once instead of trusting a lease it lost.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Awaitable, Callable

import structlog

log = structlog.get_logger("corral.agent.lease")

MARGIN = 1.0  # seconds this host gives its lease up before the controller may count it expired


def boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def boot_id() -> str:
    """This boot's id: CLOCK_BOOTTIME starts again from 0 at a reboot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


class Lease:
    def __init__(self, state_file: Path, fence: Callable[[list[str]], Awaitable[None]],
                 clock: Callable[[], float] = boottime, boot: str | None = None) -> None:  # fmt: skip
        self.state_file = state_file
        self._fence = fence
        self._clock = clock
        self._boot = boot_id() if boot is None else boot
        self.expires: float | None = None  # on `clock`; None: no lease held since the agent started
        self.ha: list[str] = []
        self.fenced = False  # the lease ran out and the HA containers were killed; until renewed
        self._changed = asyncio.Event()
        self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.state_file.read_text())
            self.expires, self.ha = float(data["expires"]), [str(n) for n in data["ha"]]
            if data.get("boot") != self._boot:
                self.expires = 0.0  # from before a reboot: its clock means nothing now, the lease is gone
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Unreadable: assume the worst, a lease already gone, for whatever it listed.
            log.warning("lease file unreadable; treating the lease as expired", path=str(self.state_file), error=str(exc))
            self.expires = 0.0

    def _save(self, payload: str) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(payload)
        os.replace(tmp, self.state_file)  # no fsync: after a power loss nothing of ours runs anyway

    def now(self) -> float:
        return self._clock()

    async def renewed(self, sent_at: float, lease_seconds: float, ha: list[str]) -> None:
        """A heartbeat sent at `sent_at` (on this lease's clock) was acknowledged."""
        if lease_seconds <= 0:
            return  # a controller that grants no lease
        if (left := self.remaining()) is not None and left <= 0 and not self.fenced:
            # Run out before the guard saw it (an agent restarted, or stalled): a late renewal does
            # not mend a lease that lapsed, so what it covered is fenced first.
            await self._fence_now()
        self.expires = max(self.expires or 0.0, sent_at + lease_seconds - MARGIN)
        self.ha = sorted(ha)
        if self.fenced:
            log.info("lease renewed after fencing; nothing restarts by itself", ha=self.ha)
            self.fenced = False
        self._changed.set()
        payload = json.dumps({"expires": self.expires, "ha": self.ha, "boot": self._boot})
        await asyncio.to_thread(self._save, payload)  # once a second: never on the event loop

    def remaining(self) -> float | None:
        return None if self.expires is None else self.expires - self.now()

    def valid(self) -> bool:
        """Held and not run out: what the kernel watchdog is petted on (agent/watchdog.py)."""
        left = self.remaining()
        return left is not None and left > 0 and not self.fenced

    async def guard(self) -> None:
        """Fence when the lease runs out; runs until cancelled."""
        while True:
            left = self.remaining()
            if left is not None and left <= 0 and not self.fenced:
                await self._fence_now()
                continue
            self._changed.clear()
            wait = 0.5 if left is None or self.fenced else max(0.0, left)
            try:
                async with asyncio.timeout(wait):
                    await self._changed.wait()
            except TimeoutError:
                pass

    async def _fence_now(self) -> None:
        self.fenced = True
        if not self.ha:
            log.warning("lease lost; no HA container here to fence")
            return
        began = time.monotonic()
        log.error("lease lost: killing this host's HA containers and letting go of their volumes", ha=self.ha,
                  late_by=round(-(self.remaining() or 0.0), 3))  # fmt: skip
        try:
            await self._fence(list(self.ha))
        except Exception:
            log.exception("fencing failed")  # each container is tried on its own; this is a bug
        log.error("fenced", ha=self.ha, ms=round((time.monotonic() - began) * 1000, 1), at=time.time())
