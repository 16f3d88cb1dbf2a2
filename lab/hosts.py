"""One lab host at a time: run a command on it, start/stop/kill its agent,
crash it, cut its network. The tests use these to restart an agent while its
containers run, to lose a host, or to partition it."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import structlog

from corral.errors import FailedPrecondition, NotFound
from lab import hostns, network, processes
from lab.hostenter import host_argv
from lab.layout import LabPaths, namespace_name, node_index, resolve_base_dir
from lab.state import HostState, LabState, state_lock

log = structlog.get_logger("lab")


def host_command(name: str, node: str, argv: list[str], base_dir: Path | None = None) -> list[str]:
    """Command line running `argv` as a process of lab host `node`: in its network
    namespace and its mount namespace (its /sys, the cgroup hierarchies, whatever
    the host has mounted), e.g. `lxc-info -P LXCPATH -n NAME`. The working
    directory becomes /, so give absolute paths."""
    paths = LabPaths(resolve_base_dir(name, base_dir))
    return [*enter_prefix(name, paths, node_index(node)), *map(str, argv)]


def enter_prefix(name: str, paths: LabPaths, index: int) -> list[str]:
    """Command prefix that puts a process on host `index`: into its pinned mount
    namespace, or (a host whose namespace is not pinned, e.g. half made) through
    `ip netns exec` and `hostenter`."""
    namespace = namespace_name(name, index)
    pin = paths.host(index).mount_ns
    if hostns.is_pinned(pin):
        return hostns.enter_argv(namespace, pin, [])
    return host_argv(namespace, [])


async def spawn_agent(name: str, paths: LabPaths, host: HostState, search_path: str | None = None,
                      announce_version: str | None = None) -> int:  # fmt: skip
    """`search_path`: the agent's PATH instead of ours (a host where some programs are missing).
    `announce_version`: the agent version it announces instead of its own (version skew)."""
    from agent.host_facts import VERSION_OVERRIDE_ENV

    if host.namespace is None:
        raise FailedPrecondition(f"lab host {host.node} has no network namespace")
    hp = paths.host(host.index)
    argv = [*enter_prefix(name, paths, host.index), sys.executable, "-m", "agent.main", "--config", hp.config]
    env = processes.daemon_env()
    env.pop(VERSION_OVERRIDE_ENV, None)  # never inherited: only the host it is asked for announces another
    if search_path:
        env["PATH"] = search_path
    if announce_version is not None:
        env[VERSION_OVERRIDE_ENV] = announce_version
    return await processes.spawn_detached(argv, log_file=hp.log_file, cwd=hp.dir, env=env)


async def kill_host_processes(namespaces: set[str], pins: list[Path]) -> None:
    """SIGKILL whatever runs in these hosts' network or mount namespaces (processes
    a test started with host_command, helpers an agent left behind)."""
    net_ids = {i for i in (hostns.namespace_id(Path("/run/netns", ns)) for ns in namespaces) if i}
    mnt_ids = {i for i in (hostns.namespace_id(pin) for pin in pins) if i}
    pids = set(await asyncio.to_thread(processes.find_in_namespaces, net_ids, "net"))
    pids |= set(await asyncio.to_thread(processes.find_in_namespaces, mnt_ids, "mnt"))
    if pids:
        log.info("killing processes left on lab hosts", pids=sorted(pids))
        await asyncio.gather(*(processes.kill_any(pid) for pid in pids))


async def start_agent(name: str, node: str, base_dir: Path | None = None, *, search_path: str | None = None,
                      announce_version: str | None = None) -> int:  # fmt: skip
    """Start the agent of `node` (it must not be running); returns its PID. `search_path`:
    its PATH, to play a host where some programs are not installed; `announce_version`: the
    agent version it tells the controller instead of its own, to play version skew."""
    base, paths = _paths(name, base_dir)
    async with state_lock(base):
        state, host = _load_host(name, paths, node)
        if processes.is_running(host.agent_pid, str(base)):
            raise FailedPrecondition(f"agent {node} of lab {name} is already running (pid {host.agent_pid})")
        host.agent_pid = await spawn_agent(name, paths, host, search_path, announce_version)
        state.save(paths.state_file)
    log.info("agent started", lab=name, node=node, pid=host.agent_pid)
    return host.agent_pid


async def stop_agent(name: str, node: str, base_dir: Path | None = None) -> bool:
    """Stop the agent of `node` (SIGTERM, then SIGKILL after 5 s); its containers keep
    running. False if it was not running."""
    base, paths = _paths(name, base_dir)
    async with state_lock(base):
        _, host = _load_host(name, paths, node)
        stopped = await processes.stop(host.agent_pid, str(base))
    log.info("agent stopped", lab=name, node=node, was_running=stopped)
    return stopped


async def kill_agent(name: str, node: str, base_dir: Path | None = None) -> bool:
    """SIGKILL the agent of `node` (an agent crash); its containers keep running.
    False if it was not running."""
    base, paths = _paths(name, base_dir)
    async with state_lock(base):
        _, host = _load_host(name, paths, node)
        killed = await processes.kill(host.agent_pid, str(base))
    log.info("agent killed", lab=name, node=node, was_running=killed)
    return killed


async def restart_agent(name: str, node: str, base_dir: Path | None = None) -> int:
    """Stop (gracefully) and start the agent of `node`; returns the new PID."""
    await stop_agent(name, node, base_dir)
    return await start_agent(name, node, base_dir)


async def crash_host(name: str, node: str, base_dir: Path | None = None) -> None:
    """Simulate a host crash: lab.faults.power_off (its agent, every container and every
    other process on it SIGKILLed, its mounts under the lab directory dropped, as a
    reboot would). Its network stays as it is; `start_agent` brings the host back."""
    from lab.faults import power_off  # lab.faults builds on this module

    await power_off(name, node, base_dir)


async def set_host_link(name: str, node: str, up: bool, base_dir: Path | None = None) -> None:
    """Partition (`up=False`) or reconnect a host: sets the root side of its veth
    down or up. Processes and containers on it keep running."""
    base, paths = _paths(name, base_dir)
    async with state_lock(base):
        _, host = _load_host(name, paths, node)
        if not host.veth:
            raise FailedPrecondition(f"lab host {node} has no link")
        await network.set_link_state(host.veth, up)
    log.info("host link set", lab=name, node=node, up=up)


def _paths(name: str, base_dir: Path | None) -> tuple[Path, LabPaths]:
    base = resolve_base_dir(name, base_dir)
    return base, LabPaths(base)


def _load_host(name: str, paths: LabPaths, node: str) -> tuple[LabState, HostState]:
    node_index(node)  # InvalidArgument for a malformed node name
    state = LabState.load(paths.state_file)
    if state is None:
        raise NotFound(f"lab {name} is not up (no {paths.state_file})")
    host = state.host(node)
    if host is None:
        raise NotFound(f"lab {name} has no node {node} (it has {', '.join(h.node for h in state.hosts)})")
    return state, host
