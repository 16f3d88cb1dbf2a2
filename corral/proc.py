"""Running host commands from asyncio: argument lists, deadlines, no shell."""

from __future__ import annotations

import asyncio
import os
import shlex
from dataclasses import dataclass
from typing import Sequence

from corral.errors import DeadlineExceeded, RuntimeFailure
from corral.programs import check_argv


@dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def output(self) -> str:
        return (self.stderr or self.stdout).decode(errors="replace").strip()


async def run(
    argv: Sequence[str],
    *,
    timeout: float,
    input: bytes | None = None,
    check: bool = True,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    what: str | None = None,
) -> Completed:
    """Run a command to completion; kill it (and its group) when the deadline passes.
    A failure names the command and ends with its stderr (or stdout)."""
    check_argv(argv)
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        async with asyncio.timeout(timeout):
            stdout, stderr = await proc.communicate(input)
    except TimeoutError:
        _kill_group(proc.pid)
        await proc.wait()
        raise DeadlineExceeded(f"{_named(argv, what)} did not finish within {timeout:g} s") from None
    except asyncio.CancelledError:
        _kill_group(proc.pid)
        raise
    done = Completed(tuple(argv), proc.returncode or 0, stdout, stderr)
    if check and done.returncode != 0:
        raise RuntimeFailure(f"{_named(argv, what)} failed (exit {done.returncode}): {done.output[-2000:]}")
    return done


def _named(argv: Sequence[str], what: str | None) -> str:
    """The command as it was run (shortened), after what it was for."""
    command = shlex.join(map(str, argv))
    command = command if len(command) <= 240 else command[:237] + "..."
    return f"{what}: `{command}`" if what else f"`{command}`"


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, 9)
    except ProcessLookupError:
        pass
