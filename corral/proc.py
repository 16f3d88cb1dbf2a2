"""Running host commands from asyncio: argument lists, deadlines, no shell."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
from dataclasses import dataclass
from typing import AsyncIterator, Mapping, Sequence

from corral.errors import DeadlineExceeded, InvalidArgument, RuntimeFailure
from corral.programs import check_argv

# What `stream` reads from a pipe at a time, and so the most a piece of output holds.
CHUNK_SIZE = 64 * 1024
# `exec` in a container: the timeout when none is asked for and the most that may be asked;
# a caller's deadline is the timeout plus a margin for the kill and the last output.
EXEC_DEFAULT_TIMEOUT = 300
EXEC_MAX_TIMEOUT = 24 * 3600
# After a kill, how long output still held in the pipes is read before giving up on it
# (a process that escaped the kill may keep them open).
DRAIN_AFTER_KILL = 5.0


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
    _refuse_nul(argv, env)
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


@dataclass(frozen=True)
class Output:
    """A piece of a streamed command's output, as it wrote it: fd 1 (stdout) or 2 (stderr)."""

    fd: int
    data: bytes


@dataclass(frozen=True)
class Exited:
    """How a streamed command ended: always the last thing `stream` yields."""

    returncode: int  # negative: killed by that signal
    timed_out: bool = False


STDOUT, STDERR = 1, 2


async def stream(
    argv: Sequence[str],
    *,
    timeout: float,
    input: bytes | None = None,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> AsyncIterator[Output | Exited]:
    """Run a command and yield its output as it comes (pieces of at most `chunk_size`), then
    how it ended (`Exited`).

    Memory stays bounded whatever the command writes: a pipe is read again only once its last
    piece has been taken, so a consumer that does not keep up holds the command up (its pipe
    fills) instead of growing a buffer here. At the deadline the command is killed with every
    process it started (`kill_tree`), and so it is when the consumer goes away (the generator
    is closed or its task cancelled); a command that has exited on its own is left alone."""
    check_argv(argv)
    _refuse_nul(argv, env)
    loop = asyncio.get_running_loop()
    # Pipes of our own rather than asyncio's: its Process.wait() also waits for them to close,
    # which a process that escaped a kill (or a paused reader) would hold up forever.
    pipes: list[tuple[int, asyncio.StreamReader, asyncio.BaseTransport]] = []
    ends: list[int] = []
    try:
        for fd in (STDOUT, STDERR):
            reader, transport, write_end = await _read_pipe(loop, chunk_size)
            pipes.append((fd, reader, transport))
            ends.append(write_end)
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if input else asyncio.subprocess.DEVNULL,
            stdout=ends[0],
            stderr=ends[1],
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    except BaseException:
        for _, _, transport in pipes:
            transport.close()
        raise
    finally:
        for write_end in ends:  # the child has its copies
            os.close(write_end)

    killed = loop.create_future()  # done once the deadline's kill is
    killer: list[asyncio.Task] = []

    def on_deadline() -> None:
        async def kill() -> None:
            await kill_tree(proc.pid, reaped=proc.returncode is not None)
            killed.set_result(None)

        killer.append(loop.create_task(kill()))

    deadline = loop.call_later(timeout, on_deadline)
    feeder = loop.create_task(_feed(proc.stdin, input)) if input else None
    reading = {asyncio.ensure_future(reader.read(chunk_size)): (fd, reader) for fd, reader, _ in pipes}
    give_up: asyncio.Future | None = None
    finished = False
    try:
        while reading:
            if killed.done() and give_up is None:
                give_up = asyncio.ensure_future(asyncio.sleep(DRAIN_AFTER_KILL))
            done, _ = await asyncio.wait([*reading, give_up or killed], return_when=asyncio.FIRST_COMPLETED)
            if give_up is not None and give_up.done():
                break
            for read in sorted(done & reading.keys(), key=lambda r: reading[r][0]):
                fd, reader = reading.pop(read)
                if data := read.result():
                    yield Output(fd, data)
                    reading[asyncio.ensure_future(reader.read(chunk_size))] = (fd, reader)
        await proc.wait()  # the deadline still runs: it kills a command that holds on without output
        deadline.cancel()
        if killer:
            await killer[0]
        finished = True
        yield Exited(proc.returncode, timed_out=bool(killer))
    finally:
        deadline.cancel()
        for task in [*reading, give_up, feeder]:
            if task is not None:
                task.cancel()
        for _, _, transport in pipes:
            transport.close()
        if not finished:  # the consumer went away (or we did): nothing of the command may outlive it
            await kill_tree(proc.pid, reaped=proc.returncode is not None)
            await proc.wait()
            await asyncio.gather(*killer, return_exceptions=True)  # a deadline's kill under way


async def _read_pipe(
    loop: asyncio.AbstractEventLoop, limit: int
) -> tuple[asyncio.StreamReader, asyncio.BaseTransport, int]:
    """A pipe whose read end is a StreamReader (pausing the pipe beyond twice `limit` bytes
    buffered); returns it, its transport and the write end's fd."""
    read_end, write_end = os.pipe()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    try:
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader, loop=loop), open(read_end, "rb", buffering=0)
        )
    except BaseException:
        os.close(write_end)
        raise
    return reader, transport, write_end


