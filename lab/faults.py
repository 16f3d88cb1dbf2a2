"""Faults an operator or a test injects into a lab host, and the lab's fence.

    partition(lab, node) / heal(lab, node)   the root side of its veth down / up: the
        host reaches neither the controller nor the other hosts; its agent and
        containers keep running. The lab's shared storage is a directory on this
        machine, not a network, so a partition does not cut it.
    power_off(lab, node) -> PowerOffReport   a power cut: every process of the host
        (agent, monitors, helpers, all container processes) frozen, then SIGKILLed; its
        mounts dropped and its containers' empty cgroups removed, as a reboot would;
        files stay on disk. Idempotent. Raises FenceFailed unless it has checked that
        nothing of the host still runs: that makes it the lab's fence agent
        (`python -m lab.fence`, see fence_command).
    power_on(lab, node) -> int               the host's agent starts again (its
        containers stay stopped: the agent's reconcile and the controller decide).
    host_states(lab) -> {node: HostProcesses} what runs on each host now.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import structlog

from corral.errors import FailedPrecondition, RuntimeFailure
from lab import containers, hostns, hostprocs, network, processes, readiness
from lab.hostprocs import HostIds, HostProcesses, NsId
from lab.hosts import _load_host, _paths, start_agent
from lab.layout import LabPaths, node_index, resolve_base_dir
from lab.state import HostState, LabState, state_lock

log = structlog.get_logger("lab.faults")

# A power cut is quick, but a process in uninterruptible sleep (I/O on a loop device)
# dies only when its I/O ends: that long, then the fence reports failure.
KILL_TIMEOUT = 15.0
_FREEZE_ROUNDS = 5
_POLL = 0.05


class FenceFailed(RuntimeFailure):
    """Something of the host still runs after a power-off: it is not fenced."""


@dataclass(frozen=True)
class PowerOffReport:
    node: str
    agent_pid: int | None  # the agent killed, if it was running
    containers: int  # containers that were running
    processes: int  # processes killed, containers' included

    def summary(self) -> str:
        if not self.processes:
            return f"{self.node} is off (nothing was running)"
        agent = f"agent pid {self.agent_pid}, " if self.agent_pid else "no agent, "
        return (f"{self.node} is off: killed {agent}{self.containers} container(s), "
                f"{self.processes} process(es) in all; nothing of it runs")


def fence_command(name: str, base_dir: Path | None = None) -> list[str]:
    """The lab's fence command line for a controller config, `{node}` to be substituted:
    exits 0 once that host is off (nothing of it runs), non-zero with a message otherwise."""
    argv = [sys.executable, "-m", "lab.fence", "--lab", name]
    if base_dir is not None:
        argv += ["--base-dir", str(base_dir)]
    return [*argv, "{node}"]


# --- the network ----------------------------------------------------------------------


async def partition(name: str, node: str, base_dir: Path | None = None) -> None:
    """Cut `node` off the lab network (the root side of its veth down). Idempotent."""
    await _set_link(name, node, False, base_dir)


async def heal(name: str, node: str, base_dir: Path | None = None) -> None:
    """Reconnect `node` to the lab network. Idempotent."""
    await _set_link(name, node, True, base_dir)


async def _set_link(name: str, node: str, up: bool, base_dir: Path | None) -> None:
    base, paths = _paths(name, base_dir)
    async with state_lock(base):
        _, host = _load_host(name, paths, node)
        if not host.veth or await network.link_is_up(host.veth) is None:
            raise FailedPrecondition(f"lab host {node} has no link to the lab bridge")
        await network.set_link_state(host.veth, up)
    log.info("host healed" if up else "host partitioned", lab=name, node=node, link=host.veth)


# --- power ----------------------------------------------------------------------------


async def power_off(name: str, node: str, base_dir: Path | None = None, *,
                    timeout: float = KILL_TIMEOUT) -> PowerOffReport:
    """Power `node` off (see the module's contract); FenceFailed if anything of it
    still runs `timeout` seconds later."""
    base, paths = _paths(name, base_dir)
    async with state_lock(base):
        _, host = _load_host(name, paths, node)
        hp = paths.host(host.index)
        ids = _host_ids(paths, host)
        agent_pid = host.agent_pid if processes.is_running(host.agent_pid, str(base)) else None

        frozen, pid_namespaces = await _freeze(node, ids)
        for pid in frozen:
            _signal(pid, signal.SIGKILL)
        left = await _wait_none_left(node, ids, pid_namespaces, timeout)
        if not left:
            # As a reboot would: the host's mounts are gone (the pinned namespace outlives
            # its processes) and so are its killed containers' cgroups.
            pin = hp.mount_ns
            if hostns.is_pinned(pin):
                await hostns.unmount_inside(pin, base, lazy_only=True)
            await asyncio.to_thread(containers.remove_cgroups, hp.lxc_path)
            left = (await _find(node, ids, pid_namespaces)).all
        if left:
            raise FenceFailed(f"lab host {node} is not off: still running after {timeout:g} s: "
                              f"{_describe(left)}")
    report = PowerOffReport(node, agent_pid, len(pid_namespaces), len(frozen))
    log.info("host powered off", lab=name, node=node, agent_pid=agent_pid, containers=report.containers,
             processes=report.processes)
    return report


async def power_on(name: str, node: str, base_dir: Path | None = None, *,
                   wait_ready: bool = False, timeout: float = readiness.READY_TIMEOUT) -> int:
    """Start `node`'s agent again (after power_off, or after its agent died); returns its
    PID. The containers stay as they are: a powered-off host's were stopped. With
    `wait_ready`, returns once the controller reports the node ready."""
    pid = await start_agent(name, node, base_dir)
    if wait_ready:
        paths = LabPaths(resolve_base_dir(name, base_dir))
        log_file = paths.host(node_index(node)).log_file

        def check_alive() -> str | None:
            alive = processes.is_running(pid, str(paths.base_dir))
            return None if alive else f"agent {node} exited during start-up; read {log_file}"

        await readiness.wait_nodes_ready(paths.cli_config, [node], env=processes.daemon_env(), timeout=timeout,
                                         check_alive=check_alive)
    return pid


async def host_states(name: str, base_dir: Path | None = None) -> dict[str, HostProcesses]:
    """What runs on each host of the lab now (empty if the lab is not up)."""
    base = resolve_base_dir(name, base_dir)
    paths = LabPaths(base)
    state = LabState.load(paths.state_file)
    if state is None:
        return {}
    ids = {h.node: _host_ids(paths, h) for h in state.hosts}
    return await asyncio.to_thread(hostprocs.find, ids)


# --- how ------------------------------------------------------------------------------


def _host_ids(paths: LabPaths, host: HostState) -> HostIds:
    pin = paths.host(host.index).mount_ns
    return HostIds(
        net=hostns.namespace_id(Path("/run/netns", host.namespace)) if host.namespace else None,
        mnt=hostns.namespace_id(pin) if hostns.is_pinned(pin) else None,
        lxc_path=paths.host(host.index).lxc_path,
    )


async def _find(node: str, ids: HostIds, pid_namespaces: set[NsId]) -> HostProcesses:
    found = await asyncio.to_thread(hostprocs.find, {node: ids}, pid_namespaces)
    return found[node]


async def _freeze(node: str, ids: HostIds) -> tuple[set[int], set[NsId]]:
    """SIGSTOP every process of the host, again until no new one appears: a stopped
    process forks nothing, and a stopped monitor cannot lose its container's init to
    a re-parenting before we have seen it. Returns the processes and the containers'
    PID namespaces."""
    stopped: set[int] = set()
    pid_namespaces: set[NsId] = set()
    for _ in range(_FREEZE_ROUNDS):
        found = await _find(node, ids, pid_namespaces)
        pid_namespaces |= found.pid_namespaces
        new = found.all - stopped
        if not new:
            break
        for pid in new:
            _signal(pid, signal.SIGSTOP)
        stopped |= new
    return stopped, pid_namespaces


async def _wait_none_left(node: str, ids: HostIds, pid_namespaces: set[NsId], timeout: float) -> set[int]:
    """SIGKILL whatever of the host is still found until nothing is, or `timeout`;
    returns what is left."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        found = await _find(node, ids, pid_namespaces)
        pid_namespaces |= found.pid_namespaces
        if not found or loop.time() >= deadline:
            return found.all
        for pid in found.all:
            _signal(pid, signal.SIGKILL)
        await asyncio.sleep(_POLL)


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _describe(pids: set[int]) -> str:
    parts = []
    for pid in sorted(pids)[:10]:
        args = processes.cmdline(pid) or ["?"]
        parts.append(f"{pid} ({' '.join(args)[:80]})")
    more = f" and {len(pids) - 10} more" if len(pids) > 10 else ""
    return ", ".join(parts) + more
