"""One `corral` invocation inside the warm helper, and the process-wide names that show it.

A command reads sys.stdin/stdout/stderr (and their `.buffer`), os.environ and
sys.argv as if it had the process to itself. In the helper these names are
proxies that dispatch, on a context variable, to the invocation of the moment
(the command's thread, its coroutine on the shared loop, the threads it
starts); outside any invocation they are the helper's own.

Output written from the shared loop's thread goes through a pump: a thread of
the invocation's own that writes it, in order, so a client that does not read
holds up only its command.
"""

from __future__ import annotations

import contextvars
import io
import os
import queue
import threading
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio
    import socket


class Invocation:
    def __init__(self, conn: socket.socket, request: dict, fds: list[int]) -> None:
        self.conn = conn
        self.build = request["build"]
        self.pid = request.get("pid", 0)
        self.argv = ["corral", *request["argv"]]
        self.cwd = request["cwd"]
        self.umask = int(request["umask"])
        self.env = dict(request["env"])
        self.fds = fds
        self.interrupted = False
        self.client_gone = False
        self.task: asyncio.Task | None = None
        self.in_runner = False
        self.thread: threading.Thread | None = None
        self.stdin = self.stdout = self.stderr = None
        config = self.env.get("CORRAL_CONFIG")
        if config and not os.path.isabs(config):
            self.env["CORRAL_CONFIG"] = os.path.join(self.cwd, config)  # same file, the loop has another cwd
        term = request.get("term")
        if term:  # what the command would have read from its terminal (rich, shutil)
            self.env.setdefault("COLUMNS", str(term[0]))
            self.env.setdefault("LINES", str(term[1]))

    def open_streams(self, loop_thread: threading.Thread) -> None:
        unbuffered = bool(self.env.get("PYTHONUNBUFFERED"))
        self.pump = _Pump(loop_thread)
        self.stdin = _text_stream(self.fds[0], "r", "strict", unbuffered=False)
        self.stdout = _text_stream(self.fds[1], "w", "strict", unbuffered, pump=self.pump)
        self.stderr = _text_stream(self.fds[2], "w", "backslashreplace", unbuffered, line=True, pump=self.pump)

    def close_streams(self) -> None:
        for stream in (self.stdout, self.stderr):
            if stream is not None:
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
        if getattr(self, "pump", None) is not None:
            self.pump.stop()
        for stream in (self.stdin, self.stdout, self.stderr):
            if stream is not None:
                try:
                    stream.close()
                except (OSError, ValueError):
                    pass
        if self.stdin is None:  # never wrapped (an invocation refused early)
            for fd in self.fds:
                try:
                    os.close(fd)
                except OSError:
                    pass


def _text_stream(fd: int, mode: str, errors: str, unbuffered: bool, line: bool = False,
                 pump: "_Pump | None" = None) -> io.TextIOWrapper:  # fmt: skip
    """As Python makes sys.stdin/stdout/stderr for a fresh process (UTF-8); output goes
    through the invocation's pump (see _Pump)."""
    isatty = os.isatty(fd)
    if mode == "w":
        raw = _PumpedWriter(fd, pump, isatty)
        binary = raw if unbuffered else io.BufferedWriter(raw)
    else:
        binary = open(fd, "rb", closefd=True)
    return io.TextIOWrapper(binary, encoding="utf-8", errors=errors, line_buffering=line or (mode == "w" and isatty),
                            write_through=mode == "w" and unbuffered)  # fmt: skip


class _Pump:
    """Writes a command makes from the shared loop's thread (its coroutine) are handed to a
    thread of the invocation's own, in order: a client that does not read (a pager, a terminal
    stopped with ^S) then blocks that command only, never the loop the others run on. Writes from
    the command's own thread wait for what is queued, then write directly (order is kept)."""

    def __init__(self, loop_thread: threading.Thread) -> None:
        self.loop_thread = loop_thread
        self.queue: "queue.Queue[tuple[int, bytes] | None]" = queue.Queue()
        self.thread: threading.Thread | None = None
        self.error: OSError | None = None

    def on_loop(self) -> bool:
        return threading.current_thread() is self.loop_thread

    def put(self, fd: int, data: bytes) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="corral-output", daemon=True)
            self.thread.start()
        self.queue.put((fd, data))

    def drain(self) -> None:
        if self.thread is not None:
            self.queue.join()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join()
            self.thread = None

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            try:
                if item is None:
                    return
                if self.error is None:
                    try:
                        _write_all(*item)
                    except OSError as exc:
                        self.error = exc
            finally:
                self.queue.task_done()


