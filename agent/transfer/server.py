"""The agent's own SSH endpoint: receives rsync pushes for migration operations.

There is no system sshd and no login: a client authenticates as `op-<op_id>`
with the one key the controller registered for that operation (public key only),
and may exec exactly two things, both only writing into that operation's staging
directory: our client's `rsync --server` receiving (see rsync_command.py), and
`corral-receive-files NAME`, a flat directory of files received in-process
(file_stream.py; checkpoint images, sent while the container is frozen). Shells, other
commands, subsystems (sftp), PTYs, port/agent/X11 forwarding are refused; a
refused session ends with exit status 1 and one line on stderr.

rsync runs as a subprocess; the client's stream (the bulk) is joined to its stdin
with `process.redirect()`, its small output is pumped back here so that a last
line on stderr can follow it before the exit status. Measured as fast as
OpenSSH's sshd (DESIGN.md; bench/rsync_channel.py), aes128-gcm offered first.

Grant lifetime is a hard bound: a session is cut (rsync killed, exit status 1)
when its grant expires, is revoked, or its key is replaced, even mid-transfer.
A credential must not outlive its operation, and revoke is followed by removing
the staging directory, which a still-running receiver would be writing into.
The controller sizes the lifetime to the operation; re-authorizing with the
same key extends it without disturbing running sessions.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import select
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import structlog

from agent.transfer import file_stream
from agent.transfer.grants import GrantRegistry, ReceiveGrant
from agent.transfer.keys import load_or_create_host_key, public_key_line
from agent.transfer.rsync_command import CommandRefused, parse_rsync_server_command, resolve_destination
from corral import proc as host_proc
from corral.errors import FailedPrecondition, RuntimeFailure
from corral.programs import check_argv

log = structlog.get_logger("corral.agent.transfer")

# AEAD ciphers only, aes128-gcm first: fastest here with AES-NI (DESIGN.md).
ENCRYPTION_ALGS = ["aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com", "aes256-gcm@openssh.com"]
# Larger SSH packets and windows than asyncssh's defaults (32 KiB, 2 MiB): fewer Python-level
# packets per byte. Measured on one 512 MiB image: ~280 -> ~360-500 MB/s, asyncssh to asyncssh.
MAX_PACKET = 256 * 1024
WINDOW = 16 * 1024 * 1024
# Who may hold the port, and how long, before proving a grant: an unauthenticated peer
# must not be able to take all of the agent's file descriptors (sshd's MaxStartups idea).
# Our own client logs in within ~0.1 s and shares one connection per operation.
LOGIN_TIMEOUT = 8.0
MAX_CONNECTIONS = 64  # all connections at once
MAX_PREAUTH = 24  # of which not yet authenticated
MAX_PREAUTH_PER_PEER = 6  # ... from one address: a single flooder leaves room for the others
REFUSAL_LOG_INTERVAL = 10.0  # refused logins and connections: one warning per this many seconds
KEEPALIVE_INTERVAL = 15.0
KEEPALIVE_COUNT_MAX = 4
SESSION_QUEUE_TIMEOUT = 30.0  # a grant's sessions run one at a time; a new one waits this long
CLIENT_GONE_GRACE = 5.0  # after the channel closes, rsync gets this long to exit on its own
KILL_WAIT = 2.0
MAX_GRANT_POLL = 5.0
OUTPUT_CHUNK = 256 * 1024
MIN_SAFE_RSYNC = (3, 4, 0)  # receiver-side symlink/path-traversal fixes (CVE-2024-12087, -12088)
# The receiver's environment: nothing from the client (env requests are ignored).
_RSYNC_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


@functools.lru_cache(maxsize=1024)
def _key_data(public_key: str) -> bytes:
    return asyncssh.import_public_key(public_key).public_data


def _grant_matches(grant: ReceiveGrant | None, key: bytes | None) -> bool:
    return grant is not None and key is not None and _key_data(grant.public_key) == key


class _ProcessGroup:
    """A receiver's process group, killable from any thread without hitting a reused
    PID: the group is signalled only while its leader, watched by a pidfd, is alive."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._pidfd = os.pidfd_open(pid)
        self._closed = False
        self._lock = threading.Lock()

    def alive(self) -> bool:
        with self._lock:
            if self._closed:
                return False
            return not select.select([self._pidfd], [], [], 0)[0]

    def kill(self, wait: float = 0.0) -> None:
        with self._lock:
            if self._closed or select.select([self._pidfd], [], [], 0)[0]:
                return
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            if wait > 0:
                # Blocks the caller briefly: revoke must not remove staging under a live writer.
                select.select([self._pidfd], [], [], wait)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._pidfd)


