"""Make a process a lab host process: give it the host's /sys and cgroups.

Two ways in:
- `python -m lab.hostenter --init`, run once per host by the lab as
  the first process of the host's new mount namespace (see hostns.py, which
  pins that namespace; every host process then joins it with nsenter). It
  replaces /sys by a sysfs of the host's network namespace (LXC looks there
  for the host's `br0`) and mounts the cgroup hierarchies again, then exits.
- `ip netns exec NS python -m lab.hostenter -- CMD...`: `ip netns exec`
  gives CMD a fresh private mount namespace with /sys already remounted; this
  mounts the cgroup hierarchies in it and execs CMD. Works without a pinned
  namespace, but whatever CMD mounts is then seen by CMD's process tree only.

Why the cgroups: a sysfs mounted for a network namespace hides the host's
/sys/fs/cgroup mounts, and LXC then silently starts containers with no cgroup
at all (no limits). We mount the host's hierarchies again exactly as the host
has them (tmpfs on /sys/fs/cgroup, each v1 controller, name=systemd, cgroup2
on unified): the same superblocks, so containers land in the host's real
hierarchies (/sys/fs/cgroup/memory/lxc.payload.NAME on the host).

`--` does nothing but exec when cgroups are already visible, so it can never
cover the root namespace's own mounts. Kept free of heavy imports.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from corral.programs import check_argv
from lab.cgroups import (
    CgroupMount,
    alias_links,
    cgroup_mounts_from_proc_cgroup,
    cgroup_mounts_to_recreate,
    has_cgroup_mounts,
)

_MNT_DETACH = 0x2
_SYSFS_FLAGS = 0x2 | 0x4 | 0x8  # nosuid, nodev, noexec

_FLAG_BITS = {
    "ro": 0x1,  # MS_RDONLY
    "nosuid": 0x2,
    "nodev": 0x4,
    "noexec": 0x8,
    "noatime": 0x400,
    "nodiratime": 0x800,
}


class HostEnterError(Exception):
    pass


def host_argv(namespace: str, argv: Sequence[str | os.PathLike[str]]) -> list[str]:
    """`argv` as a process of the lab host `namespace`, in a fresh private mount
    namespace of its own (the way in when the host has no pinned one)."""
    return ["ip", "netns", "exec", namespace, sys.executable, "-m", "lab.hostenter", "--",
            *map(str, argv)]


def host_cgroup_mounts() -> list[CgroupMount]:
    """The host's cgroup layout: PID 1's mountinfo (our own mount namespace no
    longer shows it), else the usual layout derived from /proc/self/cgroup."""
    try:
        mounts = cgroup_mounts_to_recreate(Path("/proc/1/mountinfo").read_text())
    except OSError:
        mounts = []
    if not any(m.fstype in ("cgroup", "cgroup2") for m in mounts):
        mounts = cgroup_mounts_from_proc_cgroup(Path("/proc/self/cgroup").read_text())
    return mounts


def mount_cgroups() -> None:
    if has_cgroup_mounts(Path("/proc/self/mountinfo").read_text()):
        return  # already visible: not a fresh `ip netns exec` namespace
    mounts = host_cgroup_mounts()
    if not mounts:
        raise HostEnterError("found no cgroup hierarchies on this host to mount")
    for m in mounts:
        os.makedirs(m.target, exist_ok=True)
        flags = 0
        for name in m.flags:
            flags |= _FLAG_BITS[name]
        _mount(m.source, m.target, m.fstype, flags, m.data)
    for link, target in alias_links(mounts).items():
        if not os.path.lexists(link):
            os.symlink(target, link)


def init_host_namespace() -> None:
    """In a new mount namespace of a host: a sysfs of the host's network
    namespace on /sys (what `ip netns exec` does), then the cgroups."""
    # Detaching /sys in the machine's own mount namespace would be a disaster:
    # insist on a namespace of our own, not the one of whoever started us.
    if os.stat("/proc/self/ns/mnt").st_ino == os.stat(f"/proc/{os.getppid()}/ns/mnt").st_ino:
        raise HostEnterError("--init must run in a new mount namespace (e.g. under unshare --mount)")
    if _libc().umount2(b"/sys", _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise HostEnterError(f"umount -l /sys: {os.strerror(err)}")
    _mount("sysfs", "/sys", "sysfs", _SYSFS_FLAGS, "")
    mount_cgroups()
    # A /run of the host's own, on tmpfs as on a real host: LXC keeps its locks
    # there, and CRIU caches its kernel probe there only on tmpfs (20-40 ms
    # saved on every dump and restore).
    _mount("tmpfs", "/run", "tmpfs", _RUN_FLAGS, "mode=0755,size=64m")


def _mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    rc = _libc().mount(source.encode(), target.encode(), fstype.encode(), ctypes.c_ulong(flags),
                       data.encode() if data else None)
    if rc != 0:
        err = ctypes.get_errno()
        raise HostEnterError(f"mount -t {fstype} -o {data or 'defaults'} {source} {target}: {os.strerror(err)}")


_RUN_FLAGS = 0x2 | 0x4  # MS_NOSUID | MS_NODEV
_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _LIBC


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--init"]:
        return _init()
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print("usage: python -m lab.hostenter (--init | -- COMMAND [ARG...])", file=sys.stderr)
        return 2
    try:
        mount_cgroups()
    except (HostEnterError, OSError) as e:
        print(f"lab.hostenter: cannot set up cgroups: {e}", file=sys.stderr)
        return 1
    sys.stdout.flush()
    sys.stderr.flush()
    check_argv(args)
    try:
        os.execvp(args[0], args)
    except OSError as e:
        print(f"lab.hostenter: cannot run {args[0]}: {e}", file=sys.stderr)
        return 127
    return 127  # not reached


def _init() -> int:
    try:
        init_host_namespace()
    except (HostEnterError, OSError) as e:
        print(f"lab.hostenter: cannot set up the host's mount namespace: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
