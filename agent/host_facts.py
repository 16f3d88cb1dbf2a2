"""What this host is and has: CPUs, memory, disk, kernel, LXC and CRIU, and which of its
capabilities cannot be used and why (a program they run is missing: corral/programs.py)."""

from __future__ import annotations

import os
import platform
import shutil
from dataclasses import replace
from pathlib import Path

import structlog

from agent import __version__
from agent.runtime.criu_features import POST_COPY, PRE_COPY, STOP_AND_COPY, LiveSupport, probe_live_support
from agent.runtime.lxc import LxcRuntime
from corral import proc, programs
from corral.model import NodeFacts

log = structlog.get_logger("corral.agent")

# For testing version skew only: the agent announces this version instead of its own (the
# lab's start_agent(..., announce_version=V) sets it). Never set it on a real host.
VERSION_OVERRIDE_ENV = "CORRAL_TEST_ANNOUNCE_AGENT_VERSION"


def announced_version() -> str:
    """The version this agent announces to the controller: its own, unless overridden for a test."""
    override = os.environ.get(VERSION_OVERRIDE_ENV)
    if override is None:
        return __version__
    log.warning("announcing an overridden agent version (testing version skew)", announced=override,
                actual=__version__, variable=VERSION_OVERRIDE_ENV)  # fmt: skip
    return override

IMPLEMENTED_STRATEGIES = (STOP_AND_COPY, PRE_COPY, POST_COPY)
# What each storage driver needs besides the agent itself.
STORAGE_CAPABILITY = {"image": programs.STORAGE_IMAGE, "lvm": programs.STORAGE_LVM}
HOST_CAPABILITIES = (
    programs.CONTAINERS, programs.EXEC, programs.LIVE_MIGRATION, programs.POST_COPY, programs.TRANSFER,
    programs.STORAGE_IMAGE, programs.STORAGE_LVM, programs.TEMPLATE_BUSYBOX, programs.TEMPLATE_DEBIAN,
)


def missing_programs(search_path: str) -> dict[str, str]:
    """Capability -> why it cannot be used, for those whose programs are not all found."""
    found = {c: programs.why_unavailable(c, search_path) for c in HOST_CAPABILITIES}
    return {c: why for c, why in found.items() if why}


def program_search_path() -> str:
    """Where this agent's programs are looked for: its PATH (the way it runs them), else the
    standard directories."""
    return os.environ.get("PATH") or programs.SEARCH_PATH


def meminfo() -> tuple[int, int]:
    """MemTotal and MemAvailable of this host, in bytes."""
    values = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            values[key] = int(rest.split()[0]) * 1024
    return values.get("MemTotal", 0), values.get("MemAvailable", 0)


class HostFacts:
    """Static facts measured once at start; memory and disk refreshed on each call."""

    def __init__(self, node: str, address: str, storage_dir: Path, storage_drivers: tuple[str, ...],
                 unavailable: dict[str, str] | None = None, labels: dict[str, str] | None = None) -> None:  # fmt: skip
        self._base = NodeFacts(name=node, address=address, storage_drivers=storage_drivers, labels=dict(labels or {}))
        self._storage_dir = storage_dir
        self._known_unavailable = dict(unavailable or {})  # found by the caller (e.g. storage-lvm: no device-mapper)

    async def probe(self, search_path: str | None = None) -> LiveSupport:
        missing = missing_programs(search_path or program_search_path())
        lxc = await proc.run(["lxc-start", "--version"], timeout=10, check=False) \
            if programs.CONTAINERS not in missing else None  # fmt: skip
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
        # A strategy whose programs are missing is refused before anything is frozen.
        for strategy in IMPLEMENTED_STRATEGIES:
            why = "; ".join(filter(None, (missing.get(programs.LIVE_MIGRATION),
                                          missing.get(programs.POST_COPY) if strategy == POST_COPY else None)))  # fmt: skip
            if why:
                if strategy in offered:
                    offered.remove(strategy)
                unavailable[strategy] = why
        drivers = tuple(d for d in self._base.storage_drivers if STORAGE_CAPABILITY.get(d) not in missing)
        self._base = replace(
            self._base,
            cpus=os.cpu_count() or 1,
            kernel=platform.release(),
            lxc_version=LxcRuntime.version_of(lxc.stdout.decode()) if lxc else "",
            criu_version=live.criu_version,
            criu_ok=live.criu_ok,
            criu_detail=live.detail,
            live_strategies=tuple(offered),
            live_unavailable=unavailable,
            unavailable={**missing, **self._known_unavailable},
            storage_drivers=drivers,
            agent_version=announced_version(),
        )
        if self._base.unavailable:
            log.warning("capabilities unavailable on this host", unavailable=self._base.unavailable)
        return live

    def current(self) -> NodeFacts:
        total, available = meminfo()
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
