"""A flat directory of files as one stream: how checkpoint images cross the transfer channel.

Why not rsync for these: a checkpoint is a fresh flat directory (CRIU's images, a few
hundred KB for a small container), sent once, while the container is frozen. rsync
spends 60-130 ms of that downtime on starting processes and its protocol; this stream,
written by the source agent itself over an SSH connection it opened before the freeze,
takes a few ms. Trees (the rootfs, pre-dumps with their `parent` link) still go by rsync.

The receiving command is exactly `corral-receive-files NAME` (NAME one plain path
component inside the operation's staging directory). Wire format, client -> server,
repeated per file and ended by an empty name:

    u16 name length, name (UTF-8), u32 mode (permission bits), u64 size, size bytes

A name may come again in one stream: its bytes are then appended to the file (a piece).
So the memory images can go while CRIU still writes them (write_following), the rest
once it is done. A piece whose mode has ZSTD_FRAME set is one zstd frame (at most
MAX_PIECE once decompressed): the memory pieces are compressed, where that pays, for
a receiver that takes it (ReceiveGrant.takes_compressed): the SSH channel (~400 MB/s
here) is slower than zstd's level 1 (~1-4 GB/s a core), and memory often compresses.
A mode with any other bit beyond the permission bits is refused. Names are single plain components (no '/', '.', '..'); only regular
files are created, with O_EXCL|O_NOFOLLOW relative to a directory the receiver made
itself (and only those are appended to), so nothing outside it can be reached. The
receiver answers `OK FILES BYTES` on stdout.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

import zstandard

from agent.transfer.landing import MIN_PIECE, LandingFile, is_memory_image
from agent.transfer.rsync_command import CommandRefused

RECEIVE_COMMAND = "corral-receive-files"
CHUNK = 1024 * 1024
SMALL_FILE = 256 * 1024  # at most this size, files travel in batches (one thread hop a batch)
FOLLOW_PIECE = CHUNK  # a growing file goes once this much more of it is written
FOLLOW_READ = 4 * CHUNK  # read (one thread hop) and framed at most this much at a time
FOLLOW_POLL = 0.02  # seconds between looks at the growing files when nothing was sent
BATCH_FILES = 64
MAX_NAME = 255
MAX_FILES = 100_000
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,254}$")
_FILE_HEAD = struct.Struct(">IQ")  # mode, size
_NAME_LEN = struct.Struct(">H")
ZSTD_FRAME = 1 << 31  # in a frame's mode: its bytes are a zstd frame of the piece
MAX_PIECE = 4 * FOLLOW_READ  # what one compressed frame may hold once decompressed
ZSTD_LEVEL = 1
WORTH_IT = 0.9  # a piece goes compressed only if that makes it at most this much of its size
GIVE_UP_AFTER = 3  # pieces in a row that did not compress: then only every RETRY_EVERY-th is tried
RETRY_EVERY = 16


@dataclass(frozen=True)
class StreamedFiles:
    files: int
    bytes: int  # of the files
    sent_bytes: int = -1  # of the pieces as sent (compressed ones smaller); -1: as many as `bytes`
    landed_bytes: int = 0  # receiver: of the file written over a landing file (landing.py)

    @property
    def wire_bytes(self) -> int:
        return self.bytes if self.sent_bytes < 0 else self.sent_bytes


class PieceCompressor:
    """zstd level 1 for the pieces of one stream, while it pays: a piece that does not shrink
    to WORTH_IT of its size goes as it is, and after GIVE_UP_AFTER such pieces in a row only
    every RETRY_EVERY-th is tried (random memory then costs ~1/16 of a compression). Used
    from one thread at a time (a zstd context is not shared)."""

    def __init__(self) -> None:
        self._zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
        self._misses = 0
        self._skipped = 0

    def pack(self, data: bytes) -> bytes | None:
        """`data` compressed, or None: send it as it is."""
        if self._misses >= GIVE_UP_AFTER:
            self._skipped += 1
            if self._skipped % RETRY_EVERY:
                return None
        packed = self._zstd.compress(data)
        if len(packed) > WORTH_IT * len(data):
            self._misses += 1
            return None
        self._misses = self._skipped = 0
        return packed


def command_for(destination: str) -> str:
    check_name(destination, "destination")
    return f"{RECEIVE_COMMAND} {destination}"


def parse_receive_command(command: str | None) -> str | None:
    """The destination of a `corral-receive-files NAME` command, None if it is not one
    (then it may be rsync's); refused if it is one but malformed."""
    if command is None or not command.startswith(RECEIVE_COMMAND + " ") and command != RECEIVE_COMMAND:
        return None
    words = command.split(" ")
    if len(words) != 2:
        raise CommandRefused(f"{RECEIVE_COMMAND} takes exactly one destination name")
    return check_name(words[1], "destination")


def check_name(name: str, what: str = "file name") -> str:
    if not _NAME.fullmatch(name or "") or name in (".", ".."):
        raise CommandRefused(f"{what} {name[:80]!r} is not one plain path component")
    return name


def flat_files(directory: Path) -> list[Path] | None:
    """The regular files of `directory` if that is all it holds (no subdirectories,
    symlinks or special files), else None: then it is a tree for rsync."""
    files = []
    for entry in os.scandir(directory):
        if not entry.is_file(follow_symlinks=False) or not _NAME.fullmatch(entry.name):
            return None
        files.append(Path(entry.path))
    return sorted(files)


async def write_stream(files: list[Path], write: Callable[[bytes], Awaitable[None]]) -> StreamedFiles:
    """Send `files` through `write` in the wire format, ending with the empty name. Small files
    are read in batches, one thread hop per batch (a checkpoint is dozens of small images)."""
    total = count = 0
    batch: list[Path] = []
    for path in files:
        if path.stat().st_size <= SMALL_FILE and len(batch) < BATCH_FILES:
            batch.append(path)
            continue
        if batch:
            total, count = total + await _write_small(batch, write), count + len(batch)
            batch = []
        total, count = total + await _write_large(path, write), count + 1
    if batch:
        total, count = total + await _write_small(batch, write), count + len(batch)
    await write(_NAME_LEN.pack(0))
    return StreamedFiles(count, total)


async def write_following(
    directory: Path, write: Callable[[bytes], Awaitable[None]], writing: asyncio.Future,
    grows: Callable[[str], bool], poll: float = FOLLOW_POLL, compress: bool = False,
) -> StreamedFiles:  # fmt: skip
    """Send the files of `directory` while `writing` (a task that writes them) runs: meanwhile
    the files whose names `grows` accepts, in pieces as they grow (they must be written front
    to back and never rewritten, as CRIU writes its page images); once it is done, what is
    left of those and every other file whole, then the end. If `writing` fails this raises
    its error (the receiver sees a stream cut short). `compress`: those pieces are
    compressed where it pays (PieceCompressor; only for a receiver that takes ZSTD_FRAME)."""
    sent: dict[str, int] = {}  # bytes of each growing file already sent
    total = 0
    wire = _Wire(write, PieceCompressor() if compress else None)
    while not writing.done():
        moved = 0
        for name, size in await asyncio.to_thread(_growing, directory, grows):
            if size - sent.get(name, 0) >= FOLLOW_PIECE:
                n = await _write_piece(directory / name, sent.get(name, 0), size, wire)
                sent[name] = sent.get(name, 0) + n
                moved += n
        total += moved
        if not moved:
            await asyncio.wait([writing], timeout=poll)
    writing.result()  # its error, if it failed
    files = await asyncio.to_thread(flat_files, directory)
    if files is None:
        raise CommandRefused(f"{directory} is no longer a flat directory of files")
    rest = [p for p in files if p.name not in sent]
    for name, offset in sent.items():
        size = (directory / name).stat().st_size
        if size < offset:
            raise OSError(f"{directory / name} shrank while being sent")
        total += await _write_piece(directory / name, offset, size, wire)
    streamed = await write_stream(rest, write)
    return StreamedFiles(len(sent) + streamed.files, total + streamed.bytes,
                         total - wire.saved + streamed.bytes)  # fmt: skip


@dataclass
class _Wire:
    """Where the pieces go, and how much compressing them has saved so far. `write(frame,
    counted)` may be told how many bytes of files a compressed frame stands for (progress
    counts those)."""

    write: Callable[..., Awaitable[None]]
    compressor: PieceCompressor | None
    saved: int = 0


def _growing(directory: Path, grows: Callable[[str], bool]) -> list[tuple[str, int]]:
    found = []
    if not directory.is_dir():
        return found  # not made yet: the dump has not begun
    for entry in os.scandir(directory):
        if grows(entry.name) and _NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            found.append((entry.name, entry.stat(follow_symlinks=False).st_size))
    return found


async def _write_piece(path: Path, offset: int, end: int, wire: _Wire) -> int:
    """Bytes [offset, end) of `path`, as pieces of at most FOLLOW_READ (each its own frame,
    compressed if `wire` does and it pays; read and compressed in one thread hop)."""
    fd = await asyncio.to_thread(os.open, path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        mode = os.fstat(fd).st_mode & 0o777
        position = offset
        while position < end:
            data, packed = await asyncio.to_thread(_read_piece, fd, min(FOLLOW_READ, end - position), position,
                                                   wire.compressor)  # fmt: skip
            if not data:
                raise OSError(f"{path} shrank while being sent")
            if packed is None:
                await wire.write(_head(path.name, mode, len(data)) + data)
            else:
                head = _head(path.name, mode | ZSTD_FRAME, len(packed))
                await wire.write(head + packed, len(head) + len(data))
                wire.saved += len(data) - len(packed)
            position += len(data)
        return end - offset
    finally:
        os.close(fd)


def _read_piece(fd: int, size: int, position: int, compressor: PieceCompressor | None) -> tuple[bytes, bytes | None]:
    data = os.pread(fd, size, position)
    return data, compressor.pack(data) if compressor is not None and data else None


async def _write_small(paths: list[Path], write: Callable[[bytes], Awaitable[None]]) -> int:
    frames = await asyncio.to_thread(lambda: [_frame_of(p) for p in paths])
    await write(b"".join(f for f, _ in frames))
    return sum(size for _, size in frames)


def _frame_of(path: Path) -> tuple[bytes, int]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CommandRefused(f"{path} is not a regular file")
        data = _read_all(fd, st.st_size, path)
    finally:
        os.close(fd)
    return _head(path.name, st.st_mode, len(data)) + data, len(data)


async def _write_large(path: Path, write: Callable[[bytes], Awaitable[None]]) -> int:
    fd = await asyncio.to_thread(os.open, path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CommandRefused(f"{path} is not a regular file")
        await write(_head(path.name, st.st_mode, st.st_size))
        left = st.st_size
        while left > 0:
            data = await asyncio.to_thread(os.read, fd, min(CHUNK, left))
            if not data:
                raise OSError(f"{path} shrank while being sent")
            await write(data)
            left -= len(data)
        return st.st_size
    finally:
        os.close(fd)


def _head(name: str, mode: int, size: int) -> bytes:
    encoded = name.encode()
    return _NAME_LEN.pack(len(encoded)) + encoded + _FILE_HEAD.pack(mode & (0o777 | ZSTD_FRAME), size)


def _read_all(fd: int, size: int, path: Path) -> bytes:
    """`size` bytes (the size when the file was opened: a log still growing is cut there)."""
    parts, left = [], size
    while left > 0:
        data = os.read(fd, left)
        if not data:
            raise OSError(f"{path} shrank while being sent")
        parts.append(data)
        left -= len(data)
    return b"".join(parts)


async def read_stream(read: Callable[[int], Awaitable[bytes]], directory: Path,
                      landing: LandingFile | None = None) -> StreamedFiles:  # fmt: skip
    """Receive a stream into `directory`, made afresh (a previous attempt's is removed).
    `read(n)` returns exactly n bytes or raises (asyncio.IncompleteReadError at EOF). Small
    files are written in batches, one thread hop per batch. `landing`: the first memory image
    that comes in pieces of at least landing.MIN_PIECE is written over it (landing.py)."""
    await asyncio.to_thread(_fresh_directory, directory)
    if landing is not None:
        landing.abandon()  # the dump has begun: the landing's writing must not compete with it
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    total = 0
    made: set[str] = set()  # the files this stream created: a name that comes again appends to one
    batch: list[tuple[str, int, bytes]] = []
    landed: _Landed | None = None  # the file written over `landing`
    try:
        while True:
            (length,) = _NAME_LEN.unpack(await read(_NAME_LEN.size))
            if length == 0:
                await asyncio.to_thread(_store_files, dir_fd, batch, made)
                landed_bytes = 0
                if landed is not None:
                    landed_bytes = await asyncio.to_thread(landed.landing.settle, dir_fd, landed.name, landed.mode)
                    landed = None
                elif landing is not None:  # no memory image came big enough: its page cache goes
                    await asyncio.to_thread(landing.discard)
                return StreamedFiles(len(made), total, landed_bytes=landed_bytes)
            if length > MAX_NAME:
                raise CommandRefused(f"file name of {length} bytes")
            name = check_name((await read(length)).decode("utf-8", errors="replace"))
            mode, size = _FILE_HEAD.unpack(await read(_FILE_HEAD.size))
            if mode & ~(0o7777 | ZSTD_FRAME):
                raise CommandRefused(f"{name}: unknown frame flags {mode:#x}")
            if name not in made and len(made) + len(batch) >= MAX_FILES:
                raise CommandRefused(f"more than {MAX_FILES} files")
            if mode & ZSTD_FRAME:
                if size > MAX_PIECE:
                    raise CommandRefused(f"{name}: a compressed piece of {size} bytes")
                packed = await read(size)
                if batch:
                    await asyncio.to_thread(_store_files, dir_fd, batch, made)
                    batch = []
                if landed is None and _may_land(landing, name, _stated_size(packed), made):
                    landed = await asyncio.to_thread(_land, landing, name, mode, made)
                fd = landed.fd if landed is not None and landed.name == name else None
                total += await asyncio.to_thread(_store_compressed, dir_fd, name, mode, packed, made, fd)
                continue
            on_landing = landed is not None and landed.name == name
            if size <= SMALL_FILE and len(batch) < BATCH_FILES and not on_landing:
                batch.append((name, mode, await read(size) if size else b""))
                total += size
                continue
            await asyncio.to_thread(_store_files, dir_fd, batch, made)
            batch = []
            if landed is None and _may_land(landing, name, size, made):
                landed = await asyncio.to_thread(_land, landing, name, mode, made)
                on_landing = landed is not None
            fd = landed.fd if on_landing else await asyncio.to_thread(_open_piece, dir_fd, name, mode, made)
            try:
                left = size
                while left > 0:
                    data = await read(min(CHUNK, left))
                    await asyncio.to_thread(_write_all, fd, data)
                    left -= len(data)
            finally:
                if not on_landing:
                    os.close(fd)
            total += size
    finally:
        if landed is not None:
            landed.landing.release()
        os.close(dir_fd)


@dataclass(frozen=True)
class _Landed:
    landing: LandingFile
    name: str
    mode: int
    fd: int


def _may_land(landing: LandingFile | None, name: str, piece_size: int, made: set[str]) -> bool:
    """Whether a new file `name` whose first piece is `piece_size` is one to write over the
    landing: a memory image, in pieces big enough to be the bulk of the memory."""
    return landing is not None and name not in made and is_memory_image(name) and piece_size >= MIN_PIECE


def _land(landing: LandingFile, name: str, mode: int, made: set[str]) -> _Landed | None:
    """`name` written over the landing file, if it has page cache to give (claimed: the name is
    then taken). Blocking (a claim waits for the landing's writing to stop)."""
    fd = landing.claim()
    if fd is None:
        return None
    made.add(name)
    return _Landed(landing, name, mode, fd)


def _stated_size(packed: bytes) -> int:
    try:
        return zstandard.frame_content_size(packed)
    except zstandard.ZstdError:
        return -1  # refused when it is stored


def _create(dir_fd: int, name: str, mode: int) -> int:
    return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode & 0o700, dir_fd=dir_fd)


def _open_piece(dir_fd: int, name: str, mode: int, made: set[str]) -> int:
    """The file to write a piece of `name` to: created (it must not exist), or, if this
    stream created it, opened to append."""
    if name in made:
        return os.open(name, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW, dir_fd=dir_fd)
    fd = _create(dir_fd, name, mode)
    made.add(name)
    return fd


def _store_files(dir_fd: int, files: list[tuple[str, int, bytes]], made: set[str]) -> None:
    for name, mode, data in files:
        fd = _open_piece(dir_fd, name, mode, made)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)


def _store_compressed(dir_fd: int, name: str, mode: int, packed: bytes, made: set[str], fd: int | None = None) -> int:
    """Decompress a ZSTD_FRAME piece and append it (to `fd` if given: a landed file); returns
    its size. Its frame must say how large it is, at most MAX_PIECE (zstd would otherwise
    allocate what the frame claims)."""
    try:
        size = zstandard.frame_content_size(packed)
        if not 0 <= size <= MAX_PIECE:
            raise CommandRefused(f"{name}: a compressed piece of {'unknown size' if size < 0 else f'{size} bytes'}")
        data = zstandard.ZstdDecompressor().decompress(packed)
    except zstandard.ZstdError as e:
        raise CommandRefused(f"{name}: a compressed piece that does not decompress: {e}") from None
    if len(data) != size:
        raise CommandRefused(f"{name}: a compressed piece of {len(data)} bytes, not the {size} its frame says")
    if fd is not None:
        _write_all(fd, data)
        return len(data)
    fd = _open_piece(dir_fd, name, mode, made)
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)
    return len(data)


def _fresh_directory(directory: Path) -> None:
    if directory.is_symlink() or directory.is_file():
        directory.unlink()
    elif directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(mode=0o700)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
