"""Host beacons on the shared storage: who still uses it, told with no network at all.

Every host that mounts `image` volumes rewrites `shared_dir/hosts/<node>.beacon`
every INTERVAL seconds: its incarnation, a counter, and the volumes it has mounted
at that moment. Each host reads its peers' beacons and notes, on its own monotonic
clock, when each one last changed: no clocks are compared across hosts (sanlock's
delta leases work the same way).

Two rules use them (the fence at the data, with ownership.py's generations):
- a host that could not write its beacon for GIVE_UP seconds lets go of every
  volume it has mounted (kills their containers, shuts their filesystems down):
  it can no longer show the others what it holds;
- a host taking a volume over from a holder that never released it mounts it only
  once a beacon of the holder written after the takeover's claim no longer lists
  it (the holder re-checks the ownership of what it has mounted every INTERVAL and
  lets go of what another host claimed), or the holder's beacon stood still for
  GONE_AFTER: GIVE_UP plus a margin.
A holder whose agent hangs with its containers running defeats both: that is the
watchdog's case (agent/watchdog.py), and the controller's fencing before any takeover.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import structlog

from corral.errors import CorralError
from corral.names import validate_name

log = structlog.get_logger("agent.storage.beacons")

INTERVAL = 1.0
GIVE_UP = 3.0  # the holder's side: no beacon written for this long, let go of the volumes
GONE_AFTER = GIVE_UP + 2.0  # a peer's side: its beacon still for this long, it holds nothing
_IO_TIMEOUT = 5.0  # a write or read on a hung shared storage must not hold the loop's tasks forever


@dataclass(frozen=True)
class Beacon:
    incarnation: str
    counter: int
    mounted: frozenset[str]


@dataclass
class _Seen:
    beacon: Beacon
    changed_at: float


class Beacons:
    """This host's beacon and what it sees of its peers'. `clock`: monotonic seconds."""

    def __init__(self, directory: Path, node: str, clock=time.monotonic) -> None:
        self.directory = directory
        self.node = node
        self._clock = clock
        self._incarnation = secrets.token_hex(6)
        self._counter = 0
        self._written_at: float | None = None
        self._started = clock()
        self._peers: dict[str, _Seen] = {}

    def _path(self, node: str) -> Path:
        return self.directory / f"{node}.beacon"

    # --- our side -----------------------------------------------------------------------

    async def beat(self, mounted: Callable[[], Iterable[str]]) -> bool:
        """Write our beacon once, listing `mounted()` as it is just before the write;
        False if the shared storage did not take it in time."""
        self._counter += 1
        try:
            async with asyncio.timeout(_IO_TIMEOUT):
                await asyncio.to_thread(self._write, mounted)
        except (OSError, TimeoutError) as e:
            log.warning("cannot write this host's beacon on the shared storage", path=str(self._path(self.node)),
                        error=str(e) or "timed out")  # fmt: skip
            return False
        self._written_at = self._clock()
        return True

    def unwritten_for(self) -> float:
        """Seconds since our beacon was last written (since start if never)."""
        return self._clock() - (self._written_at if self._written_at is not None else self._started)

    def _write(self, mounted: Callable[[], Iterable[str]]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        data = {"node": self.node, "incarnation": self._incarnation, "counter": self._counter,
                "mounted": sorted(mounted())}  # fmt: skip
        path = self._path(self.node)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(data) + "\n")
        os.replace(tmp, path)

    # --- the peers' side ------------------------------------------------------------------

    async def observe(self) -> None:
        """Read every peer's beacon and note which ones moved."""
        try:
            async with asyncio.timeout(_IO_TIMEOUT):
                seen = await asyncio.to_thread(self._read_all)
        except (OSError, TimeoutError):
            return  # nothing learnt: every peer's silence keeps growing, which is the safe way
        now = self._clock()
        for node, beacon in seen.items():
            known = self._peers.get(node)
            if known is None or known.beacon != beacon:
                self._peers[node] = _Seen(beacon, now)

    def latest(self, node: str) -> Beacon | None:
        """The last beacon seen of `node` (None: none seen)."""
        known = self._peers.get(node)
        return known.beacon if known is not None else None

    def silent_for(self, node: str) -> float:
        """How long `node`'s beacon has stood still, as far as this host has watched it."""
        known = self._peers.get(node)
        return self._clock() - (known.changed_at if known is not None else self._started)

    def gone(self, node: str) -> bool:
        return self.silent_for(node) >= GONE_AFTER

    def _read_all(self) -> dict[str, Beacon]:
        found = {}
        try:
            entries = list(self.directory.iterdir())
        except FileNotFoundError:
            return found
        for path in entries:
            if not path.name.endswith(".beacon") or path.name.startswith("."):
                continue
            node = path.name.removesuffix(".beacon")
            try:
                validate_name(node)
                data = json.loads(path.read_text())
                found[node] = Beacon(str(data["incarnation"]), int(data["counter"]),
                                     frozenset(str(v) for v in data.get("mounted", ())))  # fmt: skip
            except (OSError, ValueError, KeyError, TypeError, CorralError):
                continue  # a torn or foreign file: that peer just looks silent
        return found
