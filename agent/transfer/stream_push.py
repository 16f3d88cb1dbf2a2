"""The pushing side of `corral-receive-files`: the source agent's own SSH connection.

One asyncssh connection per operation and destination, opened ahead of need
(`warm`, called when the operation's first rsync push starts) and kept while in use
and CONTROL_PERSIST s after, so that sending a checkpoint during the downtime costs
one channel and the bytes, not a key exchange. It trusts exactly the pinned host key
and offers exactly the operation's key, like the OpenSSH client of rsync pushes.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import asyncssh
import structlog

from agent.transfer import file_stream
from agent.transfer.client import CONNECT_TIMEOUT, CONTROL_PERSIST, PushTarget, TransferProgress, TransferStats
from agent.transfer.client import split_address
from agent.transfer.keys import parse_public_key
from agent.transfer.server import ENCRYPTION_ALGS, MAX_PACKET, WINDOW
from corral.errors import (
    CorralError,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RuntimeFailure,
    Unauthenticated,
    Unavailable,
)

log = structlog.get_logger("corral.agent.transfer")

PROGRESS_INTERVAL = 0.1  # seconds between progress reports of one push (as rsync pushes)


@dataclass
class _Connection:
    conn: asyncssh.SSHClientConnection
    used_at: float


class StreamPusher:
    """Connections of this agent to destinations' transfer endpoints, by operation credential."""

    def __init__(self) -> None:
        self._connections: dict[str, _Connection] = {}
        self._opening: dict[str, asyncio.Future] = {}
        self._warming: set[asyncio.Task] = set()

    def warm(self, target: PushTarget) -> None:
        """Open the connection for `target` in the background (errors surface at push time)."""
        if _key(target) in self._connections or _key(target) in self._opening:
            return
        task = asyncio.ensure_future(self._connection(target))
        self._warming.add(task)
        task.add_done_callback(self._warmed)

    def _warmed(self, task: asyncio.Task) -> None:
        self._warming.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.info("transfer connection not opened ahead", error=str(task.exception())[:200])

    async def push(
        self, src_dir: Path, target: PushTarget, dest: str, *, timeout: float,
        progress: Callable[[TransferProgress], None] | None = None,
    ) -> TransferStats | None:  # fmt: skip
        """Send the flat directory `src_dir` as staging/`dest` on the destination. None if
        `src_dir` is not flat (a tree: the caller uses rsync)."""
        dest = file_stream.check_name(dest, "destination")
        if not src_dir.is_dir():
            raise NotFound(f"nothing to send: {src_dir} is not a directory")
        files = await asyncio.to_thread(file_stream.flat_files, src_dir)
        if files is None:
            return None
        meter = ProgressMeter(sum(await asyncio.to_thread(lambda: [f.stat().st_size for f in files])), progress)
        return await self._push(target, dest, meter, timeout, lambda write: file_stream.write_stream(files, write))

    async def push_while_writing(
        self, src_dir: Path, target: PushTarget, dest: str, *, writing: asyncio.Future,
        grows: Callable[[str], bool], timeout: float, progress: Callable[[TransferProgress], None] | None = None,
        compress: bool = False,
    ) -> TransferStats:  # fmt: skip
        """Send the flat directory `src_dir` as staging/`dest` while `writing` writes it: the
        files `grows` names in pieces as they grow, the rest once `writing` is done
        (file_stream.write_following; `compress`: those pieces compressed where it pays, for
        a receiver that takes it). Raises `writing`'s error if it fails."""
        dest = file_stream.check_name(dest, "destination")  # (src_dir may not be made yet)
        meter = ProgressMeter(0, progress)  # the total grows with the files
        return await self._push(target, dest, meter, timeout, lambda write: file_stream.write_following(
            src_dir, write, writing, grows, compress=compress))  # fmt: skip

    async def _push(self, target: PushTarget, dest: str, meter: ProgressMeter, timeout: float, produce) -> TransferStats:
        began = time.monotonic()
        plog = log.bind(op=target.user.removeprefix("op-"), address=target.address, dest=dest)
        try:
            async with asyncio.timeout(timeout):
                try:
                    sent, answer, status, errors = await self._send(target, produce, dest, meter)
                except (OSError, asyncssh.Error):
                    if _key(target) not in self._connections:
                        raise
                    # A kept connection the peer has since closed (idle, or its grant was
                    # replaced): once more on a new one, which also hears why.
                    self._drop(target)
                    sent, answer, status, errors = await self._send(target, produce, dest, meter)
        except TimeoutError:
            self._drop(target)
            raise DeadlineExceeded(f"sending {dest} did not finish within {timeout:g} s") from None
        except (OSError, asyncssh.Error) as e:
            self._drop(target)
            raise _error_for(e) from None
        if status != 0 or not answer.startswith("OK "):
            raise refusal(errors, status)
        meter.finished()
        duration = time.monotonic() - began
        plog.info("files pushed", files=sent.files, bytes=sent.bytes, sent_bytes=sent.wire_bytes,
                  ms=round(duration * 1000, 1))  # fmt: skip
        return TransferStats(bytes_sent=sent.wire_bytes, literal_bytes=sent.wire_bytes, total_size=sent.bytes,
                             files_transferred=sent.files, duration_s=duration)  # fmt: skip

    async def _send(self, target: PushTarget, produce, dest: str, meter: ProgressMeter):
        """One stream to `dest`, its bytes written by `produce(write)`."""
        entry = await self._connection(target)
        entry.used_at = time.monotonic()
        meter.restart()
        async with entry.conn.create_process(file_stream.command_for(dest), encoding=None) as process:
            async def write(data: bytes, counted: int | None = None) -> None:
                process.stdin.write(data)
                await process.stdin.drain()
                meter.sent(len(data) if counted is None else counted)  # (a compressed piece: its files' bytes)

            try:
                sent = await produce(write)
                process.stdin.write_eof()
            except BrokenPipeError:
                sent = None  # the receiver stopped reading: its stderr says why
            answer, errors = await asyncio.gather(process.stdout.read(), process.stderr.read())
            completed = await process.wait()
        entry.used_at = time.monotonic()
        status = completed.exit_status if sent is not None else (completed.exit_status or 1)
        return sent, answer.decode(errors="replace"), status, errors.decode(errors="replace")

    async def _connection(self, target: PushTarget) -> _Connection:
        key = _key(target)
        self._expire()
        if key in self._connections:
            return self._connections[key]
        if key not in self._opening:
            self._opening[key] = asyncio.ensure_future(_connect(target))
        future = self._opening[key]
        try:
            conn = await asyncio.shield(future)
        finally:
            if future.done():
                self._opening.pop(key, None)
        entry = self._connections.setdefault(key, _Connection(conn, time.monotonic()))
        return entry

    def _drop(self, target: PushTarget) -> None:
        entry = self._connections.pop(_key(target), None)
        if entry is not None:
            entry.conn.close()

    def _expire(self) -> None:
        now = time.monotonic()
        for key, entry in list(self._connections.items()):
            if now - entry.used_at > CONTROL_PERSIST or entry.conn.is_closed():
                del self._connections[key]
                entry.conn.close()

    async def close(self) -> None:
        for task in list(self._warming):
            task.cancel()
        for entry in self._connections.values():
            entry.conn.close()
        self._connections.clear()


