"""Which processes of this machine belong to one lab host, found in one pass over /proc.

A lab host's processes are: everything in its network or its mount namespace
(the agent, `[lxc monitor]`s, helpers, commands a test ran with host_command),
the monitors of containers under its LXC path, and every process of those
containers. A container's processes live in namespaces of their own, so they
are found through its init (a child of its monitor) and the PID namespace that
init heads. Used to power a host off and to prove that nothing of it still runs.
Synchronous (reads /proc): call it through asyncio.to_thread.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from lab import processes

NsId = tuple[int, int]  # (st_dev, st_ino) of an nsfs file


@dataclass(frozen=True)
class HostIds:
    """What identifies one lab host's processes."""

    net: NsId | None  # its network namespace
    mnt: NsId | None  # its pinned mount namespace
    lxc_path: Path


@dataclass
class HostProcesses:
    host: set[int] = field(default_factory=set)  # in the host's own namespaces, and its monitors
    containers: set[int] = field(default_factory=set)  # the containers' processes
    container_inits: set[int] = field(default_factory=set)
    pid_namespaces: set[NsId] = field(default_factory=set)  # one per running container

    @property
    def all(self) -> set[int]:
        return self.host | self.containers

    def __bool__(self) -> bool:
        return bool(self.host or self.containers)


@dataclass(frozen=True)
class _Proc:
    pid: int
    ppid: int
    net: NsId | None
    mnt: NsId | None
    pidns: NsId | None
    cmdline: str


def find(hosts: dict[str, HostIds], known_pid_namespaces: Iterable[NsId] = ()) -> dict[str, HostProcesses]:
    """For each host (by node name), its live processes. `known_pid_namespaces`: the
    PID namespaces of containers seen earlier, whose monitors may be gone by now."""
    procs = _scan()
    by_parent: dict[int, list[_Proc]] = {}
    for p in procs:
        by_parent.setdefault(p.ppid, []).append(p)
    known = set(known_pid_namespaces)
    found = {}
    for node, ids in hosts.items():
        result = HostProcesses()
        prefix = f"[lxc monitor] {str(ids.lxc_path).rstrip('/')} "
        monitors = [p for p in procs if p.cmdline.startswith(prefix)]
        result.host = {p.pid for p in procs if (ids.net and p.net == ids.net) or (ids.mnt and p.mnt == ids.mnt)}
        result.host |= {p.pid for p in monitors}
        for monitor in monitors:
            for child in by_parent.get(monitor.pid, []):
                # lxc-start's monitor forks the container's init into new namespaces.
                if child.pidns is not None and child.pidns != monitor.pidns:
                    result.container_inits.add(child.pid)
                    result.pid_namespaces.add(child.pidns)
        namespaces = result.pid_namespaces | known
        result.containers = {p.pid for p in procs if p.pidns in namespaces} - result.host
        found[node] = result
    return found


def _scan() -> list[_Proc]:
    spared = processes.self_and_ancestors()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        if pid in spared:
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        # The fields after the parenthesised command name (which may hold spaces): state, ppid, ...
        fields = stat[stat.rfind(")") + 2:].split()
        if fields[0] in ("Z", "X"):
            continue  # a zombie runs nothing; its parent will reap it
        out.append(_Proc(pid, int(fields[1]), _ns(pid, "net"), _ns(pid, "mnt"), _ns(pid, "pid"),
                         raw.replace(b"\0", b" ").decode(errors="replace")))
    return out


def _ns(pid: int, kind: str) -> NsId | None:
    try:
        st = os.stat(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None
    return st.st_dev, st.st_ino
