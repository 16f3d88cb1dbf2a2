"""Which cgroup keys carry each limit, for cgroup v1 and v2 hosts."""

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


def remove_empty_container_cgroups(name: str, mountinfo: Path = Path("/proc/self/mountinfo")) -> list[Path]:
    """Remove the empty cgroups LXC made for container `name` (lxc.payload.NAME, lxc.monitor.NAME,
    with LXC's -N suffix when the name was taken) in every mounted hierarchy; returns them.
    Why: a restore that fails leaves them behind (LXC made them, CRIU never filled them), and
    the next start of NAME then lands in lxc.payload.NAME-1. rmdir only ever removes an empty
    cgroup: one with a process in it, anywhere below, stays."""
    removed: list[Path] = []
    pattern = re.compile(rf"^lxc\.(payload|monitor)\.{re.escape(name)}(-\d+)?$")
    for mount in _cgroup_mounts(mountinfo):
        try:
            candidates = [p for p in mount.iterdir() if pattern.match(p.name) and p.is_dir()]
        except OSError:
            continue
        for top in candidates:
            # Children first: a systemd container's payload has cgroups of its own.
            for directory in sorted((Path(d) for d, _, _ in os.walk(top)), key=lambda p: len(p.parts), reverse=True):
                try:
                    directory.rmdir()
                    removed.append(directory)
                except OSError:
                    pass
    return removed


def _cgroup_mounts(mountinfo: Path) -> list[Path]:
    mounts = []
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return mounts
    for line in lines:
        pre, _, post = line.partition(" - ")
        fields = pre.split()
        if len(fields) > 4 and post.split()[:1] in (["cgroup"], ["cgroup2"]):
            mounts.append(Path(fields[4]))
    return mounts
