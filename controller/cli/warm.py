"""The warm `corral` helper: one per user and installation, started by the launcher.

It imports the CLI once, keeps one asyncio event loop (this process's main
thread) with the gRPC channels to the controller open, and runs each
invocation the launcher hands it (controller.cli.launcher) in a thread of its
own, with that invocation's argv, environment, working directory, umask and
stdin/stdout/stderr. Commands run exactly as in-process: `controller.cli.main.main()`,
with the process-wide things a command reads made per-invocation:

- sys.stdin/stdout/stderr (and their `.buffer`), sys.argv and os.environ are
  proxies that dispatch on a context variable to the invocation's own
  (controller/cli/invocation.py);
- the working directory and umask are per thread (unshare(CLONE_FS));
- `run` (controller/cli/context.py) runs the command's coroutine on the shared
  loop, and `Ctx.client()` lends it the warm channel for its controller;
- SystemExit ends the invocation with its code; Ctrl-C in the launcher raises
  KeyboardInterrupt in the command (cancelling its coroutine first), as a
  signal would in-process.

Invocations whose environment differs in what a process reads once (HOME,
proxies, gRPC and Python settings: launcher.PROCESS_ENV) go to helpers of their
own (the socket's name carries a hash of those values). Invocations it does not
run (the launcher runs them in-process instead): those of another build (the
helper then exits and a new one is started), the commands that work on local
files or processes (`lab`, `pki`), and `ct exec -i/-t`, `ct enter`, `ct file` (a terminal's
modes and signals, local files and stdin are the invoking process's own). It exits after
CORRAL_HELPER_IDLE seconds (default 600) without work.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import ctypes
import fcntl
import os
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from controller.cli import invocation, launcher
from controller.cli.invocation import Invocation, _current

IDLE_SECONDS = 600.0
# Commands run by the launcher itself: they work on local files and processes (relative
# paths, subprocesses inheriting the environment), where the helper would differ.
LOCAL_COMMANDS = frozenset({"lab", "pki"})
STDIN_HINTS = frozenset({"exec", "enter", "file"})  # argv words worth a closer look for a command that reads stdin
CLONE_FS = 0x00000200

_SO_PEERCRED = struct.Struct("3i")


# --- the helper -----------------------------------------------------------------------


class Helper:
    def __init__(self, sock_path: str, build: str, idle: float) -> None:
        self.sock_path = sock_path
        self.build = build
        self.idle = idle
        self.loop = asyncio.new_event_loop()
        self.loop_thread = threading.current_thread()  # serve() runs the loop in this thread
        self.listener: socket.socket | None = None
        self.active: set[Invocation] = set()
        self.connections = 0  # accepted and not yet answered to the end
        self.last_active = time.monotonic()
        self.stopping = False
        self.channels: dict[tuple, Any] = {}
        self.process_env = launcher.process_env(os.environ)
        self.verbose = bool(os.environ.get("CORRAL_HELPER_VERBOSE"))
        self._libc = ctypes.CDLL(None, use_errno=True)

    # -- the process-wide set-up ------------------------------------------------------

    def install(self) -> None:
        from controller.cli import context

        invocation.install()
        context.set_runtime(self.run_coroutine, lambda: os.environ, self.client)

    def listen(self) -> None:
        try:
            os.unlink(self.sock_path)  # a dead helper's; the lock says none other is alive
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            listener.bind(self.sock_path)
        finally:
            os.umask(old)
        listener.listen(64)
        listener.setblocking(False)
        self.listener = listener
        self.inode = os.stat(self.sock_path).st_ino
        self.loop.add_reader(listener.fileno(), self._accept)

    def stop_listening(self) -> None:
        """No new invocations from now on; the socket path is free for a successor."""
        if self.listener is None:
            return
        self.loop.remove_reader(self.listener.fileno())
        try:
            if os.stat(self.sock_path).st_ino == self.inode:
                os.unlink(self.sock_path)
        except OSError:
            pass
        self.listener.close()
        self.listener = None
        os.close(self.lock_fd)  # a successor may take over now
        self.stopping = True
        self.loop.call_soon(self._exit_when_idle)

    def _exit_when_idle(self) -> None:
        if self.connections:  # every reply is sent before the process ends
            self.loop.call_later(0.1, self._exit_when_idle)
        else:
            self.loop.stop()

    def serve(self) -> None:
        self.loop.call_later(min(self.idle, 30.0), self._check_idle)
        self.loop.run_forever()

    def _check_idle(self) -> None:
        if self.stopping:
            return
        if not self.connections and time.monotonic() - self.last_active > self.idle:
            _log(f"idle for {self.idle:g} s: exiting")
            self.stop_listening()
            return
        self.loop.call_later(min(self.idle, 30.0), self._check_idle)

    def _accept(self) -> None:
        while self.listener is not None:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            conn.setblocking(True)
            self.connections += 1
            threading.Thread(target=self._serve_connection, args=(conn,), daemon=True).start()

    def _connection_ended(self) -> None:
        self.connections -= 1
        self.last_active = time.monotonic()

    # -- one invocation -----------------------------------------------------------------

    def _serve_connection(self, conn: socket.socket) -> None:
        try:
            self._serve(conn)
        finally:
            self.loop.call_soon_threadsafe(self._connection_ended)

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                inv = self._receive(conn)
            except (OSError, ValueError, KeyError) as exc:
                _log(f"refused a connection: {exc}")
                return
            if inv is None:
                return
            verdict = self._verdict(inv)
            if verdict != launcher.RUNNING:
                inv.close_streams()
                if verdict == launcher.STALE:
                    _log(f"stale: a launcher of build {inv.build} asked; making way for its helper")
                    self._on_loop(self.stop_listening)  # before the reply: the successor binds the path
                conn.sendall(verdict)
                return
            self._run(inv)

    def _receive(self, conn: socket.socket) -> Invocation | None:
        pid, uid, gid = _SO_PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _SO_PEERCRED.size))
        if uid != os.getuid():
            raise ValueError(f"peer pid {pid} runs as uid {uid}, not {os.getuid()}")
        data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 16, 3)
        if not data or len(fds) != 3:
            for fd in fds:
                os.close(fd)
            if not data:
                return None
            raise ValueError(f"expected 3 file descriptors, got {len(fds)}")
        try:
            while len(data) < launcher.HEADER_SIZE:
                data += _recv_some(conn)
            size = int.from_bytes(data[: launcher.HEADER_SIZE], "big")
            body = data[launcher.HEADER_SIZE :]
            while len(body) < size:
                body += _recv_some(conn)
            return Invocation(conn, decode_request(body), fds)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise

    def _verdict(self, inv: Invocation) -> bytes:
        if inv.build != self.build:
            return launcher.STALE
        if self.stopping:
            return launcher.LOCAL
        if launcher.process_env(inv.env) != self.process_env:  # (its socket's name says they agree)
            return launcher.LOCAL
        if (LOCAL_COMMANDS | STDIN_HINTS) & set(inv.argv) and _runs_locally(inv.argv[1:]):
            return launcher.LOCAL
        return launcher.RUNNING

    def _run(self, inv: Invocation) -> None:
        inv.thread = threading.current_thread()
        self.loop.call_soon_threadsafe(self._started, inv)
        began = time.monotonic()
        code = 1
        try:
            inv.conn.sendall(launcher.RUNNING)
            self._own_fs(inv)
            inv.open_streams(self.loop_thread)
            token = _current.set(inv)
            try:
                code = _invoke()
            finally:
                _current.reset(token)
        except BaseException as exc:  # the helper's own failure: reported to the command's stderr
            try:
                inv.stderr.write(f"corral: helper error: {exc}\n")
            except Exception:
                pass
        finally:
            self._finish(inv)
            inv.close_streams()
            if self.verbose:
                ms = (time.monotonic() - began) * 1000
                _log(f"ran for pid {inv.pid}: {' '.join(inv.argv)} -> exit {code} ({ms:.1f} ms)")
            if not inv.client_gone:
                try:
                    inv.conn.sendall(launcher.DONE + code.to_bytes(launcher.EXIT_SIZE, "big", signed=True))
                except OSError:
                    pass
            self.loop.call_soon_threadsafe(self._ended, inv)

    def _own_fs(self, inv: Invocation) -> None:
        """This thread's own working directory and umask (CLONE_FS), as the command's process had."""
        if self._libc.unshare(CLONE_FS) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_FS) failed")
        os.chdir(inv.cwd)
        os.umask(inv.umask)

    def _started(self, inv: Invocation) -> None:
        self.active.add(inv)
        self.last_active = time.monotonic()
        self.loop.add_reader(inv.conn.fileno(), self._from_launcher, inv)

    def _finish(self, inv: Invocation) -> None:
        self._on_loop(lambda: self.loop.remove_reader(inv.conn.fileno()))

    def _on_loop(self, fn) -> None:
        """Run `fn` on the loop's thread and wait for it."""
        done = threading.Event()

        def call():
            try:
                fn()
            finally:
                done.set()

        self.loop.call_soon_threadsafe(call)
        done.wait()

    def _ended(self, inv: Invocation) -> None:
        self.active.discard(inv)
        self.last_active = time.monotonic()

    def _from_launcher(self, inv: Invocation) -> None:
        try:
            data = inv.conn.recv(64, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the launcher is gone (killed): stop the command as Ctrl-C would
            inv.client_gone = True
            self.loop.remove_reader(inv.conn.fileno())
        if launcher.INTERRUPT in data or not data:
            self._interrupt(inv)

    def _interrupt(self, inv: Invocation) -> None:
        """Ctrl-C: in the coroutine, cancel it (the runner then raises KeyboardInterrupt, as
        asyncio.run does); elsewhere, raise KeyboardInterrupt in the command's thread."""
        inv.interrupted = True
        if inv.task is not None and not inv.task.done():
            inv.task.cancel()
        elif not inv.in_runner and inv.thread is not None:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(inv.thread.ident), ctypes.py_object(KeyboardInterrupt))

    # -- hooks of controller.cli.context ---------------------------------------------------

    def run_coroutine(self, coro) -> Any:
        """`run`'s runner: the command's coroutine on the helper's loop; this thread waits."""
        inv = _current.get()
        if inv is None:
            return asyncio.run(coro)
        _absolute_config(inv)
        result: concurrent.futures.Future = concurrent.futures.Future()

        async def guarded():
            try:
                return await coro
            except (SystemExit, KeyboardInterrupt) as exc:  # never out of the loop: back to the command
                return _Raise(exc)

        def start():
            if inv.interrupted:
                coro.close()
                result.set_exception(KeyboardInterrupt())
                return
            inv.task = self.loop.create_task(guarded())
            inv.task.add_done_callback(finished)

        def finished(task: asyncio.Task):
            inv.task = None
            if task.cancelled():
                result.set_exception(KeyboardInterrupt() if inv.interrupted else asyncio.CancelledError())
            elif task.exception() is not None:
                result.set_exception(task.exception())
            else:
                result.set_result(task.result())

        inv.in_runner = True
        try:
            self.loop.call_soon_threadsafe(start)  # in this thread's context: the invocation's
            value = result.result()
        finally:
            inv.in_runner = False
        if isinstance(value, _Raise):
            raise value.exc
        return value

    def client(self, settings, timeout: float):
        """`Ctx.client()`: a client on the warm channel for this controller and these TLS files."""
        from controller.client import ControllerClient

        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        tls = settings.tls
        try:
            files = tuple((str(p), os.stat(p).st_mtime_ns, os.stat(p).st_size) for p in (tls.ca, tls.cert, tls.key))
        except OSError:
            files = None
        if running is not self.loop or files is None:
            return ControllerClient(settings.controller, tls, timeout)
        import grpc

        from corral.api.tls import secure_channel

        from corral.v1 import controller_pb2_grpc

        key = (settings.controller, files)
        channel, stub = self.channels.get(key, (None, None))
        if channel is not None and channel.get_state() in (grpc.ChannelConnectivity.TRANSIENT_FAILURE,
                                                           grpc.ChannelConnectivity.SHUTDOWN):  # fmt: skip
            # A fresh process would dial again at once, not wait out the channel's back-off.
            self.loop.create_task(channel.close())
            channel = None
        if channel is None:
            channel = secure_channel(settings.controller, tls, server_name="controller")
            stub = controller_pb2_grpc.ControllerServiceStub(channel)
            self.channels[key] = (channel, stub)
        return _BorrowedClient(settings.controller, timeout, channel, stub)


