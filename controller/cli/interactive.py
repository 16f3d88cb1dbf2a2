"""Working inside a container from here: `corral ct enter`, `corral ct exec -i/-t` (through
`attach`) and `corral ct file push|pull`, all over the interactive exec stream.

With a terminal, this terminal is put in raw mode for the session (every key goes to the
container's terminal, ^C included) and restored afterwards, whatever happens; its size goes
along at the start and at every SIGWINCH. Without one, standard input streams as it is read
(any amount, the command's pace), and SIGINT, SIGTERM and SIGHUP sent to corral are passed to
the command. Files stream in 1 MiB pieces, so their size is not limited by memory."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
import sys
import termios
import threading
import tty as ttymode
from pathlib import Path
from typing import AsyncIterator

import click

from controller.cli.completion import complete_containers
from controller.cli.containers import ct
from controller.cli.context import run
from corral.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from corral.exec_session import (
    STDIN_CHUNK,
    ExecInputEvent,
    ExecStart,
    Resize,
    SendSignal,
    StdinClosed,
    StdinData,
    TerminalSize,
)
from corral.proc import EXEC_DEFAULT_TIMEOUT, STDERR, STDOUT, Exited, Output

# A login shell: bash where the container has it, else sh (busybox's ash in the small templates).
LOGIN_SHELL = ("/bin/sh", "-c", "if command -v bash >/dev/null 2>&1; then exec bash -l; else exec sh -l; fi")
PASSED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# `file push`: written beside the target, then renamed over it (a reader never sees half a file).
PUSH_SCRIPT = 'set -e; t="$1.corral-push.$$"; trap \'rm -f "$t"\' EXIT; cat > "$t"; chmod "$2" "$t"; mv -f "$t" "$1"; trap - EXIT'
PULL_SCRIPT = 'test -f "$1" || { test -e "$1" && echo "$1: not a regular file" >&2 || echo "$1: No such file or directory" >&2; exit 2; }; exec cat -- "$1"'


def _terminal_size(fd: int) -> TerminalSize:
    size = os.get_terminal_size(fd)
    return TerminalSize(max(1, size.lines), max(1, size.columns))


async def _read_input(fd: int, queue: asyncio.Queue, *, terminal: bool) -> None:
    """Put what `fd` gives on `queue` as it comes (at most STDIN_CHUNK a piece), then, at its
    end, StdinClosed (not for a terminal: ^D is a key like the others there). A regular file
    is read in a thread (it cannot be waited on); anything else when it is readable."""
    loop = asyncio.get_running_loop()
    pollable = not stat.S_ISREG(os.fstat(fd).st_mode)
    while True:
        if pollable:
            ready = loop.create_future()
            loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
            try:
                await ready
            finally:
                loop.remove_reader(fd)
            try:
                data = os.read(fd, STDIN_CHUNK)
            except BlockingIOError:
                continue
            except OSError:  # a terminal that went away (EIO)
                data = b""
        else:
            data = await asyncio.to_thread(os.read, fd, STDIN_CHUNK)
        if not data:
            if not terminal:
                await queue.put(StdinClosed())
            return
        await queue.put(StdinData(data))  # the queue is small: a command that does not read holds us up


async def _drain(queue: asyncio.Queue) -> AsyncIterator[ExecInputEvent]:
    while True:
        event = await queue.get()
        yield event
        if isinstance(event, StdinClosed):
            return


@contextlib.contextmanager
def _raw(fd: int):
    saved = termios.tcgetattr(fd)
    ttymode.setraw(fd, termios.TCSANOW)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSAFLUSH, saved)


@contextlib.contextmanager
def _signals(loop: asyncio.AbstractEventLoop, handlers: dict[int, object]):
    """Install signal handlers (main thread only: the warm helper runs commands elsewhere)."""
    installed = []
    if threading.current_thread() is threading.main_thread():
        for signum, handler in handlers.items():
            loop.add_signal_handler(signum, handler)
            installed.append(signum)
    try:
        yield
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)


async def attach(fleet, start: ExecStart, *, send_stdin: bool) -> Exited:
    """Run `start` in its container with this process's standard input, output and terminal;
    returns how it ended."""
    from controller.cli.containers import _write_as_it_comes

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue(maxsize=4)
    stdin_fd = sys.stdin.fileno()
    terminal = start.tty and os.isatty(stdin_fd)

    def resized() -> None:
        with contextlib.suppress(OSError, asyncio.QueueFull):
            queue.put_nowait(Resize(_terminal_size(stdin_fd)))

    def passed(signum: int):
        return lambda: queue.put_nowait(SendSignal(signum))

    handlers: dict[int, object] = {s: passed(s) for s in PASSED_SIGNALS if not terminal}
    if terminal:
        handlers[signal.SIGWINCH] = resized
    reader = asyncio.create_task(_read_input(stdin_fd, queue, terminal=terminal)) if send_stdin else None
    try:
        with contextlib.ExitStack() as stack:
            if terminal and send_stdin:
                stack.enter_context(_raw(stdin_fd))
            stack.enter_context(_signals(loop, handlers))
            events = fleet.exec_interactive(start, _drain(queue))
            async with contextlib.aclosing(events):
                exited = await _write_as_it_comes(events)
    finally:
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
    if exited is None:
        raise Unavailable("the exec stream ended without the command's exit status")
    return exited


def interactive_start(name: str, command, env: dict[str, str], timeout: int, tty: bool) -> ExecStart:
    """The start of `corral ct exec -i/-t` or `enter`; -t wants a terminal here."""
    size = None
    if tty:
        if not os.isatty(sys.stdin.fileno()):
            raise InvalidArgument("-t: standard input is not a terminal (leave -t out to pass input through a pipe)")
        size = _terminal_size(sys.stdin.fileno())
        env = {"TERM": os.environ.get("TERM") or "xterm", **env}
    return ExecStart(name, tuple(command), env, timeout, tty, size)


def exit_code_of(exited: Exited, start: ExecStart) -> int:
    if exited.timed_out:
        raise DeadlineExceeded(
            f"`{start.argv[0]}` in {start.name} did not finish within {start.timeout or EXEC_DEFAULT_TIMEOUT} s: "
            "it was killed, with what it started"
        )
    return exited.returncode


@ct.command("enter", examples=["corral ct enter web1", "corral ct enter web1 -e LANG=C.UTF-8"])
@click.argument("name", shell_complete=complete_containers)
@click.option("--env", "-e", multiple=True, help="KEY=VALUE for the shell's environment (repeatable)")
@click.pass_context
def ct_enter(ctx, name, env) -> None:
    """Open a login shell in a running container, on a terminal (as `vzctl enter` did).

    Every key goes to the container (^C, ^Z and ^D included); leave the shell to come back.
    Exits with the shell's exit code."""
    from controller.cli.containers import parse_env

    obj = ctx.obj

    @run
    async def go():
        start = interactive_start(name, LOGIN_SHELL, parse_env(env), 0, True)
        async with obj.client() as fleet:
            return exit_code_of(await attach(fleet, start, send_stdin=True), start)

    ctx.exit(go())


