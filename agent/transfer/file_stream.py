"""A flat directory of files as one stream: how checkpoint images cross the transfer channel.

Why not rsync for these: a checkpoint is a fresh flat directory (CRIU's images), sent
once, while the container is frozen. rsync spends 60-130 ms of that downtime on starting
processes and its protocol; this stream, written by the source agent itself over an SSH
connection it opened before the freeze, takes a few ms for a small container. And it can
follow a dump as CRIU writes it: the memory pages start crossing while the dump still
runs, instead of after it (`follow`). Trees (the rootfs, pre-dumps with their `parent`
link) still go by rsync.

The receiving command is exactly `corral-receive-files NAME` (NAME one plain path
component inside the operation's staging directory). Wire format, client -> server: a
sequence of chunks, ended by an empty name,

    u16 name length, name (UTF-8), u32 mode (permission bits), u64 offset, u32 length, bytes

where a file's first chunk has offset 0 and each next one continues exactly where the
last ended (append only; chunks of different files may interleave). Names are single
plain components (no '/', '.', '..'); only regular files are created, with
O_EXCL|O_NOFOLLOW relative to a directory the receiver made itself, and reopened with
O_NOFOLLOW, so nothing outside it can be reached. The receiver answers `OK FILES BYTES`.
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

from agent.transfer.rsync_command import CommandRefused

RECEIVE_COMMAND = "corral-receive-files"
CHUNK = 1024 * 1024
BATCH_BYTES = 4 * 1024 * 1024  # small chunks travel and land in batches (one thread hop a batch)
MAX_NAME = 255
MAX_FILES = 100_000
FOLLOW_POLL = 0.005  # while following a dump: how often to look for bytes CRIU has written
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,254}$")
PAGES = re.compile(r"^pages-\d+\.img$")  # CRIU's memory images: the bulk of a dump, written in order
_CHUNK_HEAD = struct.Struct(">IQI")  # mode, offset, length
_NAME_LEN = struct.Struct(">H")

Write = Callable[[bytes], Awaitable[None]]


@dataclass(frozen=True)
class StreamedFiles:
    files: int
    bytes: int


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
    if not _NAME.match(name or "") or name in (".", ".."):
        raise CommandRefused(f"{what} {name[:80]!r} is not one plain path component")
    return name


def flat_files(directory: Path) -> list[Path] | None:
    """The regular files of `directory` if that is all it holds (no subdirectories,
    symlinks or special files), else None: then it is a tree for rsync."""
    files = []
    for entry in os.scandir(directory):
        if not entry.is_file(follow_symlinks=False) or not _NAME.match(entry.name):
            return None
        files.append(Path(entry.path))
    return sorted(files)


# -- sending -----------------------------------------------------------------------------


class _Sender:
    """How far each file has been sent; reads happen in threads, a batch per hop."""

    def __init__(self, write: Write) -> None:
        self._write = write
        self.sent: dict[str, int] = {}  # name -> bytes sent

    async def send_new_bytes(self, paths: list[Path]) -> int:
        """Whatever `paths` hold beyond what was sent of them (all of a file not seen before)."""
        total = 0
        while True:
            frames, size, more = await asyncio.to_thread(self._read_batch, paths)
            if frames:
                await self._write(frames)
                total += size
            if not more:
                return total

    def _read_batch(self, paths: list[Path]) -> tuple[bytes, int, bool]:
        """Chunks of new bytes, up to BATCH_BYTES; `more` if some were left for the next batch.
        A file seen for the first time is announced even when empty (a zero-length chunk)."""
        parts: list[bytes] = []
        size = 0
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            except FileNotFoundError:
                continue
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise CommandRefused(f"{path} is not a regular file")
                offset = self.sent.get(path.name, 0)
                if st.st_size < offset:
                    raise OSError(f"{path} shrank while being sent")
                if path.name not in self.sent and st.st_size == 0:
                    parts.append(_chunk(path.name, st.st_mode, 0, b""))
                    self.sent[path.name] = 0
                while offset < st.st_size:
                    if size >= BATCH_BYTES:
                        return b"".join(parts), size, True
                    data = os.pread(fd, min(CHUNK, st.st_size - offset, BATCH_BYTES - size), offset)
                    if not data:
                        break
                    parts.append(_chunk(path.name, st.st_mode, offset, data))
                    offset += len(data)
                    size += len(data)
                    self.sent[path.name] = offset
            finally:
                os.close(fd)
        return b"".join(parts), size, False


def _chunk(name: str, mode: int, offset: int, data: bytes) -> bytes:
    encoded = name.encode()
    return _NAME_LEN.pack(len(encoded)) + encoded + _CHUNK_HEAD.pack(mode & 0o777, offset, len(data)) + data


async def write_stream(files: list[Path], write: Write) -> StreamedFiles:
    """Send `files` (complete) through `write`, ending the stream."""
    sender = _Sender(write)
    total = await sender.send_new_bytes(files)
    await write(_NAME_LEN.pack(0))
    return StreamedFiles(len(sender.sent), total)


async def follow(directory: Path, write: Write, finished: asyncio.Future, growing: re.Pattern[str]) -> StreamedFiles:
    """Send `directory` while something writes it: the files named like `growing` (CRIU's
    pages-*.img, the bulk) as their bytes appear, until `finished` is done; then everything,
    complete, ending the stream. Raises what `finished` raised (the stream is not ended: the
    receiver refuses an unfinished one). The writer must only append to growing files."""
    sender = _Sender(write)
    total = 0
    while not finished.done():
        try:
            names = await asyncio.to_thread(os.listdir, directory)
        except FileNotFoundError:
            names = []
        paths = sorted(directory / n for n in names if growing.match(n))
        sent = await sender.send_new_bytes(paths) if paths else 0
        total += sent
        if not sent:
            await asyncio.wait({finished}, timeout=FOLLOW_POLL)
    finished.result()
    files = await asyncio.to_thread(flat_files, directory)
    if files is None:
        raise CommandRefused(f"{directory} is not a flat directory of files")
    total += await sender.send_new_bytes(files)
    await write(_NAME_LEN.pack(0))
    return StreamedFiles(len(sender.sent), total)


# -- receiving ---------------------------------------------------------------------------


async def read_stream(read: Callable[[int], Awaitable[bytes]], directory: Path) -> StreamedFiles:
    """Receive a stream into `directory`, made afresh (a previous attempt's is removed).
    `read(n)` returns exactly n bytes or raises (asyncio.IncompleteReadError at EOF)."""
    await asyncio.to_thread(_fresh_directory, directory)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    sizes: dict[str, int] = {}  # name -> bytes received
    batch: list[tuple[str, int, int, bytes, bool]] = []
    batch_bytes = total = 0
    try:
        while True:
            (length,) = _NAME_LEN.unpack(await read(_NAME_LEN.size))
            if length == 0:
                await asyncio.to_thread(_write_chunks, dir_fd, batch)
                return StreamedFiles(len(sizes), total)
            if length > MAX_NAME:
                raise CommandRefused(f"file name of {length} bytes")
            name = check_name((await read(length)).decode("utf-8", errors="replace"))
            mode, offset, size = _CHUNK_HEAD.unpack(await read(_CHUNK_HEAD.size))
            if size > CHUNK:
                raise CommandRefused(f"chunk of {size} bytes (at most {CHUNK})")
            if offset != sizes.get(name, 0):
                raise CommandRefused(f"{name}: chunk at {offset}, expected {sizes.get(name, 0)} (append only)")
            first = name not in sizes
            if first and len(sizes) >= MAX_FILES:
                raise CommandRefused(f"more than {MAX_FILES} files")
            data = await read(size) if size else b""
            sizes[name] = offset + size
            total += size
            batch.append((name, mode, offset, data, first))
            batch_bytes += size
            if batch_bytes >= BATCH_BYTES:
                await asyncio.to_thread(_write_chunks, dir_fd, batch)
                batch, batch_bytes = [], 0
    finally:
        os.close(dir_fd)


def _write_chunks(dir_fd: int, chunks: list[tuple[str, int, int, bytes, bool]]) -> None:
    for name, mode, offset, data, first in chunks:
        if first:  # made here, now: nothing else can be at this name in our fresh directory
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        else:
            flags = os.O_WRONLY | os.O_NOFOLLOW
        fd = os.open(name, flags, mode & 0o700, dir_fd=dir_fd)
        try:
            view = memoryview(data)
            while view:
                written = os.pwrite(fd, view, offset)
                view, offset = view[written:], offset + written
        finally:
            os.close(fd)


def _fresh_directory(directory: Path) -> None:
    if directory.is_symlink() or directory.is_file():
        directory.unlink()
    elif directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(mode=0o700)