class _PumpedWriter(io.RawIOBase):
    def __init__(self, fd: int, pump: _Pump, isatty: bool) -> None:
        self.fd = fd
        self.pump = pump
        self._isatty = isatty

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.fd

    def isatty(self) -> bool:
        return self._isatty

    def write(self, b) -> int:
        data = bytes(b)
        if self.pump.on_loop():
            self.pump.put(self.fd, data)
        else:
            self.pump.drain()
            _write_all(self.fd, data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            super().close()
            os.close(self.fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


_current: contextvars.ContextVar["Invocation | None"] = contextvars.ContextVar("corral_invocation", default=None)


class _StreamProxy(io.TextIOBase):
    """sys.stdout and friends: the current invocation's stream, else the helper's own."""

    def __init__(self, name: str, fallback: Any) -> None:
        self._name = name
        self._fallback = fallback
        self._buffer = _BufferProxy(self)

    def _target(self):
        inv = _current.get()
        stream = getattr(inv, self._name, None) if inv is not None else None
        return stream if stream is not None else self._fallback

    @property
    def buffer(self):
        return self._buffer

    @property
    def encoding(self):
        return self._target().encoding

    @property
    def errors(self):
        return self._target().errors

    @property
    def closed(self):
        return self._target().closed

    def write(self, s):
        return self._target().write(s)

    def writelines(self, lines):
        return self._target().writelines(lines)

    def flush(self):
        return self._target().flush()

    def read(self, size=-1):
        return self._target().read(size)

    def readline(self, size=-1):
        return self._target().readline(size)

    def readlines(self, hint=-1):
        return self._target().readlines(hint)

    def __iter__(self):
        return iter(self._target())

    def isatty(self):
        return self._target().isatty()

    def fileno(self):
        return self._target().fileno()

    def readable(self):
        return self._target().readable()

    def writable(self):
        return self._target().writable()

    def seekable(self):
        return False

    def close(self):  # a command closing sys.stdout closes its own, never the helper's
        inv = _current.get()
        if inv is not None:
            self._target().close()

    def __getattr__(self, attr):
        return getattr(self._target(), attr)


class _BufferProxy(io.RawIOBase):
    """sys.stdout.buffer: dispatches at every call, so a wrapper made around it once (click)
    still writes to the invocation of the moment."""

    def __init__(self, text: _StreamProxy) -> None:
        self._text = text

    def _target(self):
        return self._text._target().buffer

    def write(self, b):
        return self._target().write(b)

    def read(self, size=-1):
        return self._target().read(size)

    def read1(self, size=-1):
        return self._target().read1(size)

    def readline(self, size=-1):
        return self._target().readline(size)

    def readinto(self, b):
        return self._target().readinto(b)

    def flush(self):
        return self._target().flush()

    def isatty(self):
        return self._target().isatty()

    def fileno(self):
        return self._target().fileno()

    def readable(self):
        return self._target().readable()

    def writable(self):
        return self._target().writable()

    @property
    def closed(self):
        return self._target().closed

    def close(self):
        pass

    def __getattr__(self, attr):
        return getattr(self._target(), attr)


class _EnvironProxy(MutableMapping):
    """os.environ: the invocation's environment (changes stay in it), else the helper's."""

    def __init__(self, real: MutableMapping) -> None:
        self._real = real

    def _target(self) -> MutableMapping:
        inv = _current.get()
        return inv.env if inv is not None else self._real

    def __getitem__(self, key):
        return self._target()[key]

    def __setitem__(self, key, value):
        self._target()[key] = value

    def __delitem__(self, key):
        del self._target()[key]

    def __iter__(self):
        return iter(list(self._target()))

    def __len__(self):
        return len(self._target())

    def __contains__(self, key):
        return key in self._target()

    def copy(self):
        return dict(self._target())

    def __repr__(self):
        return f"environ({dict(self._target())!r})"


class _ArgvProxy(list):
    def _target(self) -> list:
        inv = _current.get()
        return inv.argv if inv is not None else self._real

    def __init__(self, real: list) -> None:
        super().__init__(real)
        self._real = real

    def __getitem__(self, i):
        return self._target()[i]

    def __len__(self):
        return len(self._target())

    def __iter__(self):
        return iter(self._target())

    def __repr__(self):
        return repr(self._target())


def inherit_invocation_in_threads() -> None:
    """A thread a command starts (rich's refresh thread, a worker pool's) writes to that
    command's streams: it runs in a copy of the starting thread's context, as asyncio.to_thread
    does (a new thread otherwise starts with an empty one, i.e. the helper's own streams)."""
    start = threading.Thread.start
    if getattr(start, "_corral_inherits", False):
        return

    def start_in_context(self, *args, **kwargs):
        if _current.get() is not None:
            context, run = contextvars.copy_context(), self.run
            self.run = lambda: context.run(run)
        return start(self, *args, **kwargs)

    start_in_context._corral_inherits = True
    threading.Thread.start = start_in_context


def install() -> None:
    """Replace the process-wide names by their proxies (once, in the helper)."""
    import sys

    sys.stdout = _StreamProxy("stdout", sys.stdout)
    sys.stderr = _StreamProxy("stderr", sys.stderr)
    sys.stdin = _StreamProxy("stdin", sys.stdin)
    sys.__stdout__, sys.__stderr__, sys.__stdin__ = sys.stdout, sys.stderr, sys.stdin  # shutil's terminal size
    os.environ = _EnvironProxy(os.environ)
    sys.argv = _ArgvProxy(list(sys.argv))
    inherit_invocation_in_threads()
