"""Container cgroups: which keys carry each limit (cgroup v1 and v2 hosts), and which
directories LXC made for a container, to remove the ones it leaves behind empty."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from corral.model import Limits

CPU_PERIOD_US = 100_000


@dataclass(frozen=True)
class CgroupLayout:
    v1: bool

    @classmethod
    def detect(cls, root: Path = Path("/sys/fs/cgroup")) -> "CgroupLayout":
        # A hybrid host (v1 controllers plus an empty v2 'unified') is v1 for limits.
        return cls(v1=(root / "memory").is_dir())

    @property
    def config_prefix(self) -> str:
        return "lxc.cgroup" if self.v1 else "lxc.cgroup2"

    def limit_files(self, limits: Limits) -> list[tuple[str, str]]:
        """(cgroup file, value) pairs for the non-zero limits."""
        out: list[tuple[str, str]] = []
        if self.v1:
            if limits.memory_bytes:
                out.append(("memory.limit_in_bytes", str(limits.memory_bytes)))
            if limits.cpu_millis:
                out.append(("cpu.cfs_period_us", str(CPU_PERIOD_US)))
                out.append(("cpu.cfs_quota_us", str(limits.cpu_millis * CPU_PERIOD_US // 1000)))
            if limits.cpu_shares:
                out.append(("cpu.shares", str(limits.cpu_shares)))
        else:
            if limits.memory_bytes:
                out.append(("memory.max", str(limits.memory_bytes)))
            if limits.cpu_millis:
                out.append(("cpu.max", f"{limits.cpu_millis * CPU_PERIOD_US // 1000} {CPU_PERIOD_US}"))
            if limits.cpu_shares:
                # v2 weight is 1..10000 with default 100; v1 shares default 1024.
                out.append(("cpu.weight", str(max(1, min(10000, limits.cpu_shares * 100 // 1024)))))
        if limits.pids_max:
            out.append(("pids.max", str(limits.pids_max)))
        return out

    def limit_settings(self, limits: Limits) -> list[tuple[str, str]]:
        return [(f"{self.config_prefix}.{f}", v) for f, v in self.limit_files(limits)]


def container_cgroup_dirs(name: str, mountinfo: Path = Path("/proc/self/mountinfo")) -> list[Path]:
    """The cgroups LXC made for container `name` (lxc.payload.NAME, lxc.monitor.NAME, with LXC's
    -N suffix when the name was taken) in every mounted hierarchy."""
    pattern = re.compile(rf"^lxc\.(payload|monitor)\.{re.escape(name)}(-\d+)?$")
    found: list[Path] = []
    for mount in _cgroup_mounts(mountinfo):
        try:
            found += [p for p in mount.iterdir() if pattern.match(p.name) and p.is_dir()]
        except OSError:
            continue
    return found


def _cgroup_mounts(mountinfo: Path) -> list[Path]:
    return [mount for mount, _, _ in _cgroup_mount_entries(mountinfo)]


def _cgroup_mount_entries(mountinfo: Path) -> list[tuple[Path, str, set[str]]]:
    """(mount point, fstype, super options) of every cgroup and cgroup2 mount."""
    entries = []
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return entries
    for line in lines:
        pre, _, post = line.partition(" - ")
        fields, tail = pre.split(), post.split()
        if len(fields) > 4 and tail[:1] in (["cgroup"], ["cgroup2"]):
            options = set(tail[2].split(",")) if len(tail) > 2 else set()
            entries.append((Path(fields[4]), tail[0], options))
    return entries


def cgroup_dirs_of(pid: int, mountinfo: Path = Path("/proc/self/mountinfo")) -> list[Path]:
    """The cgroup directories process `pid` is in, one per mounted hierarchy ([] if it is gone)."""
    try:
        memberships = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return []
    by_hierarchy: dict[str, str] = {}
    for line in memberships:
        _, controllers, path = line.split(":", 2)
        by_hierarchy[controllers] = path
    dirs = []
    for mount, fstype, options in _cgroup_mount_entries(mountinfo):
        if fstype == "cgroup2":
            path = by_hierarchy.get("")
        else:
            wanted = {o.removeprefix("name=") if o.startswith("name=") else o for o in options}
            path = next((p for c, p in by_hierarchy.items() if c and set(c.replace("name=", "").split(",")) <= wanted
                         and set(c.replace("name=", "").split(",")) & wanted), None)  # fmt: skip
        if path and path != "/":
            dirs.append(mount / path.lstrip("/"))
    return dirs


def remove_empty(directories: list[Path]) -> list[Path]:
    """rmdir each (children first) where it is an empty cgroup; returns those removed."""
    removed = []
    for top in directories:
        if not top.is_dir():
            continue
        for directory in sorted((Path(d) for d, _, _ in os.walk(top)), key=lambda p: len(p.parts), reverse=True):
            try:
                directory.rmdir()
                removed.append(directory)
            except OSError:
                pass
    return removed
