"""The lab's controller process: spawn, kill (a controller crash), start again."""

from __future__ import annotations

import sys
from pathlib import Path

import structlog

from corral.errors import FailedPrecondition, NotFound
from lab import configs, processes, readiness
from lab.layout import Addressing, LabPaths, resolve_base_dir
from lab.state import LabState, state_lock

log = structlog.get_logger("lab")


async def spawn_controller(paths: LabPaths) -> int:
    return await processes.spawn_detached(
        [sys.executable, "-m", "controller.main", "--config", paths.controller_config],
        log_file=paths.controller_log, cwd=paths.controller_dir,
    )  # fmt: skip


def _load(name: str, base_dir: Path | None) -> tuple[Path, LabPaths, LabState]:
    base = resolve_base_dir(name, base_dir)
    paths = LabPaths(base)
    if not paths.state_file.is_file():
        raise NotFound(f"lab {name!r} is not up")
    return base, paths, LabState.load(paths.state_file)


async def kill_controller(name: str, base_dir: Path | None = None) -> bool:
    """SIGKILL the controller (a controller crash). False if it was not running."""
    base, paths, state = _load(name, base_dir)
    async with state_lock(base):
        killed = await processes.kill(state.controller_pid, str(base))
    log.info("controller killed", lab=name, was_running=killed)
    return killed


async def start_controller(name: str, base_dir: Path | None = None) -> int:
    """Start the controller again on its existing state; returns its PID."""
    base, paths, state = _load(name, base_dir)
    async with state_lock(base):
        state = LabState.load(paths.state_file)
        if processes.is_running(state.controller_pid, str(base)):
            raise FailedPrecondition(f"the controller of lab {name} is already running (pid {state.controller_pid})")
        state.controller_pid = await spawn_controller(paths)
        state.save(paths.state_file)
    log.info("controller started", lab=name, pid=state.controller_pid)
    return state.controller_pid


async def set_fencing(name: str, enabled: bool, base_dir: Path | None = None, *,
                      timeout: float = readiness.READY_TIMEOUT) -> None:  # fmt: skip
    """Configure the lab's fence command in its controller (`enabled`) or none (a fleet
    without IPMI: a dead host cannot be proven off), restart the controller on its state
    and wait until every host is ready again. Restarting a controller is a fault of its
    own: do it while nothing is in the middle of a failover."""
    base, paths, state = _load(name, base_dir)
    config = configs.controller_config(paths, Addressing(state.octet), name, fence=enabled)
    async with state_lock(base):
        state = LabState.load(paths.state_file)
        await processes.stop(state.controller_pid, str(base))
        configs.write_yaml(paths.controller_config, config)
        state.controller_pid = await spawn_controller(paths)
        state.save(paths.state_file)
    log.info("controller restarted", lab=name, pid=state.controller_pid, fence_command=enabled)
    pid = state.controller_pid

    def check_alive() -> str | None:
        alive = processes.is_running(pid, str(base))
        return None if alive else f"the controller of lab {name} exited during start-up; read {paths.controller_log}"

    await readiness.wait_nodes_ready(paths.cli_config, [h.node for h in state.hosts], env=processes.daemon_env(),
                                     timeout=timeout, check_alive=check_alive)  # fmt: skip
