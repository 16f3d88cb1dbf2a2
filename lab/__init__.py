"""The local lab: several Corral hosts on one machine, as network namespaces.

Public API (all async unless noted):
    lab_up(name="demo", nodes=3, base_dir=None, *, wait_ready=True) -> LabInfo
    lab_down(name="demo", base_dir=None) -> None          idempotent, works without lab.json
    lab_status(name="demo", base_dir=None) -> LabInfo | None
    lab_cli_config(name, base_dir=None) -> Path           (sync)
    start_agent / stop_agent / kill_agent / restart_agent(name, node, base_dir=None)
        start_agent(..., announce_version=V): the agent announces version V (version skew)
    kill_controller / start_controller(name, base_dir=None)   a controller crash and restart
    set_fencing(name, enabled, base_dir=None)             the controller with / without the lab's fence command
    crash_host(name, node, base_dir=None)                 = power_off (kept for older callers)
    set_host_link(name, node, up, base_dir=None)          partition / heal a host
    partition / heal(name, node, base_dir=None)           its link to the lab bridge down / up
    power_off(name, node, base_dir=None) -> PowerOffReport  a power cut, checked (FenceFailed if not)
    power_on(name, node, base_dir=None, *, wait_ready=False) -> int  its agent starts again
    fence_command(name, base_dir=None) -> list[str]       (sync) the lab's fence argv, with "{node}"
    host_command(name, node, argv, base_dir=None) -> list[str]  (sync) run argv on that host

Exports are loaded lazily: `python -m lab.hostenter` and
`python -m lab.spawn` import this package first and must stay quick.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lab.hosts import (
        crash_host,
        host_command,
        kill_agent,
        restart_agent,
        set_host_link,
        start_agent,
        stop_agent,
    )
    from lab.controller import kill_controller, set_fencing, start_controller
    from lab.faults import FenceFailed, PowerOffReport, fence_command, heal, partition, power_off, power_on
    from lab.lab import lab_cli_config, lab_down, lab_status, lab_up
    from lab.state import HostInfo, LabInfo

_EXPORTS = {
    "lab_up": "lab.lab",
    "lab_down": "lab.lab",
    "lab_status": "lab.lab",
    "lab_cli_config": "lab.lab",
    "start_agent": "lab.hosts",
    "stop_agent": "lab.hosts",
    "kill_agent": "lab.hosts",
    "restart_agent": "lab.hosts",
    "crash_host": "lab.hosts",
    "set_host_link": "lab.hosts",
    "host_command": "lab.hosts",
    "kill_controller": "lab.controller",
    "start_controller": "lab.controller",
    "set_fencing": "lab.controller",
    "partition": "lab.faults",
    "heal": "lab.faults",
    "power_off": "lab.faults",
    "power_on": "lab.faults",
    "fence_command": "lab.faults",
    "FenceFailed": "lab.faults",
    "PowerOffReport": "lab.faults",
    "LabInfo": "lab.state",
    "HostInfo": "lab.state",
}

__all__ = [
    "FenceFailed",
    "HostInfo",
    "LabInfo",
    "PowerOffReport",
    "crash_host",
    "fence_command",
    "heal",
    "host_command",
    "kill_agent",
    "kill_controller",
    "lab_cli_config",
    "lab_down",
    "lab_status",
    "lab_up",
    "partition",
    "power_off",
    "power_on",
    "restart_agent",
    "set_fencing",
    "set_host_link",
    "start_agent",
    "start_controller",
    "stop_agent",
]


def __getattr__(attr: str) -> Any:
    module = _EXPORTS.get(attr)
    if module is None:
        raise AttributeError(f"module 'lab' has no attribute {attr!r}")
    import importlib

    value = getattr(importlib.import_module(module), attr)
    globals()[attr] = value
    return value
