"""Each lab host's own mount namespace, made once and pinned to a file.

Why: `ip netns exec` gives every command a fresh, private mount namespace,
so whatever one host process mounts (a loop-mounted container image, say)
would be invisible to the host's other processes, to a restarted agent (which
could then mount the same image a second time) and to the lab's teardown. A
real host has one mount table; so does a lab host: at `lab up` the lab makes
one mount namespace per host (its /sys belonging to the host's network
namespace, the cgroup hierarchies mounted again by `hostenter --init`), pins
it by bind-mounting its nsfs file on base_dir/hostns/nI, and runs every host
process with `nsenter --net=/run/netns/NS --mount=PIN`.

Pins live in a directory that is bind-mounted on itself and made private, so
the pin mounts never propagate (into a host namespace, that would be a loop
the kernel refuses). A pin is not visible inside other mount namespaces (the
kernel does not copy mount-namespace files into new ones), so a host process
cannot enter another host's mount namespace by accident.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog

from corral.errors import RuntimeFailure
from lab.cgroups import parse_mountinfo
from lab.processes import daemon_env
from corral.proc import run

log = structlog.get_logger("lab.hostns")

_TIMEOUT = 20.0


def enter_argv(namespace: str, pin: Path, argv: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Run `argv` on the host: its network namespace and its pinned mount namespace.
    (The working directory becomes / of the host's mount namespace.)"""
    return ["nsenter", f"--net=/run/netns/{namespace}", f"--mount={pin}", "--", *map(str, argv)]


def is_pinned(pin: Path) -> bool:
    """Is a mount namespace bind-mounted on `pin` (seen from this mount namespace)?"""
    target = str(pin)
    return any(m.mount_point == target and m.fstype == "nsfs"
               for m in parse_mountinfo(Path("/proc/self/mountinfo").read_text()))


async def prepare_pin_dir(directory: Path) -> None:
    """Make `directory` a private mount of itself (once), so pins inside do not propagate."""
    directory.mkdir(parents=True, exist_ok=True)
    mountinfo = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    if any(m.mount_point == str(directory) for m in mountinfo):
        return
    await run(["mount", "--bind", str(directory), str(directory)], timeout=_TIMEOUT)
    await run(["mount", "--make-private", str(directory)], timeout=_TIMEOUT)


async def create(namespace: str, pin: Path) -> None:
    """Make the host's mount namespace (inside network namespace `namespace`) and pin it."""
    pin.touch(exist_ok=True)
    # unshare binds the new namespace on `pin` from a helper that stays in our
    # (root) mount namespace, so the pin is visible here; `hostenter --init`
    # then gives that namespace the host's /sys and the cgroup hierarchies.
    await run(
        ["nsenter", f"--net=/run/netns/{namespace}", "--",
         "unshare", f"--mount={pin}", "--propagation", "slave", "--",
         sys.executable, "-m", "lab.hostenter", "--init"],
        timeout=_TIMEOUT, env=daemon_env(), what=f"creating the mount namespace of {namespace}",
    )  # fmt: skip
    if not is_pinned(pin):
        raise RuntimeFailure(f"mount namespace of {namespace} was not pinned on {pin}")


async def mounts_inside(pin: Path, under: Path) -> list[Path]:
    """Mount points at or below `under` in the pinned namespace, deepest first."""
    result = await run(["nsenter", f"--mount={pin}", "--", "cat", "/proc/self/mountinfo"], timeout=_TIMEOUT)
    root = str(under).rstrip("/")
    points = {m.mount_point for m in parse_mountinfo(result.stdout.decode())
              if m.mount_point == root or m.mount_point.startswith(root + "/")}
    return [Path(p) for p in sorted(points, key=lambda p: p.count("/"), reverse=True)]


async def unmount_inside(pin: Path, under: Path, *, lazy_only: bool = False) -> None:
    """Unmount everything at or below `under` inside the pinned namespace
    (`lazy_only`: detach at once, as a crashed host would lose them)."""
    for _ in range(10):  # stacked mounts need one umount each
        points = await mounts_inside(pin, under)
        if not points:
            return
        for point in points:
            if not lazy_only:
                done = await run(["nsenter", f"--mount={pin}", "--", "umount", str(point)],
                                 timeout=_TIMEOUT, check=False)
                if done.returncode == 0:
                    continue
            lazy = await run(["nsenter", f"--mount={pin}", "--", "umount", "-l", str(point)],
                             timeout=_TIMEOUT, check=False)
            if lazy.returncode != 0:
                log.warning("could not unmount inside host", pin=str(pin), mount_point=str(point),
                            error=lazy.output)
    log.warning("mounts remain inside host", pin=str(pin), under=str(under))


def namespace_id(path: Path) -> tuple[int, int] | None:
    """(device, inode) identifying the namespace behind an nsfs path, None if unreadable."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino
