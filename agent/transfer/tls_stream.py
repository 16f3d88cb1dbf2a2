"""Checkpoint images over TLS: the fast path for a live migration's memory.

The SSH channel (asyncssh) moves ~200 MB/s of incompressible memory here: each 256 KiB
packet is copied about eight times in Python. This carries the same file stream
(file_stream.py: frames, pieces, compression, the receiver's checks) over one TLS 1.3
connection driven from threads, OpenSSL sealing and opening the records with the GIL
released: ~720 MB/s here, host to host.

The destination opens one listening socket per operation (ImagesReceiver, at
prepare_receive) with a one-time CA (corral.pki.one_time_tls) whose client certificate
and key reach the source through the controller, as the operation's SSH key does; it
accepts only that client, one stream at a time, into the directory the SSH stream would
use, and answers `OK FILES BYTES` or `corral: refused: ...` / `corral: transfer cut: ...`
on a line. A source that cannot connect sends over SSH instead (push_while_writing
returns None before anything was sent).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import select
import socket
import ssl
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import structlog

from agent.transfer import file_stream
from agent.transfer.client import TransferProgress, TransferStats
from agent.transfer.landing import LandingFile
from agent.transfer.rsync_command import CommandRefused
from agent.transfer.stream_push import ProgressMeter, refusal  # as the SSH stream reports them
from corral import pki
from corral.errors import DeadlineExceeded

log = structlog.get_logger("corral.agent.transfer")

CONNECT_TIMEOUT = 5.0
HANDSHAKE_TIMEOUT = 10.0
IDLE_TIMEOUT = 60.0  # a connection that sends nothing this long is dropped (either side)
BLOCK = 4 << 20  # decrypted bytes handed to the event loop at a time
BLOCKS_AHEAD = 4  # ... at most this many waiting (the sender is held back beyond)
DRAIN_TIME = 5.0  # after answering, how long what the sender still sends is read and dropped


def _context(*, server: bool, ca: bytes, cert: bytes, key: bytes, scratch: Path) -> ssl.SSLContext:
    """TLS 1.3, the peer's certificate signed by the one-time CA. (OpenSSL reads a key only
    from a file: it is written in a private directory under `scratch` and removed at once.)"""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    with tempfile.TemporaryDirectory(dir=scratch, prefix=".tls-") as private:  # mode 0700
        paths = []
        for name, data in (("cert.pem", cert), ("key.pem", key)):
            path = os.path.join(private, name)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            paths.append(path)
        ctx.load_cert_chain(*paths)
    ctx.load_verify_locations(cadata=ca.decode())
    ctx.verify_mode = ssl.CERT_REQUIRED
    if server:
        ctx.num_tickets = 0  # nobody resumes
    return ctx


class ImagesReceiver:
    """One operation's TLS endpoint for its checkpoint images (see the module docstring)."""

    def __init__(self, listener: socket.socket, ctx: ssl.SSLContext, directory: Path, op: str,
                 landing: Callable[[], LandingFile | None] = lambda: None) -> None:  # fmt: skip
        self._listener, self._ctx, self.directory, self._op = listener, ctx, directory, op
        self._landing = landing
        self.port: int = listener.getsockname()[1]
        self._task: asyncio.Task | None = None

    @classmethod
    def open(cls, host: str, directory: Path, tls: pki.OneTimeTls, scratch: Path, op: str,
             landing: Callable[[], LandingFile | None] = lambda: None) -> ImagesReceiver:  # fmt: skip
        """Listen on a free port of `host` (blocking: call it in a thread). `tls` names `host`.
        `landing`: the operation's landing file when a stream comes (landing.py)."""
        ctx = _context(server=True, ca=tls.ca_pem, cert=tls.server_cert_pem, key=tls.server_key_pem, scratch=scratch)
        listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.bind((host, 0))
            listener.listen(4)
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        return cls(listener, ctx, directory, op, landing)

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._serve())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._listener.close()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            raw, peer = await loop.sock_accept(self._listener)
            try:
                await self._one(raw, peer[0])
            except asyncio.CancelledError:
                raw.close()
                raise
            except Exception as e:  # one bad connection must not end the endpoint
                log.warning("images stream failed", op=self._op, peer=peer[0], error=str(e)[:300])
                raw.close()

    async def _one(self, raw: socket.socket, peer: str) -> None:
        raw.setblocking(True)
        raw.settimeout(HANDSHAKE_TIMEOUT)
        try:
            conn = await asyncio.to_thread(self._ctx.wrap_socket, raw, server_side=True)
        except (OSError, ssl.SSLError) as e:
            log.warning("images stream refused", op=self._op, peer=peer, error=str(e)[:200])
            raw.close()
            return
        conn.settimeout(IDLE_TIMEOUT)
        inbound = _Inbound(conn, asyncio.get_running_loop())
        try:
            try:
                received = await file_stream.read_stream(inbound.readexactly, self.directory, self._landing())
                answer = f"OK {received.files} {received.bytes}\n"
                log.info("files received", op=self._op, peer=peer, destination=self.directory.name, channel="tls",
                         files=received.files, bytes=received.bytes, landed_bytes=received.landed_bytes)  # fmt: skip
            except CommandRefused as e:
                answer = f"corral: refused: {e}\n"
            except asyncio.IncompleteReadError:
                answer = "corral: transfer cut: the client closed the stream before its end\n"
            except (ssl.SSLError, TimeoutError) as e:
                answer = f"corral: transfer cut: {e}\n"
            except OSError as e:
                answer = f"corral: refused: cannot write {self.directory.name}: {e.strerror or e}\n"
            if not answer.startswith("OK"):
                log.warning("images stream refused", op=self._op, peer=peer, reason=answer.strip())
            await inbound.answer(answer)
        finally:
            inbound.stop()
            conn.close()


