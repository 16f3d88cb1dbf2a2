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
    return [mount / path.lstrip("/") for mount, _, _, path in _memberships(pid, mountinfo)]


def _memberships(pid: int, mountinfo: Path) -> list[tuple[Path, str, set[str], str]]:
    """(mount point, fstype, super options, cgroup path) of each mounted hierarchy `pid` is in
    below its root ([] if it is gone)."""
    try:
        memberships = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return []
    by_hierarchy: dict[str, str] = {}
    for line in memberships:
        _, controllers, path = line.split(":", 2)
        by_hierarchy[controllers] = path
    found = []
    for mount, fstype, options in _cgroup_mount_entries(mountinfo):
        if fstype == "cgroup2":
            path = by_hierarchy.get("")
        else:
            wanted = {o.removeprefix("name=") if o.startswith("name=") else o for o in options}
            path = next((p for c, p in by_hierarchy.items() if c and set(c.replace("name=", "").split(",")) <= wanted
                         and set(c.replace("name=", "").split(",")) & wanted), None)  # fmt: skip
        if path and path != "/":
            found.append((mount, fstype, options, path))
    return found


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


# -- usage counters (corral ct stats, /metrics) ---------------------------------------------

_UNLIMITED_V1 = 1 << 62  # memory.limit_in_bytes reads ~2**63 (the page counter's max) when unlimited


def container_cgroups(pid: int, mountinfo: Path = Path("/proc/self/mountinfo")) -> dict[str, Path]:
    """The cgroups of the container whose init is `pid`, by controller ("" = the cgroup v2
    hierarchy): the lxc.payload.NAME directory each hierarchy holds it in (init may sit deeper,
    e.g. in init.scope under systemd), so that the counters cover every process of the container."""
    found: dict[str, Path] = {}
    for mount, fstype, options, path in _memberships(pid, mountinfo):
        directory = mount / path.lstrip("/")
        top = next((d for d in (directory, *directory.parents) if d.name.startswith("lxc.payload.")), directory)
        for controller in ([""] if fstype == "cgroup2" else options - {"rw", "ro"}):
            found.setdefault(controller, top)
    return found


class _Reader:
    """Reads counter files of one container's cgroups; notes what it could not read."""

    def __init__(self, dirs: dict[str, Path]) -> None:
        self.dirs = dirs
        self.missing: list[str] = []

    def text(self, controller: str, file: str) -> str | None:
        directory = self.dirs.get(controller)
        try:
            if directory is None:
                raise OSError
            return (directory / file).read_text()
        except OSError:
            self.missing.append(file)
            return None

    def number(self, controller: str, file: str) -> int:
        """A one-value file; 'max' (no limit) reads 0."""
        text = self.text(controller, file)
        value = (text or "0").strip()
        return 0 if value == "max" else int(value)

    def keyed(self, controller: str, file: str) -> dict[str, int]:
        """A flat-keyed file ('key value' lines: cpu.stat, memory.events, pids.events)."""
        pairs = (line.split() for line in (self.text(controller, file) or "").splitlines())
        return {p[0]: int(p[1]) for p in pairs if len(p) == 2 and p[1].lstrip("-").isdigit()}


def read_counters(dirs: dict[str, Path], v1: bool) -> tuple[dict[str, int], list[str]]:
    """A container's usage and limit-hit counters (the fields of corral.model.ContainerStats of
    those names) from its cgroups (`container_cgroups`), and the files that could not be read.
    Blocking: call it off the event loop."""
    r = _Reader(dirs)
    if v1:
        cpu = r.keyed("cpu", "cpu.stat")
        quota, period = r.number("cpu", "cpu.cfs_quota_us"), r.number("cpu", "cpu.cfs_period_us")
        memory_limit = r.number("memory", "memory.limit_in_bytes")
        oom = r.keyed("memory", "memory.oom_control")
        counters = {
            "cpu_usage_usec": r.number("cpuacct", "cpuacct.usage") // 1000,
            "cpu_throttled_count": cpu.get("nr_throttled", 0),
            "cpu_throttled_usec": cpu.get("throttled_time", 0) // 1000,
            "cpu_limit_millis": quota * 1000 // period if quota > 0 and period > 0 else 0,
            "memory_bytes": r.number("memory", "memory.usage_in_bytes"),
            "memory_limit_bytes": 0 if memory_limit >= _UNLIMITED_V1 else memory_limit,
            "memory_max_events": r.number("memory", "memory.failcnt"),
            "memory_oom_kill_events": oom.get("oom_kill", 0),
        }
        pids = "pids"
    else:
        cpu = r.keyed("", "cpu.stat")
        quota, _, period = (r.text("", "cpu.max") or "max").partition(" ")
        events = r.keyed("", "memory.events")
        counters = {
            "cpu_usage_usec": cpu.get("usage_usec", 0),
            "cpu_throttled_count": cpu.get("nr_throttled", 0),
            "cpu_throttled_usec": cpu.get("throttled_usec", 0),
            "cpu_limit_millis": int(quota) * 1000 // int(period) if quota.isdigit() and period.strip().isdigit() else 0,
            "memory_bytes": r.number("", "memory.current"),
            "memory_limit_bytes": r.number("", "memory.max"),
            "memory_high_events": events.get("high", 0),
            "memory_max_events": events.get("max", 0),
            "memory_oom_events": events.get("oom", 0),
            "memory_oom_kill_events": events.get("oom_kill", 0),
        }
        pids = ""
    counters |= {
        "pids": r.number(pids, "pids.current"),
        "pids_limit": r.number(pids, "pids.max"),
        "pids_max_events": r.keyed(pids, "pids.events").get("max", 0),
    }
    return counters, r.missing