async def _feed(pipe: asyncio.StreamWriter, data: bytes) -> None:
    """Give the command its input, then end of file; a command that does not read it is fine."""
    try:
        pipe.write(data)
        await pipe.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        pipe.close()


async def kill_tree(pid: int, *, reaped: bool = False) -> None:
    """SIGKILL a process started in a session of its own, its process group and every process
    descended from it, also those that left the group (setsid, a shell's job control).
    `lxc-attach` runs the command inside the container as its child, in its group: killing only
    lxc-attach would leave the command running in the container. Once the process itself has
    been reaped (`reaped`) its pid may be reused: only its group is killed (a group's id is not
    reused while a member lives)."""
    await asyncio.to_thread(_kill_group if reaped else _kill_tree, pid)


def _kill_tree(root: int) -> None:
    # Stop first, the group and then each descendant found, until no new one appears: a
    # stopped process cannot fork, so none escapes by forking while we look; then kill them all.
    _signal_group(root, signal.SIGSTOP)
    stopped: set[int] = set()
    for _ in range(50):
        new = (descendants(root) | {root}) - stopped
        if not new:
            break
        for pid in new:
            _signal(os.kill, pid, signal.SIGSTOP)
        stopped |= new
    _signal_group(root, signal.SIGKILL)
    for pid in stopped:
        _signal(os.kill, pid, signal.SIGKILL)


def _signal_group(pgid: int, sig: int) -> None:
    _signal(os.killpg, pgid, sig)


def _signal(kill, pid: int, sig: int) -> None:
    with contextlib.suppress(OSError):  # gone already
        kill(pid, sig)


def descendants(root: int) -> set[int]:
    """The processes descended from `root`, from /proc (the host's pid namespace sees those
    inside containers too, with their parents)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        ppid = int(stat[stat.rindex(b")") + 2 :].split(b" ", 2)[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def validate_command(argv: Sequence[str], env: Mapping[str, str]) -> None:
    """A command given by a user to run (exec): a program to run, no NUL byte anywhere (execve
    cannot carry one), and environment names that are names (not empty, no '=')."""
    if not argv or not argv[0]:
        raise InvalidArgument("no command given to run")
    _refuse_nul(argv, env)
    for key in env:
        if not key or "=" in key:
            raise InvalidArgument(f"environment variable name {key!r} is empty or contains '='")


def _refuse_nul(argv: Sequence[str], env: Mapping[str, str] | None) -> None:
    for i, arg in enumerate(argv):
        text = os.fspath(arg)
        if ("\0" if isinstance(text, str) else b"\0") in text:
            raise InvalidArgument(f"argument {i} of the command contains a NUL byte")
    for key, value in (env or {}).items():
        if "\0" in key or "\0" in value:
            raise InvalidArgument(f"environment variable {key!r} contains a NUL byte")


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