class _Inbound:
    """A TLS connection's I/O, all in one thread of its own (an OpenSSL connection must not be
    used from two threads at once): what it brings, read in blocks of up to BLOCK (an OpenSSL
    read returns one 16 KiB record: a thread hop per read would wake the event loop ~65,000
    times a GB) for a coroutine that wants exact sizes (file_stream.read_stream); then the
    one-line answer, written by the same thread."""

    POLL = 0.05  # seconds between looks for an answer to send while no data comes

    def __init__(self, conn: ssl.SSLSocket, loop: asyncio.AbstractEventLoop) -> None:
        self._conn, self._loop = conn, loop
        self._queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(BLOCKS_AHEAD)
        self._blocks: collections.deque[memoryview] = collections.deque()
        self._held = 0
        self._ended: BaseException | None = None
        self._answer: bytes | None = None
        self._stop = threading.Event()
        self._done = loop.create_future()
        # answer() and stop() wake the thread's waits at once (a poll alone added up to POLL
        # to every stream: ~50 ms of a frozen container's downtime). Used from the loop only.
        self._wake_r, self._wake_w = socket.socketpair()
        threading.Thread(target=self._run, name="images-tls", daemon=True).start()

    def _run(self) -> None:
        try:
            outcome = self._read_all()
            if not self._stop.is_set():
                self._hand_over(outcome)
            while not self._stop.is_set() and self._answer is None:
                select.select([self._wake_r], [], [], self.POLL)
            if self._answer is not None:
                self._conn.sendall(self._answer)
                self._drain()
        except (OSError, ssl.SSLError, RuntimeError, TimeoutError):  # (RuntimeError: the loop is gone)
            pass
        finally:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._finished)

    def _drain(self) -> None:
        """After the answer: what the sender still had in flight is read and dropped for a
        while (it looks for an answer before each piece), so that the close does not reset a
        connection whose answer it has not read yet."""
        deadline = time.monotonic() + DRAIN_TIME
        while time.monotonic() < deadline and not self._stop.is_set():
            if self._conn.pending() or select.select([self._conn], [], [], self.POLL)[0]:
                if not self._conn.recv(BLOCK):
                    return

    def _read_all(self) -> BaseException | None:
        """Blocks until the peer ends its side (None), an error (it), or an answer is due."""
        block, n, idle = bytearray(BLOCK), 0, 0.0
        try:
            while not self._stop.is_set() and self._answer is None:
                if not self._conn.pending() and not select.select([self._conn], [], [], 0)[0]:
                    if n:  # nothing more right now: hand over what came, then wait
                        self._hand_over(bytes(memoryview(block)[:n]))
                        block, n = bytearray(BLOCK), 0
                    ready = select.select([self._conn, self._wake_r], [], [], self.POLL)[0]
                    if self._wake_r in ready:
                        continue  # an answer is due, or a stop
                    if not ready:
                        idle += self.POLL
                        if idle >= IDLE_TIMEOUT:
                            return TimeoutError(f"nothing came for {IDLE_TIMEOUT:g} s")
                        continue
                idle = 0.0
                got = self._conn.recv_into(memoryview(block)[n:], BLOCK - n)
                if not got:
                    break
                n += got
                if n == BLOCK:
                    self._hand_over(block)
                    block, n = bytearray(BLOCK), 0
            if n:
                self._hand_over(bytes(memoryview(block)[:n]))
            return None
        except (OSError, ssl.SSLError, ValueError) as e:
            return e

    def _hand_over(self, item: bytes | bytearray | BaseException | None) -> None:
        # Bounded: a reader that has gone away must not keep this thread forever.
        asyncio.run_coroutine_threadsafe(self._queue.put(item), self._loop).result(IDLE_TIMEOUT)

    def _finished(self) -> None:
        self._wake_r.close()
        self._wake_w.close()
        if not self._done.done():
            self._done.set_result(None)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # (closed: the thread has ended)
            self._wake_w.send(b"!")

    async def readexactly(self, n: int) -> bytes:
        while self._held < n:
            if self._ended is not None:
                raise self._ended
            item = await self._queue.get()
            if item is None or isinstance(item, BaseException):
                partial = b"".join(self._blocks)
                self._ended = item if isinstance(item, BaseException) else asyncio.IncompleteReadError(partial, n)
                raise self._ended
            self._blocks.append(memoryview(item))
            self._held += len(item)
        parts, want = [], n
        while want:
            head = self._blocks[0]
            take = head[:want]
            parts.append(take)
            want -= len(take)
            if len(take) == len(head):
                self._blocks.popleft()
            else:
                self._blocks[0] = head[len(take):]
        self._held -= n
        return parts[0].tobytes() if len(parts) == 1 else b"".join(parts)

    async def answer(self, text: str) -> None:
        """Send the one-line answer (from the connection's thread) and wait for it to go."""
        self._answer = text.encode()
        self._wake()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                while not self._done.done():
                    while not self._queue.empty():  # (a refused stream: the sender may still be sending)
                        self._queue.get_nowait()
                    await asyncio.wait([self._done], timeout=self.POLL)

    def stop(self) -> None:
        self._stop.set()
        self._wake()