class ProgressMeter:
    """Progress of one push for its caller: at most every PROGRESS_INTERVAL, and once at the end."""

    def __init__(self, total: int, callback: Callable[[TransferProgress], None] | None) -> None:
        self.total, self._callback = total, callback
        self.restart()

    def restart(self) -> None:
        self._done, self._began, self._last = 0, time.monotonic(), 0.0

    def sent(self, n: int) -> None:
        self._done += n
        self.total = max(self.total, self._done)
        now = time.monotonic()
        if self._callback is not None and now - self._last >= PROGRESS_INTERVAL:
            self._last = now
            self._emit(min(self._done, self.total), now)

    def finished(self) -> None:
        if self._callback is not None:
            self._emit(self.total, time.monotonic())

    def _emit(self, done: int, now: float) -> None:
        elapsed = max(now - self._began, 1e-6)
        rate = done / elapsed
        eta = (self.total - done) / rate if rate > 0 else None
        try:
            self._callback(TransferProgress(done, self.total, rate, eta))
        except Exception:  # a progress consumer's bug must not fail the transfer
            log.exception("transfer progress callback failed")


async def _connect(target: PushTarget) -> asyncssh.SSHClientConnection:
    host, port = split_address(target.address)
    if "PRIVATE KEY-----" not in (target.private_key or ""):
        raise InvalidArgument("the operation's private key must be an OpenSSH PEM private key")
    host_key = parse_public_key(target.host_key, "the destination host key")
    try:
        client_key = asyncssh.import_private_key(target.private_key)
    except (asyncssh.KeyImportError, ValueError) as e:
        raise InvalidArgument(f"the operation's private key cannot be read: {e}") from None
    try:
        return await asyncssh.connect(
            host, port, username=target.user, client_keys=[client_key], known_hosts=([host_key], [], []),
            server_host_key_algs=["ssh-ed25519"], encryption_algs=ENCRYPTION_ALGS, preferred_auth="publickey",
            agent_path=None, config=None, connect_timeout=CONNECT_TIMEOUT, keepalive_interval=15,
            keepalive_count_max=4, compression_algs=None, max_pktsize=MAX_PACKET, window=WINDOW,
        )  # fmt: skip
    except (OSError, asyncssh.Error) as e:
        raise _error_for(e) from None


def _key(target: PushTarget) -> str:
    return hashlib.sha256("\0".join([target.user, target.address, target.host_key, target.private_key]).encode()).hexdigest()


def _error_for(e: BaseException) -> CorralError:
    if isinstance(e, CorralError):
        return e
    if isinstance(e, asyncssh.HostKeyNotVerifiable):
        return PermissionDenied("the destination's host key is not the pinned one: refusing to send "
                                "(wrong host or a man in the middle)")  # fmt: skip
    if isinstance(e, asyncssh.PermissionDenied):
        return Unauthenticated("the destination refused the operation's credential "
                               "(unknown, revoked, expired or replaced key)")  # fmt: skip
    if isinstance(e, (OSError, asyncssh.ConnectionLost, asyncssh.DisconnectError)):
        return Unavailable(f"cannot reach the destination's transfer endpoint: {e}")
    return RuntimeFailure(f"sending files failed: {e}")


def refusal(errors: str, status: int | None) -> CorralError:
    line = next((l for l in reversed(errors.splitlines()) if l.strip()), f"exit status {status}")
    if "No space left on device" in errors or "Disk quota exceeded" in errors:
        return RuntimeFailure(f"the destination ran out of space (No space left on device); nothing was "
                              f"changed on the source: {line}")  # fmt: skip
    if "corral: refused" in line or "corral: transfer cut" in line:
        return PermissionDenied(f"the destination {line.removeprefix('corral: ')}")
    return RuntimeFailure(f"sending files failed: {line}")

