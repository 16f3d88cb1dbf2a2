"""Which cgroup keys carry each limit, for cgroup v1 and v2 hosts."""

from __future__ import annotations

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
