"""The one interface every storage driver implements.

Two kinds of driver stand behind it:
- local (`shared = False`, e.g. `dir`): the volume lives on this host's disk and
  moves between hosts by copying; `attach`/`detach` do not apply.
- shared (`shared = True`, e.g. `image`, `lvm`): the volume sits on storage every
  host reaches and is handed over, not copied. Exactly one host may have it
  attached (mounted); the controller decides which and records an ownership
  *generation*, raised at every handover; the host enforces it with an ownership
  marker on the shared storage (see ownership.py) and refuses stale or
  conflicting orders with PermissionDenied.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class StorageDriver(Protocol):
    #: The name users pick with `--storage` and that is recorded per container.
    name: str
    #: Whether `disk_bytes` limits are enforced (a fixed-size volume) or only accounted.
    enforces_disk_limit: bool
    #: True: every host reaches the volume and it is handed over (attach/detach), not copied.
    shared: bool

    async def create_volume(self, container: str, size_bytes: int) -> Path:
        """Make an empty root filesystem for `container` and attach it here (a shared
        volume starts at generation 0, owned by this host); returns where it is mounted."""
        ...

    def rootfs(self, container: str) -> Path:
        """Where the container's root filesystem is visible on this host (when attached)."""
        ...

    async def destroy_volume(self, container: str) -> None:
        """Detach the volume if attached here and remove it and everything it holds.
        Shared drivers refuse (PermissionDenied) while another host has it attached."""
        ...

    async def attach(self, container: str, generation: int, *, takeover_from: str | None = None) -> Path:
        """Shared drivers: take ownership at `generation` and mount; returns the rootfs.
        Idempotent on the owning host. Refused (PermissionDenied) when another host
        holds it attached, or `generation` is older than the recorded one. With
        `takeover_from=NODE` the caller states that NODE was proved unable to use
        the volume (fenced): a volume NODE still holds is taken over (failover).
        Local drivers raise FailedPrecondition."""
        ...

    async def detach(self, container: str) -> None:
        """Shared drivers: unmount here and release ownership (keeping the generation).
        Idempotent. Refused (FailedPrecondition) while something on this host still
        uses the filesystem (a running container). Local drivers raise FailedPrecondition."""
        ...

    def is_attached(self, container: str) -> bool:
        """Whether the root filesystem is usable on this host now (mounted, for block drivers)."""
        ...

    async def usage(self, container: str) -> int:
        """Bytes the container's root filesystem uses."""
        ...
