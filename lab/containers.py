"""The LXC containers of one lab host: list them, stop them, kill them outright.

LXC commands run as the host: `enter` is the command prefix that puts a
process on the host (see lab.py). Killing works from the root namespace on
PIDs: a container's init is the child of its `[lxc monitor] LXCPATH NAME`.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Sequence
from pathlib import Path

import structlog

from agent.runtime.cgroups import container_cgroup_dirs, remove_empty
from lab import processes
from corral.proc import run

log = structlog.get_logger("lab.containers")

_LXC_TIMEOUT = 20.0


async def list_containers(enter: Sequence[str], lxc_path: Path) -> list[str]:
    if not lxc_path.is_dir():
        return []
    result = await run([*enter, "lxc-ls", "-P", str(lxc_path), "-1"], timeout=_LXC_TIMEOUT,
                       check=False, env=processes.daemon_env())
    if result.returncode != 0:
        log.warning("lxc-ls failed", lxc_path=str(lxc_path), error=result.output)
        return []
    return [line.strip() for line in result.stdout.decode().splitlines() if line.strip()]


async def stop_all(enter: Sequence[str], lxc_path: Path) -> None:
    """`lxc-stop -k` every container of the host (stopped ones just fail quietly)."""
    for name in await list_containers(enter, lxc_path):
        result = await run([*enter, "lxc-stop", "-P", str(lxc_path), "-n", name, "-k"],
                           timeout=_LXC_TIMEOUT, check=False, env=processes.daemon_env())
        if result.returncode == 0:
            log.info("container stopped", lxc_path=str(lxc_path), container=name)


async def kill_all(lxc_path: Path) -> int:
    """SIGKILL every running container under `lxc_path`: a host crash, or the
    last resort of a teardown. Returns how many containers were running."""
    monitors = await asyncio.to_thread(processes.find_lxc_monitors, lxc_path)
    await kill_monitors(monitors)
    if monitors:
        log.info("containers killed", lxc_path=str(lxc_path), count=len(monitors))
    return len(monitors)


async def kill_monitors(monitors: list[int]) -> None:
    """Kill the containers of these `[lxc monitor]` PIDs: first each init (so
    its whole PID namespace dies), then the monitor if it does not exit."""
    for monitor in monitors:
        for child in processes.children_of(monitor):
            _kill(child)
    for monitor in monitors:
        # The monitor cleans up (cgroups, network) once its init is gone; give it a moment.
        if not await processes.wait_gone(monitor, 2.0):
            _kill(monitor)
            await processes.wait_gone(monitor, 5.0)


def remove_cgroups(lxc_path: Path) -> None:
    """The empty LXC cgroups of this host's containers (a busy one, another lab's, stays).
    Killed containers leave them in the machine's hierarchies; a reboot would not."""
    if not lxc_path.is_dir():
        return
    for entry in lxc_path.iterdir():
        if entry.is_dir():
            remove_empty(container_cgroup_dirs(entry.name))


def is_monitor(pid: int) -> bool:
    args = processes.cmdline(pid)
    return bool(args) and " ".join(args).startswith("[lxc monitor] ")


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
