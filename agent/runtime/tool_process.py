"""The CRIU tools (lxc-checkpoint, criu) as processes: launched in sessions of their own,
waited for with deadlines, killed with everything below them.

Why so careful: a restore that fails late leaves a half-restored container's init behind
(a child of LXC's monitor, in its own session) waiting forever, and a failed lazy restore
can leave `criu restore` deaf to SIGTERM; and a post-copy source's page server must outlive
an agent restart (its own session), so a restarted agent finds it by its arguments.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path
from typing import IO, Sequence

from corral.errors import DeadlineExceeded
from corral.programs import check_argv

KILL_GRACE = 5.0  # after SIGKILL, how long to wait for the process to be reaped


def descendants(pid: int) -> list[int]:
    """`pid`'s children, grandchildren...: read before a kill, while they still hang off it."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                children = [int(c) for c in Path(f"/proc/{parent}/task/{tid}/children").read_text().split()]
            except (OSError, ValueError):
                continue
            found += children
            todo += children
    return found


def _checkpoint_tools(wanted) -> list[int]:
    """PIDs of lxc-checkpoint or criu processes one of whose arguments `wanted(arg)` accepts."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry.name}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and os.path.basename(argv[0]) in (b"lxc-checkpoint", b"criu") and any(map(wanted, argv[1:])):
            found.append(int(entry.name))
    return found


def tools_using(images: Path) -> list[int]:
    """PIDs of lxc-checkpoint or criu processes given `images` as an argument (their leaders:
    a CRIU whose lxc-checkpoint is listed is killed with it)."""
    target = os.fsencode(str(images))
    return _checkpoint_tools(lambda arg: arg == target)


def tools_under(directory: Path) -> list[int]:
    """PIDs of lxc-checkpoint or criu processes given `directory`, or a path below it, as an
    argument: what must not be removed from under them."""
    target = os.fsencode(str(directory))
    return _checkpoint_tools(lambda arg: arg == target or arg.startswith(target + b"/"))


def kill_tree(pid: int) -> None:
    """SIGKILL a tool, its process group and everything below it. The group alone is not
    enough: a restore that fails late leaves the half-restored container's init (a child of
    LXC's monitor, in its own session) behind, waiting forever; killing it ends its PID namespace."""
    below = descendants(pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    for child in below:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(child, signal.SIGKILL)


class ToolProcess:
    """One launched tool: its own process group, output to a file, waits with deadlines."""

    def __init__(self, proc: asyncio.subprocess.Process, what: str, output: Path) -> None:
        self.proc = proc
        self.what = what
        self.output = output

    @classmethod
    async def launch(cls, argv: Sequence[str], *, what: str, output: Path, env: dict[str, str]) -> ToolProcess:
        check_argv(argv)
        out: IO[bytes] = open(output, "ab")
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out, env=env, cwd="/",
                start_new_session=True,  # its own group: killed as one on a deadline, and not with the agent
            )  # fmt: skip
        finally:
            out.close()
        return cls(proc, what, output)

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    async def wait(self, timeout: float) -> int:
        try:
            async with asyncio.timeout(timeout):
                return await self.proc.wait()
        except TimeoutError:
            await self.kill()
            raise DeadlineExceeded(f"{self.what} did not finish within {timeout:g} s (killed)") from None
        except asyncio.CancelledError:
            await self.kill()
            raise

    async def kill(self) -> None:
        if self.proc.returncode is None:
            kill_tree(self.proc.pid)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(KILL_GRACE):
                await self.proc.wait()


def restored_monitor(pgid: int) -> tuple[int, int]:
    """(monitor pid, init pid) after `lxc-checkpoint -r -d` (launched as group leader `pgid`)
    exited: LXC's monitor for the restored container is the one process of that group left,
    and the container's init is its child. (Found by group, not by the "[lxc monitor] ..."
    title: the monitor renames itself only after reporting success, so that can come late.)"""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:  # fields after "(comm)": state, ppid, pgrp, ...
                continue
            pid = int(entry.name)
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except (OSError, ValueError, IndexError):
            continue
        if children:
            return pid, int(children[0])
    return 0, 0
