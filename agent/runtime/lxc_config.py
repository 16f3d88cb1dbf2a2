"""Rendering of a container's LXC configuration file.

The config is checkpoint-friendly by construction (DESIGN.md): no ttys, no
console, no bind mounts of host directories, init started by LXC itself.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from agent.runtime.cgroups import CgroupLayout
from corral.model import Limits, NetworkAttachment

# The devices a container may use (same list as LXC's common.conf).
_DEVICE_RULES = [
    "c *:* m", "b *:* m", "c 1:3 rwm", "c 1:5 rwm", "c 1:7 rwm", "c 5:0 rwm", "c 5:1 rwm",
    "c 5:2 rwm", "c 1:8 rwm", "c 1:9 rwm", "c 136:* rwm", "c 10:229 rwm",
]  # fmt: skip


@dataclass(frozen=True)
class LxcConfig:
    name: str
    rootfs: Path
    bridge: str
    network: NetworkAttachment
    limits: Limits
    halt_signal: str
    log_file: Path

    def render(self, cgroups: CgroupLayout) -> str:
        lines = [
            "# Written by corral-agent; changes are overwritten.",
            f"lxc.uts.name = {self.name}",
            f"lxc.rootfs.path = dir:{self.rootfs}",
            f"lxc.signal.halt = {self.halt_signal}",
            "lxc.signal.reboot = SIGTERM",
            "lxc.autodev = 1",
            "lxc.tty.max = 0",
            "lxc.pty.max = 64",
            "lxc.console.path = none",
            "lxc.cap.drop = sys_module mac_admin mac_override sys_time",
            "lxc.mount.auto = cgroup:mixed proc:mixed sys:mixed",
            "lxc.mount.entry = shm dev/shm tmpfs defaults,create=dir 0 0",
            f"lxc.log.file = {self.log_file}",
            "lxc.log.level = WARN",
        ]
        if Path("/sys/kernel/security/apparmor").exists():
            # Only where AppArmor exists: CRIU refuses a restore naming an LSM the kernel lacks.
            lines.append("lxc.apparmor.profile = unconfined")
        prefix = cgroups.config_prefix
        lines.append(f"{prefix}.devices.deny = a")
        lines += [f"{prefix}.devices.allow = {rule}" for rule in _DEVICE_RULES]
        lines += [f"{key} = {value}" for key, value in cgroups.limit_settings(self.limits)]
        if self.network.ipv4_cidr:
            lines += [
                "lxc.net.0.type = veth",
                f"lxc.net.0.link = {self.bridge}",
                "lxc.net.0.flags = up",
                "lxc.net.0.name = eth0",
                f"lxc.net.0.hwaddr = {self.network.mac}",
                f"lxc.net.0.ipv4.address = {self.network.ipv4_cidr} {_broadcast(self.network.ipv4_cidr)}",
            ]
            if self.network.gateway:
                lines.append(f"lxc.net.0.ipv4.gateway = {self.network.gateway}")
        else:
            lines.append("lxc.net.0.type = empty")
        return "\n".join(lines) + "\n"


def _broadcast(cidr: str) -> str:
    # LXC computes a wrong broadcast (0.0.0.255) unless it is given one.
    return str(ipaddress.IPv4Interface(cidr).network.broadcast_address)