async def push_while_writing(
    src_dir: Path, host: str, port: int, client: pki.OneTimeClient, scratch: Path, *, writing: asyncio.Future,
    grows: Callable[[str], bool], compress: bool, timeout: float,
    progress: Callable[[TransferProgress], None] | None = None,
) -> TransferStats | None:  # fmt: skip
    """file_stream.write_following to the destination's ImagesReceiver at host:port. None if
    it cannot be reached (nothing was sent: the caller uses the SSH stream)."""
    ctx = await asyncio.to_thread(lambda: _context(server=False, ca=client.ca, cert=client.cert, key=client.key,
                                                   scratch=scratch))  # fmt: skip
    began = time.monotonic()
    try:
        conn = await asyncio.to_thread(_connect, ctx, host, port)
    except (OSError, ssl.SSLError) as e:
        log.info("images endpoint unreachable, sending over SSH", address=f"{host}:{port}", error=str(e)[:200])
        return None
    meter = ProgressMeter(0, progress)
    reader = conn.makefile("rb")
    try:
        async with asyncio.timeout(timeout):

            async def write(data: bytes, counted: int | None = None) -> None:
                await asyncio.to_thread(_send_unless_answered, conn, data)
                meter.sent(len(data) if counted is None else counted)

            try:
                sent = await file_stream.write_following(src_dir, write, writing, grows, compress=compress)
            except (OSError, ssl.SSLError, _Answered) as e:
                said = b""
                with contextlib.suppress(OSError, ssl.SSLError):
                    said = await asyncio.to_thread(reader.readline, 4096)  # why it stopped reading, if it said
                raise refusal(said.decode(errors="replace") or f"corral: transfer cut: {e}", 1) from None
            answer = (await asyncio.to_thread(reader.readline, 4096)).decode(errors="replace")
    except TimeoutError:
        raise DeadlineExceeded(f"sending the checkpoint images did not finish within {timeout:g} s") from None
    finally:
        reader.close()
        conn.close()
    if not answer.startswith("OK "):
        raise refusal(answer or "corral: transfer cut: the destination closed the connection", 1)
    meter.finished()
    duration = time.monotonic() - began
    log.info("files pushed", address=f"{host}:{port}", channel="tls", files=sent.files, bytes=sent.bytes,
             sent_bytes=sent.wire_bytes, ms=round(duration * 1000, 1))  # fmt: skip
    return TransferStats(bytes_sent=sent.wire_bytes, literal_bytes=sent.wire_bytes, total_size=sent.bytes,
                         files_transferred=sent.files, duration_s=duration)  # fmt: skip


class _Answered(Exception):
    """The destination answered before the end of the stream: it refused it."""


def _send_unless_answered(conn: ssl.SSLSocket, data: bytes) -> None:
    if conn.pending() or select.select([conn], [], [], 0)[0]:
        raise _Answered("the destination answered before the end")
    conn.sendall(data)


def _connect(ctx: ssl.SSLContext, host: str, port: int) -> ssl.SSLSocket:
    raw = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.settimeout(HANDSHAKE_TIMEOUT)
        conn = ctx.wrap_socket(raw, server_hostname=host)  # the certificate must name the destination's address
    except BaseException:
        raw.close()
        raise
    conn.settimeout(IDLE_TIMEOUT)
    return conn