@dataclass(eq=False)
class _ConnectionState:
    conn: asyncssh.SSHServerConnection
    peer: str
    host: str = "?"  # the peer's address without its port
    user: str | None = None
    key: bytes | None = None  # public_data of the key that authenticated
    sessions: int = 0  # receivers running on this connection
    authenticated: bool = False


class _QuietWarnings:
    """One warning per `interval` for a kind of event a stranger can cause at will (refused
    logins, refused connections), with how many were left out since the last one."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def warning(self, event: str, **fields) -> None:
        now = time.monotonic()
        if now - self._last.get(event, -self.interval) < self.interval:
            self._skipped[event] = self._skipped.get(event, 0) + 1
            return
        self._last[event] = now
        skipped = self._skipped.pop(event, 0)
        log.warning(event, **fields, **({"similar_since_last": skipped} if skipped else {}))


class _TaskHandle:
    """An in-process receiver, stoppable from any thread like a _ProcessGroup. It only writes
    relative to a directory descriptor, so once its staging is removed it can write nowhere."""

    def __init__(self, task: asyncio.Task, loop: asyncio.AbstractEventLoop) -> None:
        self._task, self._loop = task, loop

    def kill(self, wait: float = 0.0) -> None:
        if not self._task.done() and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._task.cancel)

    def close(self) -> None:
        pass


@dataclass(eq=False)
class _Session:
    state: _ConnectionState
    user: str
    key: bytes
    group: _ProcessGroup | _TaskHandle
    cut_reason: str | None = None


class _ConnectionHandler(asyncssh.SSHServer):
    """Per-connection policy: public-key auth against the grant registry, no forwarding."""

    def __init__(self, server: TransferServer) -> None:
        self._server = server
        self._state: _ConnectionState | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        peer = conn.get_extra_info("peername")
        self._state = _ConnectionState(conn, f"{peer[0]}:{peer[1]}" if peer else "?", peer[0] if peer else "?")
        if not self._server._register_connection(self._state):
            # Before the key exchange: a refused peer costs no crypto. After this returns
            # asyncssh sends its banner, so the abort comes just after.
            asyncio.get_running_loop().call_soon(conn.abort)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._state is not None:
            self._server._unregister_connection(self._state)

    def auth_completed(self) -> None:
        assert self._state is not None
        with self._server._lock:
            self._state.authenticated = True

    def begin_auth(self, username: str) -> bool:
        return True  # always authenticate; unknown users simply have no acceptable key

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def host_based_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        assert self._state is not None
        grant = self._server.grants.lookup(username)
        if grant is None:
            self._refused(username, "no live grant for this user (unknown, revoked or expired)")
            return False
        if not _grant_matches(grant, key.public_data):
            self._refused(username, "key is not the one registered for this operation")
            return False
        self._state.user, self._state.key = username, key.public_data
        return True

    def _refused(self, username: str, reason: str) -> None:
        assert self._state is not None
        self._server._quiet.warning("transfer login refused", user=username[:80], peer=self._state.peer, reason=reason)

    # Forwarding of any kind: refused (the defaults refuse too; these log why).
    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> bool:
        return self._no_forwarding("direct TCP/IP (ssh -L/-W)")

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        return self._no_forwarding("remote TCP/IP listener (ssh -R)")

    def unix_connection_requested(self, dest_path: str) -> bool:
        return self._no_forwarding("direct UNIX socket")

    def unix_server_requested(self, listen_path: str) -> bool:
        return self._no_forwarding("remote UNIX socket listener")

    def tun_requested(self, unit: int | None) -> bool:
        return self._no_forwarding("tun device")

    def tap_requested(self, unit: int | None) -> bool:
        return self._no_forwarding("tap device")

    def _no_forwarding(self, what: str) -> bool:
        assert self._state is not None
        log.warning("transfer forwarding refused", user=self._state.user, peer=self._state.peer, what=what)
        return False


class TransferServer:
    """`port` 0 picks a free port. `advertise_host` is the address sources should dial
    when `listen_host` is a wildcard (0.0.0.0, ::)."""

    def __init__(
        self, listen_host: str, port: int, host_key_path: Path, grants: GrantRegistry,
        *, advertise_host: str | None = None,
    ) -> None:  # fmt: skip
        self.listen_host = listen_host
        self.advertise_host = advertise_host
        self.port = port
        self.host_key_path = Path(host_key_path)
        self.grants = grants
        self._key: asyncssh.SSHKey | None = None
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self._rsync: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Guards _connections and _sessions: grant changes arrive from any thread.
        self._lock = threading.Lock()
        self._connections: set[_ConnectionState] = set()
        self._sessions: set[_Session] = set()
        self._handlers: set[asyncio.Task] = set()  # session handlers, awaited by close()
        self._user_locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._quiet = _QuietWarnings(REFUSAL_LOG_INTERVAL)
        grants.add_listener(self._on_grant_change)

    async def start(self) -> None:
        if self._acceptor is not None:
            return
        self._rsync = shutil.which("rsync", path=_RSYNC_ENV["PATH"])
        if self._rsync is None:
            raise FailedPrecondition("rsync is not installed on this host: the transfer channel cannot receive")
        await self._check_rsync_version()
        self._key = await asyncio.to_thread(load_or_create_host_key, self.host_key_path)
        self._loop = asyncio.get_running_loop()
        try:
            self._acceptor = await asyncssh.create_server(
                lambda: _ConnectionHandler(self), self.listen_host, self.port,
                server_host_keys=[self._key], server_version="CorralTransfer",
                process_factory=self._handle_process, encoding=None,
                public_key_auth=True, password_auth=False, kbdint_auth=False, host_based_auth=False,
                gss_host=None, allow_pty=False, agent_forwarding=False, x11_forwarding=False,
                sftp_factory=None, allow_scp=False, encryption_algs=ENCRYPTION_ALGS,
                login_timeout=LOGIN_TIMEOUT, keepalive_interval=KEEPALIVE_INTERVAL,
                keepalive_count_max=KEEPALIVE_COUNT_MAX, max_pktsize=MAX_PACKET, window=WINDOW,
            )  # fmt: skip
        except OSError as e:
            raise RuntimeFailure(f"transfer endpoint cannot listen on {self.listen_host}:{self.port}: {e}") from None
        self.port = self._acceptor.get_port()
        log.info("transfer endpoint listening", listen=f"{self.listen_host}:{self.port}", host_key=self.host_key)

    async def close(self) -> None:
        """Stop listening, cut every session and close every connection."""
        if self._acceptor is None:
            return
        self._acceptor.close()
        with self._lock:
            states = list(self._connections)
            sessions = list(self._sessions)
        for session in sessions:
            session.cut_reason = "the transfer endpoint is shutting down"
            session.group.kill()
        for state in states:
            state.conn.close()
        try:
            async with asyncio.timeout(KILL_WAIT + CLIENT_GONE_GRACE):
                await asyncio.gather(*self._handlers, return_exceptions=True)
                await asyncio.gather(*(s.conn.wait_closed() for s in states), return_exceptions=True)
                await self._acceptor.wait_closed()
        except TimeoutError:
            log.warning("transfer endpoint: sessions did not end in time")
            for task in self._handlers:
                task.cancel()
        self._acceptor = None
        log.info("transfer endpoint closed", listen=f"{self.listen_host}:{self.port}")

    @property
    def host_key(self) -> str:
        """Public host key, one OpenSSH line; the source pins it."""
        if self._key is None:
            raise FailedPrecondition("transfer endpoint not started")
        return public_key_line(self._key)

    @property
    def address(self) -> str:
        """'host:port' for sources to dial (the controller hands it out with the grant)."""
        host = self.advertise_host or self.listen_host
        if host in ("", "0.0.0.0", "::"):
            raise FailedPrecondition(
                f"the transfer endpoint listens on the wildcard {host or '*'!r}: set `advertise` in the "
                "agent's configuration to the address other hosts reach it on"
            )
        host = f"[{host}]" if ":" in host else host
        return f"{host}:{self.port}"

    # -- connection and grant bookkeeping ------------------------------------------

    def _register_connection(self, state: _ConnectionState) -> bool:
        """Take `state` in, or False if the limits say no (the caller closes it)."""
        with self._lock:
            waiting = [s for s in self._connections if not s.authenticated]
            if len(self._connections) >= MAX_CONNECTIONS:
                why = f"{MAX_CONNECTIONS} connections already open"
            elif len(waiting) >= MAX_PREAUTH:
                why = f"{MAX_PREAUTH} connections already waiting to log in"
            elif sum(s.host == state.host for s in waiting) >= MAX_PREAUTH_PER_PEER:
                why = f"{MAX_PREAUTH_PER_PEER} connections from {state.host} already waiting to log in"
            else:
                self._connections.add(state)
                return True
        self._quiet.warning("transfer connection refused", peer=state.peer, reason=why)
        return False

    @property
    def connection_count(self) -> int:
        with self._lock:
            return len(self._connections)

    def _unregister_connection(self, state: _ConnectionState) -> None:
        with self._lock:
            self._connections.discard(state)

    def _on_grant_change(self, user: str) -> None:
        """A grant was revoked or its key replaced (any thread): cut what it no longer allows."""
        grant = self.grants.lookup(user)
        with self._lock:
            stale = [s for s in self._connections if s.user == user and not _grant_matches(grant, s.key)]
            sessions = [s for s in self._sessions if s.user == user and not _grant_matches(grant, s.key)]
        for session in sessions:
            session.cut_reason = "the operation's grant was revoked or its key replaced"
            session.group.kill(wait=KILL_WAIT)
        for state in stale:
            if not state.sessions and self._loop is not None and not self._loop.is_closed():
                # Connections with a session close when it has reported its end (_handle_process).
                self._loop.call_soon_threadsafe(state.conn.close)
        if stale:
            log.info("transfer connections cut", user=user, connections=len(stale))

    def _state_of(self, process: asyncssh.SSHServerProcess) -> _ConnectionState | None:
        conn = process.get_extra_info("connection")
        with self._lock:
            return next((s for s in self._connections if s.conn is conn), None)

    # -- sessions ------------------------------------------------------------------

    async def _handle_process(self, process: asyncssh.SSHServerProcess) -> None:
        task = asyncio.current_task()
        self._handlers.add(task)
        try:
            await self._serve(process)
        finally:
            self._handlers.discard(task)

    async def _serve(self, process: asyncssh.SSHServerProcess) -> None:
        state = self._state_of(process)
        user = state.user if state else None
        grant = self.grants.lookup(user) if user else None
        slog = log.bind(op=grant.op_id if grant else None, user=user, peer=state.peer if state else "?")
        try:
            if state is None or not _grant_matches(grant, state.key):
                raise CommandRefused("the operation's grant was revoked, has expired or has another key now")
            if process.subsystem is not None:
                raise CommandRefused(f"subsystem {process.subsystem!r} is not available on this endpoint")
            files_into = file_stream.parse_receive_command(process.command)
            command = parse_rsync_server_command(process.command) if files_into is None else None
            # Sessions into different top-level directories (rootfs, checkpoint) cannot touch
            # each other's trees: they may run at once. Into the same one, one at a time.
            top = files_into or command.destination.strip("/").split("/", 1)[0]
            async with self._one_at_a_time(f"{user}/{top}"):
                grant = self.grants.lookup(user)
                if not _grant_matches(grant, state.key):
                    raise CommandRefused("the operation's grant was revoked, has expired or has another key now")
                if process.is_closing():
                    raise CommandRefused("the client went away while waiting for its turn")
                if files_into is not None:
                    status = await self._run_file_receiver(process, state, grant, files_into, slog)
                else:
                    destination = resolve_destination(grant.staging, command.destination)
                    argv = command.argv(self._rsync, destination)
                    status = await self._run_receiver(process, state, grant, argv, slog)
            process.exit(status)
        except CommandRefused as e:
            slog.warning("transfer session refused", reason=e.message, command=(process.command or "")[:300],
                         subsystem=process.subsystem)  # fmt: skip
            _refuse(process, e.message)
        except Exception as e:
            slog.exception("transfer session failed")
            _refuse(process, f"internal error: {type(e).__name__}")
        try:
            async with asyncio.timeout(CLIENT_GONE_GRACE):
                await process.wait_closed()
        except TimeoutError:
            process.close()
        if state is not None and not _grant_matches(self.grants.lookup(state.user) if state.user else None, state.key):
            state.conn.close()  # the grant is gone: nothing more may happen on this connection

    async def _run_receiver(
        self, process: asyncssh.SSHServerProcess, state: _ConnectionState, grant: ReceiveGrant,
        argv: list[str], slog,
    ) -> int:  # fmt: skip
        check_argv(argv)
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            cwd=grant.staging, env=_RSYNC_ENV, start_new_session=True,
        )  # fmt: skip
        session = _Session(state, state.user, state.key, _ProcessGroup(proc.pid))
        with self._lock:
            self._sessions.add(session)
            state.sessions += 1
        slog.info("transfer session started", pid=proc.pid, destination=argv[-1])
        # The bulk (client -> rsync) goes through asyncssh's redirect; the small return
        # path is pumped here, so we know when rsync's last byte has reached the channel
        # and can still add a line to stderr before the exit status.
        output = asyncio.ensure_future(asyncio.gather(
            _pump(proc.stdout, process.stdout), _pump(proc.stderr, process.stderr)
        ))  # fmt: skip
        watcher = asyncio.ensure_future(self._until_grant_ends(state.user, state.key))
        closed = asyncio.ensure_future(process.wait_closed())
        try:
            await process.redirect(stdin=proc.stdin)
            done, _ = await asyncio.wait({output, watcher, closed}, return_when=asyncio.FIRST_COMPLETED)
            if output not in done and watcher in done:
                session.cut_reason = watcher.result()
                session.group.kill()
            elif output not in done:
                # The client went away: give rsync EOF, and make sure it exits.
                proc.stdin.close()
                try:
                    async with asyncio.timeout(CLIENT_GONE_GRACE):
                        await asyncio.shield(output)
                except TimeoutError:
                    session.cut_reason = "the client disconnected"
                    session.group.kill()
            await output
            status = await proc.wait()
        finally:
            for task in (watcher, closed):
                task.cancel()
            if proc.returncode is None:
                session.group.kill()
                await asyncio.shield(proc.wait())
            output.cancel()
            with self._lock:
                self._sessions.discard(session)
                state.sessions -= 1
            session.group.close()
        if session.cut_reason:
            slog.warning("transfer session cut", reason=session.cut_reason, pid=proc.pid)
            _write_stderr(process, f"corral: transfer cut: {session.cut_reason}\n")
            return 1
        slog.info("transfer session ended", exit_status=status)
        return status if status >= 0 else 1

    async def _run_file_receiver(
        self, process: asyncssh.SSHServerProcess, state: _ConnectionState, grant: ReceiveGrant, name: str, slog,
    ) -> int:  # fmt: skip
        """Receive a flat directory of files in-process (file_stream.py) into staging/NAME."""
        assert self._loop is not None
        directory = Path(grant.staging) / name
        receiving = asyncio.ensure_future(file_stream.read_stream(process.stdin.readexactly, directory,
                                                                  landing=self.grants.landing(grant.op_id)))  # fmt: skip
        session = _Session(state, state.user, state.key, _TaskHandle(receiving, self._loop))
        with self._lock:
            self._sessions.add(session)
            state.sessions += 1
        watcher = asyncio.ensure_future(self._until_grant_ends(state.user, state.key))
        try:
            done, _ = await asyncio.wait({receiving, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if receiving not in done:
                session.cut_reason = watcher.result()
                receiving.cancel()
            try:
                received = await receiving
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():
                    raise
                session.cut_reason = session.cut_reason or "the operation's grant was revoked"
            except asyncio.IncompleteReadError:
                session.cut_reason = "the client closed the stream before its end"
            except OSError as e:
                slog.warning("file receive failed", destination=name, error=str(e))
                _write_stderr(process, f"corral: refused: cannot write {name}: {e.strerror or e}\n")
                return 1
        finally:
            watcher.cancel()
            receiving.cancel()
            with self._lock:
                self._sessions.discard(session)
                state.sessions -= 1
        if session.cut_reason:
            slog.warning("transfer session cut", reason=session.cut_reason, destination=name)
            _write_stderr(process, f"corral: transfer cut: {session.cut_reason}\n")
            return 1
        process.stdout.write(f"OK {received.files} {received.bytes}\n".encode())
        slog.info("files received", destination=name, files=received.files, bytes=received.bytes,
                  landed_bytes=received.landed_bytes)  # fmt: skip
        return 0

    async def _until_grant_ends(self, user: str, key: bytes) -> str:
        """Returns (with the reason) once `user`'s grant no longer allows `key`."""
        while True:
            grant = self.grants.lookup(user)
            if grant is None:
                return "the operation's grant expired or was revoked"
            if not _grant_matches(grant, key):
                return "the operation's key was replaced"
            remaining = grant.expires_at - time.time()
            await asyncio.sleep(min(max(remaining, 0.05), MAX_GRANT_POLL))

    def _one_at_a_time(self, user: str) -> _UserSlot:
        return _UserSlot(self, user)

    async def _check_rsync_version(self) -> None:
        done = await host_proc.run([self._rsync, "--version"], timeout=10, what="rsync --version")
        match = re.search(r"version\s+(\d+)\.(\d+)\.(\d+)", done.stdout.decode(errors="replace"))
        version = tuple(int(x) for x in match.groups()) if match else None
        if version is None or version < MIN_SAFE_RSYNC:
            # Distributions backport the fixes without changing the version: warn, do not refuse.
            log.warning("rsync may lack the receiver-side path-traversal fixes of 3.4.0",
                        version=".".join(map(str, version)) if version else "unknown")  # fmt: skip


