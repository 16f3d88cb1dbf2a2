"""What a lab has created (saved as base_dir/lab.json) and how it looks now (LabInfo).

lab.json is rewritten after each resource is created, so a `lab_down` after
a crash or an interrupt knows what to remove; `lab_down` also finds leftovers
by name, so a missing or damaged file is not fatal.
"""

from __future__ import annotations

import asyncio
import json
import os
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path

import structlog

from lab.layout import TEMPLATE_CACHE, Addressing, LabPaths

log = structlog.get_logger("lab.state")

# One lock per (event loop, lab dir): lab.json is read-modify-written by
# concurrent calls, such as restarting two agents at once.
_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Lock]] = weakref.WeakKeyDictionary()


def state_lock(base_dir: Path) -> asyncio.Lock:
    per_loop = _locks.setdefault(asyncio.get_running_loop(), {})
    return per_loop.setdefault(str(base_dir), asyncio.Lock())


@dataclass
class HostState:
    index: int
    node: str
    namespace: str | None = None  # set once the namespace exists
    veth: str | None = None  # root side, set once the pair exists
    agent_pid: int | None = None


@dataclass
class LabState:
    name: str
    base_dir: str
    nodes: int
    octet: int | None = None
    bridge: str | None = None  # set once the bridge exists
    controller_pid: int | None = None
    hosts: list[HostState] = field(default_factory=list)

    def host(self, node: str) -> HostState | None:
        return next((h for h in self.hosts if h.node == node), None)

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> LabState | None:
        """The saved state, or None if there is none or it cannot be read."""
        try:
            raw = json.loads(path.read_text())
            hosts = [HostState(**h) for h in raw.pop("hosts", [])]
            return cls(**raw, hosts=hosts)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as e:
            log.warning("lab state file unreadable, ignoring it", path=str(path), error=str(e))
            return None


@dataclass(frozen=True)
class HostInfo:
    node: str
    namespace: str
    address: str  # the host's IP on the lab network
    agent_address: str  # host:port the agent listens on
    veth: str  # root-namespace side of the host's link; set it down to partition the host
    link_up: bool | None  # None if the link does not exist
    agent_pid: int | None
    agent_running: bool
    lxc_path: Path
    state_dir: Path
    storage_dir: Path
    config: Path
    log_file: Path
    # up, partitioned (link down), agent-down (its agent is not running, other things are),
    # down (nothing of it runs: powered off); "" where not known.
    state: str = ""
    processes: int = 0  # how many of its processes run (its containers' included)


def host_state(link_up: bool | None, agent_running: bool, processes: int) -> str:
    if not processes and not agent_running:
        return "down"
    if link_up is False:
        return "partitioned"
    return "up" if agent_running else "agent-down"


@dataclass(frozen=True)
class LabInfo:
    name: str
    base_dir: Path
    subnet: str
    gateway: str
    bridge: str
    controller_address: str
    controller_pid: int | None
    controller_running: bool
    controller_config: Path
    controller_log: Path
    cli_config: Path
    pki_dir: Path
    shared_dir: Path
    template_cache: Path
    hosts: tuple[HostInfo, ...]

    def host(self, node: str) -> HostInfo:
        for h in self.hosts:
            if h.node == node:
                return h
        raise KeyError(node)


def build_info(state: LabState, running: dict[int, bool], links: dict[str, bool | None],
               host_processes: dict[str, int] | None = None) -> LabInfo:
    """LabInfo from saved state plus liveness (`running`: pid -> alive), link states and
    (where counted) how many processes run on each host."""
    paths = LabPaths(Path(state.base_dir))
    net = Addressing(state.octet or 0)
    hosts = []
    for h in state.hosts:
        hp = paths.host(h.index)
        veth = h.veth or ""
        agent_running = bool(h.agent_pid and running.get(h.agent_pid))
        counted = host_processes is not None and h.node in host_processes
        count = host_processes.get(h.node, 0) if host_processes else 0
        hosts.append(
            HostInfo(
                node=h.node,
                namespace=h.namespace or "",
                address=net.host_address(h.index),
                agent_address=net.agent_address(h.index),
                veth=veth,
                link_up=links.get(veth),
                agent_pid=h.agent_pid,
                agent_running=agent_running,
                lxc_path=hp.lxc_path,
                state_dir=hp.state_dir,
                storage_dir=hp.storage_dir,
                config=hp.config,
                log_file=hp.log_file,
                state=host_state(links.get(veth), agent_running, count) if counted else "",
                processes=count,
            )
        )
    return LabInfo(
        name=state.name,
        base_dir=paths.base_dir,
        subnet=str(net.subnet),
        gateway=net.gateway,
        bridge=state.bridge or "",
        controller_address=net.controller_address,
        controller_pid=state.controller_pid,
        controller_running=bool(state.controller_pid and running.get(state.controller_pid)),
        controller_config=paths.controller_config,
        controller_log=paths.controller_log,
        cli_config=paths.cli_config,
        pki_dir=paths.pki_dir,
        shared_dir=paths.shared_dir,
        template_cache=TEMPLATE_CACHE,
        hosts=tuple(hosts),
    )