# -- files ----------------------------------------------------------------------------


@ct.group("file")
def ct_file() -> None:
    """Copy files into and out of a running container (streamed: any size)."""


def _mode(value: str) -> str:
    if not value or len(value) > 4 or any(c not in "01234567" for c in value):
        raise click.BadParameter(f"{value!r}: an octal mode such as 644 or 0755")
    return value


@ct_file.command("push", examples=[
    "corral ct file push web1 ./app.conf /etc/app.conf",
    "corral ct file push web1 big.tar /srv/ --mode 600   # DST ending in / keeps the name",
    "tar c site | corral ct file push web1 - /srv/site.tar",
])  # fmt: skip
@click.argument("name", shell_complete=complete_containers)
@click.argument("src", type=click.Path(dir_okay=False, allow_dash=True))
@click.argument("dst")
@click.option("--mode", default="644", callback=lambda c, p, v: _mode(v), help="the file's mode (octal)")
@click.pass_obj
def ct_file_push(obj, name, src, dst, mode) -> None:
    """Copy the local file SRC (`-`: standard input) to DST in the container (an absolute path;
    ending in `/`: a directory, the file keeps its name). DST is replaced whole, only once all
    of it has arrived."""

    @run
    async def go():
        target = _container_path(dst, Path(src).name if src != "-" else "")
        argv = ("/bin/sh", "-c", PUSH_SCRIPT, "sh", target, mode)
        queue: asyncio.Queue = asyncio.Queue(maxsize=4)
        fd = sys.stdin.fileno() if src == "-" else os.open(src, os.O_RDONLY)
        try:
            async with obj.client() as fleet:
                reader = asyncio.create_task(_read_input(fd, queue, terminal=False))
                try:
                    exited, _, err = await _collect(fleet.exec_interactive(ExecStart(name, argv), _drain(queue)))
                finally:
                    reader.cancel()
                    with contextlib.suppress(BaseException):
                        await reader
        finally:
            if src != "-":
                os.close(fd)
        if exited.returncode != 0:
            raise FailedPrecondition(f"cannot write {name}:{target}: {_said(err)}")

    go()