def decode_request(body: bytes) -> dict:
    """What launcher.encode_request wrote."""
    fields = body.split(b"\0")
    build, cwd, umask, term, pid, argc = fields[:6]
    argc = int(argc)
    argv = fields[6 : 6 + argc]
    env = {}
    for item in fields[6 + argc :]:
        key, _, value = item.partition(b"=")
        env[os.fsdecode(key)] = os.fsdecode(value)
    cols_lines = term.decode().split(",") if term else None
    return {
        "build": build.decode(), "cwd": os.fsdecode(cwd), "umask": int(umask),
        "term": [int(n) for n in cols_lines] if cols_lines else None, "pid": int(pid),
        "argv": [os.fsdecode(a) for a in argv], "env": env,
    }  # fmt: skip


def _recv_some(conn: socket.socket) -> bytes:
    chunk = conn.recv(1 << 16)
    if not chunk:
        raise ValueError("request cut short")
    return chunk


class _Raise:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _borrowed_client_class():
    from controller.client import ControllerClient

    class BorrowedClient(ControllerClient):
        """A ControllerClient on the helper's channel: closing it leaves the channel open."""

        def __init__(self, address: str, timeout: float, channel, stub) -> None:
            self.address = address
            self.timeout = timeout
            self.channel = channel
            self.stub = stub  # made once per channel

        async def __aexit__(self, *exc) -> None:
            pass

    return BorrowedClient


