"""The host's cgroup mounts: read them, so a lab host can mount the same again.

`ip netns exec` gives its command a fresh /sys for the network namespace,
which hides /sys/fs/cgroup; LXC then silently starts containers without any
cgroup (no limits). `hostenter` uses `cgroup_mounts_to_recreate` to mount the
same hierarchies again (the same superblocks, so containers land in the host's
real hierarchies). The helpers at the end let a test check that a container
really is in its cgroup.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = "/sys/fs/cgroup"

# Per-mount options worth copying from the host's mount; everything else
# (relatime, rw) is the default.
_MOUNT_FLAG_NAMES = ("ro", "nosuid", "nodev", "noexec", "noatime", "nodiratime")


@dataclass(frozen=True)
class MountInfo:
    root: str
    mount_point: str
    mount_options: tuple[str, ...]
    fstype: str
    source: str
    super_options: tuple[str, ...]


@dataclass(frozen=True)
class CgroupMount:
    """One mount to make: `mount -t fstype -o data source target`."""

    target: str
    fstype: str  # "tmpfs", "cgroup" or "cgroup2"
    source: str
    flags: tuple[str, ...]  # names from _MOUNT_FLAG_NAMES
    data: str  # e.g. "memory", "name=systemd", "mode=755"


def parse_mountinfo(text: str) -> list[MountInfo]:
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if sep < 6 or len(fields) < sep + 4:
            continue
        mounts.append(
            MountInfo(
                root=_unescape(fields[3]),
                mount_point=_unescape(fields[4]),
                mount_options=tuple(fields[5].split(",")),
                fstype=fields[sep + 1],
                source=_unescape(fields[sep + 2]),
                super_options=tuple(fields[sep + 3].split(",")),
            )
        )
    return mounts


def cgroup_mounts_to_recreate(host_mountinfo: str) -> list[CgroupMount]:
    """The mounts that rebuild the host's /sys/fs/cgroup, parents first.

    Copies the host's layout: the tmpfs on /sys/fs/cgroup (unless cgroup2 sits
    there directly) and every cgroup/cgroup2 mount below it with its options.
    """
    wanted: list[CgroupMount] = []
    for m in parse_mountinfo(host_mountinfo):
        inside = m.mount_point == CGROUP_ROOT or m.mount_point.startswith(CGROUP_ROOT + "/")
        if not inside:
            continue
        if m.fstype in ("cgroup", "cgroup2"):
            data = [o for o in m.super_options if o not in ("rw", "ro")]
        elif m.fstype == "tmpfs" and m.mount_point == CGROUP_ROOT:
            data = [o for o in m.super_options if o not in ("rw", "ro") and not o.startswith(("size=", "nr_inodes="))]
        else:
            continue
        flags = tuple(o for o in m.mount_options if o in _MOUNT_FLAG_NAMES)
        wanted.append(CgroupMount(m.mount_point, m.fstype, m.source or m.fstype, flags, ",".join(data)))
    # A mount point seen twice (over-mounted) keeps its last, visible mount.
    by_target = {m.target: m for m in wanted}
    return sorted(by_target.values(), key=lambda m: m.target.count("/"))


def cgroup_mounts_from_proc_cgroup(proc_cgroup: str) -> list[CgroupMount]:
    """Fallback when the host's mountinfo is unreadable: derive the usual layout
    from /proc/self/cgroup (`ID:controllers:path`; ID 0 is the unified hierarchy)."""
    v1: list[CgroupMount] = []
    has_v2 = False
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, _path = parts
        if hid == "0" and controllers == "":
            has_v2 = True
            continue
        if not controllers:
            continue
        names = controllers.split(",")
        # systemd names its named hierarchy dir "systemd" (name=systemd).
        dirname = ",".join(n.removeprefix("name=") for n in names)
        v1.append(CgroupMount(f"{CGROUP_ROOT}/{dirname}", "cgroup", "cgroup", ("nosuid", "nodev", "noexec"),
                              controllers))
    if not v1:
        return [CgroupMount(CGROUP_ROOT, "cgroup2", "cgroup2", ("nosuid", "nodev", "noexec"), "")] if has_v2 else []
    mounts = [CgroupMount(CGROUP_ROOT, "tmpfs", "tmpfs", ("nosuid", "nodev", "noexec"), "mode=755")]
    mounts += sorted(v1, key=lambda m: m.target)
    if has_v2:
        mounts.append(CgroupMount(f"{CGROUP_ROOT}/unified", "cgroup2", "cgroup2", ("nosuid", "nodev", "noexec"), ""))
    return mounts


def alias_links(mounts: list[CgroupMount]) -> dict[str, str]:
    """Symlinks the host usually has for co-mounted controllers
    (cpu -> cpu,cpuacct); they live on the tmpfs, so mountinfo does not show them."""
    targets = {m.target for m in mounts}
    links: dict[str, str] = {}
    for m in mounts:
        name = m.target.rsplit("/", 1)[-1]
        if m.fstype != "cgroup" or "," not in name:
            continue
        for part in name.split(","):
            link = f"{CGROUP_ROOT}/{part}"
            if link not in targets:
                links[link] = name
    return links


def has_cgroup_mounts(mountinfo: str) -> bool:
    return any(
        m.fstype in ("cgroup", "cgroup2") and (m.mount_point == CGROUP_ROOT or m.mount_point.startswith(CGROUP_ROOT + "/"))
        for m in parse_mountinfo(mountinfo)
    )


# --- checks for tests: where is a process, what limit applies to it --------------


def cgroups_of(pid: int) -> dict[str, str]:
    """Controller (or "name=systemd", or "" for cgroup2) -> cgroup path of `pid`."""
    paths: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        hid, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            paths[c] = path
    return paths


def memory_limit_of(pid: int) -> int | None:
    """The cgroup v1 memory limit (bytes) of the cgroup `pid` is in, read on the
    host's /sys/fs/cgroup/memory; None if there is no memory hierarchy."""
    path = cgroups_of(pid).get("memory")
    if path is None:
        return None
    limit = Path(CGROUP_ROOT, "memory", path.lstrip("/"), "memory.limit_in_bytes")
    return int(limit.read_text())


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)