@ct_file.command("pull", examples=[
    "corral ct file pull web1 /etc/app.conf ./app.conf",
    "corral ct file pull web1 /var/log/syslog -   # to standard output",
])  # fmt: skip
@click.argument("name", shell_complete=complete_containers)
@click.argument("src")
@click.argument("dst", type=click.Path(allow_dash=True))
@click.pass_obj
def ct_file_pull(obj, name, src, dst) -> None:
    """Copy the file SRC of the container (an absolute path) to DST here (a file, a directory
    to keep its name in, or `-` for standard output). DST is written whole or not at all."""

    @run
    async def go():
        source = _container_path(src, "")
        if dst == "-":
            out_fd, final, partial = sys.stdout.fileno(), None, None
        else:
            final = Path(dst) / Path(source).name if Path(dst).is_dir() else Path(dst)
            partial = final.with_name(f".{final.name}.corral-pull.{os.getpid()}")
            out_fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        argv = ("/bin/sh", "-c", PULL_SCRIPT, "sh", source)
        try:
            async with obj.client() as fleet:
                exited, _, err = await _collect(fleet.exec_interactive(ExecStart(name, argv), _nothing()), out_fd)
            if exited.returncode != 0:
                error = NotFound if b"No such file" in err else FailedPrecondition
                raise error(f"cannot read {name}:{source}: {_said(err)}")
            if final is not None:
                await asyncio.to_thread(os.fsync, out_fd)  # a big file: seconds, off the loop
                os.rename(partial, final)
                partial = None
        finally:
            if final is not None:
                os.close(out_fd)
            if partial is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(partial)

    go()


def _container_path(path: str, keep_name: str) -> str:
    if not path.startswith("/"):
        raise InvalidArgument(f"{path!r}: a path in the container must be absolute")
    if "\0" in path:
        raise InvalidArgument("a path cannot contain a NUL byte")
    if path.endswith("/"):
        if not keep_name:
            raise InvalidArgument(f"{path!r} names a directory: give the file's name")
        return path + keep_name
    return path


async def _nothing() -> AsyncIterator[ExecInputEvent]:
    yield StdinClosed()


async def _collect(events: AsyncIterator[Output | Exited], out_fd: int | None = None) -> tuple[Exited, int, bytes]:
    """Run an exec to its end: stdout written to `out_fd` (in a thread, as it comes), stderr
    kept (its first 64 KiB). Returns how it ended, the bytes written, the stderr kept."""
    written, err = 0, bytearray()
    async with contextlib.aclosing(events):
        async for event in events:
            if isinstance(event, Exited):
                return event, written, bytes(err)
            if event.fd == STDOUT and out_fd is not None:
                await asyncio.to_thread(_write_all, out_fd, event.data)
                written += len(event.data)
            elif event.fd == STDERR and len(err) < 65536:
                err += event.data
    raise Unavailable("the exec stream ended without the command's exit status")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _said(err: bytes) -> str:
    return err.decode(errors="replace").strip().splitlines()[-1] if err.strip() else "the command failed"