_BorrowedClient: Any = None


def _absolute_config(inv: Invocation) -> None:
    """--config as the command's own process would read it: relative to its working directory
    (the coroutine runs on the loop's thread, whose directory is the helper's)."""
    import click

    from controller.cli.context import Ctx

    ctx = click.get_current_context(silent=True)
    obj = ctx.find_object(Ctx) if ctx is not None else None
    path = getattr(obj, "config_path", None)
    if path is not None and not Path(path).is_absolute():
        obj.config_path = Path(inv.cwd, path)


_log_stream = sys.stderr  # the helper's log file (stderr before the proxies)


_log_lock = threading.Lock()


def _log(message: str) -> None:
    with _log_lock:
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}", file=_log_stream, flush=True)


def _runs_locally(args: list[str]) -> bool:
    """A `lab` or `pki` command, or one told to read its standard input (`ct exec -i`): that read
    happens in the command's coroutine, which here runs on the shared loop and would hold up
    every other invocation until the input ends. Parsed as click parses it."""
    from controller.cli.main import cli

    path, params = _resolve(cli, args)
    if path[:2] in (["ct", "enter"], ["ct", "file"]):
        return True  # a terminal's modes and signals, local files: this process's own
    return bool(path and path[0] in LOCAL_COMMANDS) or bool(params.get("interactive") or params.get("tty"))