class _UserSlot:
    """One session per grant and top-level destination at a time (a second waits): a
    destination is checked and then used, and only another session of the same grant
    writing into the same tree could swap it for a symlink meanwhile."""

    def __init__(self, server: TransferServer, user: str) -> None:
        self._server, self._user = server, user

    async def __aenter__(self) -> None:
        locks = self._server._user_locks
        lock, users = locks.get(self._user, (asyncio.Lock(), 0))
        locks[self._user] = (lock, users + 1)
        try:
            async with asyncio.timeout(SESSION_QUEUE_TIMEOUT):
                await lock.acquire()
        except TimeoutError:
            self._release_slot()
            raise CommandRefused("another transfer for this operation is still running") from None
        except BaseException:
            self._release_slot()
            raise

    async def __aexit__(self, *exc) -> None:
        self._server._user_locks[self._user][0].release()
        self._release_slot()

    def _release_slot(self) -> None:
        locks = self._server._user_locks
        lock, users = locks[self._user]
        if users <= 1:
            del locks[self._user]
        else:
            locks[self._user] = (lock, users - 1)


async def _pump(source: asyncio.StreamReader, sink: asyncssh.SSHWriter) -> None:
    """Copy a receiver's output to the channel; once the client is gone, just drain it."""
    while data := await source.read(OUTPUT_CHUNK):
        try:
            sink.write(data)
            await sink.drain()
        except (OSError, asyncssh.Error):
            pass


def _write_stderr(process: asyncssh.SSHServerProcess, text: str) -> None:
    try:
        process.stderr.write(text.encode())
    except (OSError, asyncssh.Error, BrokenPipeError):
        pass


def _refuse(process: asyncssh.SSHServerProcess, reason: str) -> None:
    _write_stderr(process, f"corral: refused: {reason}\n")
    process.exit(1)
