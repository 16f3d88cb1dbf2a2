"""The template and storage names the fleet API accepts, for the controller and the CLI's
choices alike (this module imports nothing heavy: the CLI loads it on every `ct create`).

Storage has user-facing names and concrete drivers:
- `local`: a directory on the host (the `dir` driver); a migration copies it with rsync;
- `shared`: the fleet's shared block storage, one volume that changes hands in a
  migration without a copy (the `image` driver; `lvm` where the nodes are configured for it).
The drivers' own names stay accepted; a container's record keeps the concrete driver.
"""

from __future__ import annotations

from typing import Iterable

TEMPLATES = ("busybox", "debian")
DRIVERS = ("dir", "image", "lvm")
LOCAL, SHARED = "local", "shared"
STORAGE_NAMES = (LOCAL, SHARED) + DRIVERS
DEFAULT_STORAGE = LOCAL
SHARED_DRIVERS = ("image", "lvm")


def storage_driver(name: str, offered: Iterable[Iterable[str]] = ()) -> str | None:
    """The concrete driver for a storage name, None if the name is unknown. `offered`: the
    storage drivers of each node the container may go to (to choose `shared`'s driver)."""
    name = name or DEFAULT_STORAGE
    if name == LOCAL:
        return "dir"
    if name == SHARED:
        # lvm where every candidate with shared storage is configured for it, else image.
        shared = [s for s in (set(drivers) & set(SHARED_DRIVERS) for drivers in offered) if s]
        return "lvm" if shared and all("lvm" in s for s in shared) else "image"
    return name if name in DRIVERS else None