def _resolve(group, args: list[str]) -> tuple[list[str], dict]:
    """The command path an argv names and the leaf command's parameters (no callbacks run)."""
    import click

    path: list[str] = []
    parent = None
    command, name = group, "corral"
    try:
        while True:
            ctx = command.make_context(name, list(args), parent=parent, resilient_parsing=True)
            if not isinstance(command, click.Group):
                return path, ctx.params
            rest = (ctx._protected_args if hasattr(ctx, "_protected_args") else ctx.protected_args) + ctx.args
            if not rest:
                return path, ctx.params
            name, command, args = command.resolve_command(ctx, rest)
            if command is None:
                return path, {}
            path.append(name)
            parent = ctx
    except Exception:
        return path, {}


def _invoke() -> int:
    """`corral` as its own process would run it; the exit code as that process would have it."""
    from controller.cli.main import main

    try:
        main()
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except KeyboardInterrupt:
        # An interrupt outside any command's handler: Python's default, as the process would.
        traceback.print_exc()
        code = 130
    except BaseException:
        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    return code


def _exit_code(code: Any) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _take_lock(sock_path: str) -> int | None:
    fd = os.open(sock_path[: -len(".sock")] + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for people and tests
    return fd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="corral-helper", description="the warm corral helper (see this module)")
    parser.add_argument("--socket", required=True)
    args = parser.parse_args(argv)
    build = launcher.build_id()  # before the imports: code changed meanwhile makes it stale at once
    directory = os.path.dirname(args.socket)
    launcher.ensure_private_dir(directory)
    lock_fd = _take_lock(args.socket)
    if lock_fd is None:
        _log(f"another helper holds {args.socket}: exiting")
        return 0
    global _BorrowedClient
    import controller.cli.main  # noqa: F401  (the whole CLI, once)
    import grpc  # noqa: F401

    _BorrowedClient = _borrowed_client_class()
    idle = float(os.environ.get("CORRAL_HELPER_IDLE", IDLE_SECONDS))
    helper = Helper(args.socket, build, idle)
    helper.lock_fd = lock_fd
    asyncio.set_event_loop(helper.loop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches it only through a launcher
    helper.install()
    helper.listen()
    _log(f"corral helper {os.getpid()} serving {args.socket} (build {build})")
    helper.serve()
    _log(f"corral helper {os.getpid()} exiting")
    os._exit(0)  # skip grpc's slow shutdown; nothing is left to flush


if __name__ == "__main__":
    sys.exit(main())
