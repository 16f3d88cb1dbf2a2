"""What this host is and has: CPUs, memory, disk, kernel, LXC and CRIU."""

from __future__ import annotations

import os
import platform
import shutil
from dataclasses import replace
from pathlib import Path

from agent import __version__
from agent.runtime.criu_features import POST_COPY, PRE_COPY, STOP_AND_COPY, LiveSupport, probe_live_support
from agent.runtime.lxc import LxcRuntime
from corral import proc
from corral.model import NodeFacts

IMPLEMENTED_STRATEGIES = (STOP_AND_COPY, PRE_COPY, POST_COPY)


def _meminfo() -> tuple[int, int]:
    values = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            values[key] = int(rest.split()[0]) * 1024
    return values.get("MemTotal", 0), values.get("MemAvailable", 0)


class HostFacts:
    """Static facts measured once at start; memory and disk refreshed on each call."""

    def __init__(self, node: str, address: str, storage_dir: Path, storage_drivers: tuple[str, ...]) -> None:
        self._base = NodeFacts(name=node, address=address, storage_drivers=storage_drivers)
        self._storage_dir = storage_dir

    async def probe(self) -> LiveSupport:
        lxc = await proc.run(["lxc-start", "--version"], timeout=10, check=False)
        live = await probe_live_support()
        # Only the strategies this agent implements are offered; the others say why not.
        offered = [s for s in live.strategies() if s in IMPLEMENTED_STRATEGIES]
        unavailable = dict(live.reasons)
        for s in live.strategies():
            if s not in IMPLEMENTED_STRATEGIES:
                unavailable[s] = "supported by this host, not implemented by this agent version"
        if POST_COPY in offered and not live.tls:
            # Post-copy pages cross the network through CRIU's page server: only over its TLS.
            offered.remove(POST_COPY)
            unavailable[POST_COPY] = f"CRIU cannot encrypt its page server here ({live.tls_detail})"
        self._base = replace(
            self._base,
            cpus=os.cpu_count() or 1,
            kernel=platform.release(),
            lxc_version=LxcRuntime.version_of(lxc.stdout.decode()),
            criu_version=live.criu_version,
            criu_ok=live.criu_ok,
            criu_detail=live.detail,
            live_strategies=tuple(offered),
            live_unavailable=unavailable,
            agent_version=__version__,
        )
        return live

    def current(self) -> NodeFacts:
        total, available = _meminfo()
        disk = shutil.disk_usage(self._storage_dir)
        return replace(
            self._base,
            memory_bytes=total,
            memory_available_bytes=available,
            disk_bytes=disk.total,
            disk_free_bytes=disk.free,
        )


NET_ADDR_SET = 3  # /sys/class/net/*/addr_assign_type: the address was set explicitly


def bridge_mac_pinned(bridge: str) -> bool | None:
    """Whether the containers' bridge has a MAC address of its own (None: no such bridge).
    Why it matters: a bridge without one takes its lowest port's, and a live migration in
    restores the container's host-side veth (CRIU) with a random MAC that can be lower, so
    the host's own MAC would change under its address and its peers' ARP entries go stale."""
    try:
        return int(Path(f"/sys/class/net/{bridge}/addr_assign_type").read_text()) == NET_ADDR_SET
    except (OSError, ValueError):
        return None
