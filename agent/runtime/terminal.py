"""A host command fed while it runs (an interactive exec's `lxc-attach`): on a pseudo-terminal
or on pipes.

`AttachedCommand.start` spawns it in a session of its own. With a terminal, the pty's slave
becomes its controlling terminal (`setsid --ctty`): lxc-attach then gives the container's
command a terminal of its own and passes window size changes on to it (SIGWINCH), and ^C,
^Z, ^D are the terminal's to handle. `events()` yields its output (bounded pieces, read no
faster than they are taken) and then how it ended; `write` waits while the command does not
read its input. `close()` kills it, with everything it started, unless it has ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import struct
import termios
from typing import AsyncIterator, Sequence

import structlog

from corral.exec_session import TerminalSize
from corral.proc import STDERR, STDOUT, Exited, Output, check_argv, descendants, kill_tree

log = structlog.get_logger("corral.agent.terminal")

DEFAULT_SIZE = TerminalSize(24, 80)
PIPE_SIZE = 1 << 20  # within /proc/sys/fs/pipe-max-size's default
READ_SIZE = 1 << 20


def _set_size(fd: int, size: TerminalSize) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", size.rows, size.cols, 0, 0))


class AttachedCommand:
    def __init__(self, process: asyncio.subprocess.Process, outputs: list[tuple[int, int]], stdin: int | None,
                 tty: int | None, timeout: float) -> None:  # fmt: skip
        self.process = process
        self._outputs = outputs  # (STDOUT or STDERR, our end)
        self._stdin = stdin  # our end of its standard input; None once closed
        self._tty = tty  # the pty's master (also in _outputs and _stdin), or None
        self._killed_at_deadline = False
        self._deadline = (
            asyncio.get_running_loop().call_later(timeout, self._on_deadline) if timeout > 0 else None
        )
        self._kill: asyncio.Task | None = None

    @classmethod
    async def start(cls, argv: Sequence[str], *, tty: bool, size: TerminalSize | None, timeout: float,
                    env: dict[str, str] | None = None) -> AttachedCommand:  # fmt: skip
        check_argv(argv)
        ours: list[int] = []
        theirs: list[int] = []
        try:
            if tty:
                master, slave = os.openpty()
                ours.append(master)
                theirs.append(slave)
                _set_size(slave, size or DEFAULT_SIZE)
                argv = ["setsid", "--ctty", *argv]  # setsid() then TIOCSCTTY on stdin, then exec
                process = await asyncio.create_subprocess_exec(
                    *argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd="/",
                )  # fmt: skip
                outputs, stdin = [(STDOUT, master)], master
            else:
                pipes = [os.pipe() for _ in range(3)]  # stdin, stdout, stderr
                ours += [pipes[0][1], pipes[1][0], pipes[2][0]]
                theirs += [pipes[0][0], pipes[1][1], pipes[2][1]]
                process = await asyncio.create_subprocess_exec(
                    *argv, stdin=pipes[0][0], stdout=pipes[1][1], stderr=pipes[2][1], env=env, cwd="/",
                    start_new_session=True,
                )  # fmt: skip
                outputs, stdin = [(STDOUT, pipes[1][0]), (STDERR, pipes[2][0])], pipes[0][1]
                for fd in (pipes[0][1], pipes[1][0]):  # fewer, larger pieces for bulk data (ct file)
                    with contextlib.suppress(OSError):
                        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except BaseException:
            for fd in ours:
                os.close(fd)
            raise
        finally:
            for fd in theirs:  # the child has its copies
                os.close(fd)
        for fd in ours:
            os.set_blocking(fd, False)
        return cls(process, outputs, stdin, master if tty else None, timeout)

    # -- input -------------------------------------------------------------------------

    async def write(self, data: bytes) -> None:
        """Feed `data` to its input; waits while it does not read. Input for a command that
        stopped reading (closed its input, or ended) is dropped, as a pipe would."""
        view = memoryview(data)
        while view and self._stdin is not None:
            try:
                view = view[os.write(self._stdin, view) :]
            except BlockingIOError:
                await _ready(self._stdin, writable=True)
            except OSError as exc:
                if exc.errno not in (errno.EPIPE, errno.EIO):
                    raise
                self._close_stdin_fd()

    def close_stdin(self) -> None:
        """End of input: a pipe is closed; a terminal gets its end-of-file character (^D)."""
        if self._stdin is None:
            return
        if self._tty is None:
            self._close_stdin_fd()
            return
        eof = termios.tcgetattr(self._tty)[6][termios.VEOF]
        with contextlib.suppress(OSError):
            os.write(self._tty, eof if isinstance(eof, bytes) else bytes([eof]))

    def _close_stdin_fd(self) -> None:
        if self._stdin is not None and self._stdin != self._tty:
            os.close(self._stdin)
        self._stdin = None

    def resize(self, size: TerminalSize) -> None:
        if self._tty is not None:
            _set_size(self._tty, size)  # the kernel sends SIGWINCH to lxc-attach, which passes it on

    async def signal(self, signum: int) -> None:
        """To the command in the container and what it started: lxc-attach's descendants, not
        lxc-attach itself (it would die of it and take the exit status with it)."""
        if self.process.returncode is None:
            await asyncio.to_thread(_signal_all, descendants(self.process.pid), signum)

    # -- output ------------------------------------------------------------------------

    async def events(self) -> AsyncIterator[Output | Exited]:
        """Its output as it comes (a pipe or the terminal is read again only once its last
        piece has been taken), then how it ended."""
        reading = {asyncio.ensure_future(_read(fd)): (which, fd) for which, fd in self._outputs}
        try:
            while reading:
                done, _ = await asyncio.wait(reading, return_when=asyncio.FIRST_COMPLETED)
                for read in sorted(done, key=lambda r: reading[r][0]):
                    which, fd = reading.pop(read)
                    if data := read.result():
                        yield Output(which, data)
                        reading[asyncio.ensure_future(_read(fd))] = (which, fd)
        finally:
            for read in reading:  # before close() frees the descriptors they wait on
                read.cancel()
        returncode = await self.process.wait()
        if self._kill is not None:
            await self._kill
        yield Exited(returncode, timed_out=self._killed_at_deadline)

    # -- the end -----------------------------------------------------------------------

    def _on_deadline(self) -> None:
        self._killed_at_deadline = True
        self.kill()

    def kill(self) -> None:
        if self._kill is None and self.process.returncode is None:
            self._kill = asyncio.get_running_loop().create_task(kill_tree(self.process.pid))

    async def close(self) -> None:
        """Kill it unless it ended, and free our ends of its pipes or terminal."""
        if self._deadline is not None:
            self._deadline.cancel()
        self.kill()
        if self._kill is not None:
            await asyncio.shield(self._kill)
        with contextlib.suppress(ProcessLookupError):
            await asyncio.wait_for(self.process.wait(), 10)
        self._close_stdin_fd()
        for _, fd in self._outputs:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._outputs = []


def _signal_all(pids: set[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


async def _ready(fd: int, *, writable: bool) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    (loop.add_writer if writable else loop.add_reader)(fd, wake)
    try:
        await ready
    finally:
        (loop.remove_writer if writable else loop.remove_reader)(fd)


async def _read(fd: int) -> bytes:
    """A piece of what `fd` has, waiting for it; b"" at its end (a pty's master reads EIO
    once the last holder of its slave has closed it)."""
    while True:
        try:
            return os.read(fd, READ_SIZE)
        except BlockingIOError:
            await _ready(fd, writable=False)
        except OSError as exc:
            if exc.errno == errno.EIO:
                return b""
            raise
