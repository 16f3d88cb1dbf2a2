"""Would CRIU refuse to dump this container? Read from /proc while it runs on.

The live-migration pre-flight. A trial dump answers best but copies the whole
memory while the workload stands still (1-4 s at 1 GiB); this looks at the
container's tasks the way CRIU 4.2's dump does, without stopping anything, and
names what that dump is known to refuse (criu/cr-dump.c, seize.c, namespaces.c,
files.c, files-reg.c; LXC runs it with --tcp-established, --file-locks,
--link-remap and the default 1 MiB ghost limit):

- a task whose session is led from outside the container's PID namespace (a
  process left behind by lxc-attach, `corral ct exec`);
- a task traced by another (a debugger, strace): CRIU must seize every task;
- a nested PID, UTS, IPC, user, cgroup or time namespace;
- an open file on a mount the container's tasks do not have (a host file passed in);
- an anon-inode descriptor CRIU has no driver for (io_uring, userfaultfd, perf...);
- a character device CRIU cannot dump (fuse, kvm, a GPU...);
- a deleted file, open or mapped, bigger than the ghost limit.

What it cannot see, so a real dump may still fail (the container then runs on and
the migration rolls back, DESIGN.md rule 2): unix sockets connected outside the
container, socket families CRIU lacks, device mappings CRIU refuses, file locks
held from outside, and anything that changes between this look and the dump.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass, field

GHOST_LIMIT = 1 << 20  # CRIU's default --ghost-limit (lxc-checkpoint sets none)
# Anon inodes CRIU dumps (criu/files.c dump_one_file; bpf-map only when built with libbpf).
SUPPORTED_ANON = frozenset({"[eventfd]", "[eventpoll]", "inotify", "[fanotify]", "[signalfd]", "[timerfd]", "[pidfd]"})
MEM_MAJOR, MISC_MAJOR = 1, 10
MISC_SUPPORTED = frozenset({200, 235})  # tun, autofs
# Namespaces CRIU cannot dump nested (only mount and network ones: CLONE_SUBNS).
NESTED_UNSUPPORTED = ("pid", "uts", "ipc", "user", "cgroup", "time")
_TTY_MAJORS = frozenset({136, 188, 204, *range(128, 136)})  # pty slaves, masters, serial (criu/tty.c)


def _is_tty(major: int, minor: int) -> bool:
    return major in _TTY_MAJORS or (major == 4 and 1 <= minor <= 63) or (major == 5 and minor in (0, 1, 2))


@dataclass(frozen=True)
class Blocker:
    """One thing CRIU would refuse, on one task."""

    pid: int  # in the host's PID namespace
    comm: str
    what: str

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.comm}): {self.what}"


@dataclass(frozen=True)
class Dumpability:
    tasks: int
    memory_bytes: int  # resident anonymous and shared memory of the tasks: what a dump copies
    files: int  # descriptors and mapped files looked at
    ms: float  # how long the look took (the container ran on meanwhile)
    blockers: tuple[Blocker, ...] = field(default=())

    @property
    def dumpable(self) -> bool:
        return not self.blockers

    def reason(self, limit: int = 5) -> str:
        shown = "; ".join(str(b) for b in self.blockers[:limit])
        more = len(self.blockers) - limit
        return shown + (f"; and {more} more" if more > 0 else "")


def _status(pid: int) -> dict[str, str]:
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def _ns(pid: int, kind: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return found


def container_tasks(init_pid: int) -> tuple[list[int], set[int]]:
    """(every task of the container, those of them in nested PID namespaces): the tasks in
    init's PID namespace, where a leftover of lxc-attach is too, and init's descendants."""
    pidns = _ns(init_pid, "pid")
    if pidns is None:
        raise ProcessLookupError(init_pid)
    members = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and _ns(int(entry.name), "pid") == pidns:
            members.add(int(entry.name))
    nested: set[int] = set()
    todo = [init_pid]
    while todo:
        for child in _children(todo.pop()):
            if child not in members and child not in nested:
                nested.add(child)
                todo.append(child)
            elif child in members:
                todo.append(child)
    members.add(init_pid)
    return sorted(members | nested), nested


def _mount_ids(tasks: list[int]) -> set[int]:
    """The mounts CRIU will know: those of every mount namespace among the tasks."""
    ids: set[int] = set()
    seen: set[str] = set()
    for pid in tasks:
        ns = _ns(pid, "mnt")
        if ns is None or ns in seen:
            continue
        try:
            with open(f"/proc/{pid}/mountinfo") as f:
                ids.update(int(line.split(maxsplit=1)[0]) for line in f if line.strip())
            seen.add(ns)
        except OSError:
            continue
    return ids


def _mnt_id(pid: int, fd: str) -> int | None:
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("mnt_id:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _is_ghost(st: os.stat_result, ghost_limit: int) -> bool:
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 0 and st.st_blocks * 512 > ghost_limit


def _listing(directory: str) -> list[str]:
    try:
        return os.listdir(directory)
    except OSError:  # the task is gone, or has no such table
        return []


def _fd_blocker(pid: int, fd: str, link: str, st: os.stat_result, mounts: set[int], ghost_limit: int) -> str | None:
    """What CRIU would refuse in descriptor `fd` (pointing to `link`, of stat `st`), or None."""
    if link.startswith("anon_inode:"):
        kind = link[len("anon_inode:") :]
        return None if kind in SUPPORTED_ANON else f"fd {fd} is a {kind} descriptor, which CRIU cannot dump"
    if link.startswith(("socket:", "pipe:", "pidfd:", "/memfd:")):
        return None  # sockets: not looked at (see the module's docstring); pipes, memfds: dumped
    mode = st.st_mode
    if stat.S_ISCHR(mode):
        major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
        if _is_tty(major, minor):
            return None
        if major not in (MEM_MAJOR, MISC_MAJOR) or (major == MISC_MAJOR and minor not in MISC_SUPPORTED):
            return f"fd {fd} is the character device {major}:{minor} ({link}), which CRIU cannot dump"
        if major == MISC_MAJOR and minor != 235:
            return None  # tun; mem devices and autofs are dumped as files: their mount must be known
    elif not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
        return None
    if ":[" in link and not link.startswith("/"):
        return None  # a namespace file (nsfs), which CRIU dumps
    mnt = _mnt_id(pid, fd)
    if mnt is not None and mnt not in mounts:
        return f"fd {fd} is {link}, on a mount the container does not have (a file passed in from outside)"
    if _is_ghost(st, ghost_limit):
        return (f"fd {fd} is the deleted file {link} of {st.st_blocks * 512} bytes, over CRIU's ghost "
                f"limit of {ghost_limit}")  # fmt: skip
    return None


def _file_blockers(pid: int, mounts: set[int], ghost_limit: int) -> tuple[int, list[str]]:
    """(descriptors and mapped files looked at, what CRIU would refuse among them)."""
    found: list[str] = []
    count = 0
    for fd in _listing(f"/proc/{pid}/fd"):
        path = f"/proc/{pid}/fd/{fd}"
        try:
            link, st = os.readlink(path), os.stat(path)
        except OSError:
            continue  # closed meanwhile
        count += 1
        if (why := _fd_blocker(pid, fd, link, st, mounts, ghost_limit)) is not None:
            found.append(why)
    for area in _listing(f"/proc/{pid}/map_files"):
        path = f"/proc/{pid}/map_files/{area}"
        try:
            link = os.readlink(path)
            if link.startswith(("/memfd:", "/dev/zero", "/SYSV", "/[")):
                continue  # shared anonymous memory, memfds, System V segments: dumped with the memory
            st = os.stat(path)
        except OSError:
            continue
        count += 1
        if _is_ghost(st, ghost_limit):
            found.append(f"maps the deleted file {link} of {st.st_blocks * 512} bytes, over CRIU's ghost "
                         f"limit of {ghost_limit}")  # fmt: skip
    return count, found


def inspect(init_pid: int, ghost_limit: int = GHOST_LIMIT) -> Dumpability:
    """Look at the container whose init is `init_pid` (host PID namespace). Blocking: run it
    in a thread. Raises ProcessLookupError if init is gone."""
    t0 = time.perf_counter()
    tasks, nested = container_tasks(init_pid)
    init_ns = {kind: _ns(init_pid, kind) for kind in NESTED_UNSUPPORTED}
    mounts = _mount_ids(tasks)
    blockers: list[Blocker] = []
    files = memory = 0
    for pid in tasks:
        try:
            status = _status(pid)
        except OSError:
            continue  # exited meanwhile
        comm = status.get("Name", "?")
        memory += sum(_kib(status.get(key, "")) for key in ("RssAnon", "RssShmem")) * 1024

        def block(what: str) -> None:
            blockers.append(Blocker(pid, comm, what))  # noqa: B023 (used at once)

        if pid in nested:
            block("it runs in a PID namespace nested in the container's, which CRIU cannot dump")
        elif status.get("NSsid", "").split()[-1:] == ["0"]:
            block("its session is led from outside the container (an open `corral ct exec`/`ct enter` or "
                  "lxc-attach session, or a process one left running): CRIU cannot dump it")  # fmt: skip
        for kind in NESTED_UNSUPPORTED:
            if kind != "pid" and init_ns[kind] is not None and _ns(pid, kind) not in (None, init_ns[kind]):
                block(f"it has its own {kind} namespace nested in the container's, which CRIU cannot dump")
        tracers = {_status_field(pid, tid, "TracerPid") for tid in _listing(f"/proc/{pid}/task")} - {None, "0"}
        if tracers:
            block(f"it is traced by pid {', '.join(sorted(tracers))} (a debugger or strace): CRIU must trace it itself")
        if status.get("State", "").startswith("Z"):
            continue
        looked, found = _file_blockers(pid, mounts, ghost_limit)
        files += looked
        for what in found:
            block(what)
    return Dumpability(len(tasks), memory, files, (time.perf_counter() - t0) * 1000, tuple(blockers))


def _kib(value: str) -> int:
    """'1234 kB' -> 1234."""
    number = value.split()[:1]
    return int(number[0]) if number and number[0].isdigit() else 0


def _status_field(pid: int, tid: str, key: str) -> str | None:
    try:
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None
