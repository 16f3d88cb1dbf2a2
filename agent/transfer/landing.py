"""A landing file: page cache the destination fills before the freeze, for the memory images.

Writing a GB into new page cache is the costliest part of receiving a big checkpoint: the
kernel must find, charge and map a page for every 4 KiB, and on a virtual machine whose
balloon takes free pages back (free page reporting) each new page also faults on the
hypervisor (2.7 s a GB measured here, against 0.15 s to write over page cache that exists).
That happens while the container is frozen. So, when a migration opens (PrepareReceive with
the memory the pre-flight saw), the destination writes a file of zeros of that size while
the container still runs; the stream then writes the biggest memory image over it, and
renames it into place, cut to the image's size, once the stream has ended.

Contract: `start()` writes in a worker thread; `claim()` hands the file to at most one stream
at a time, whole or as much as was written when the stream began (its writing stops then,
so as not to compete with the dump); `settle()` moves it into place. The file lives in the
operation's staging directory, and goes with it.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
from pathlib import Path

import structlog

log = structlog.get_logger("corral.agent.transfer")

LANDING_NAME = ".landing"
PART_SUFFIX = ".part"
MIN_BYTES = 64 << 20  # below this a landing is not worth the page cache it holds
MIN_PIECE = 1 << 20  # only a file whose first piece is at least this big lands on it
CLAIM_WAIT = 5.0  # s for a stopped writing to end (it finishes one write of _WRITE bytes)
_WRITE = 1 << 20
_ZEROS = bytes(_WRITE)
_MEMORY_IMAGE = re.compile(r"^pages-[0-9]+\.img$")  # CRIU's page images (not pagemap-*)


def is_memory_image(name: str) -> bool:
    """CRIU's page images (pages-N.img): written once, front to back, while it dumps."""
    return bool(_MEMORY_IMAGE.fullmatch(name))


def landing_size(expected: int, available: int) -> int:
    """How big a landing to prepare for `expected` bytes of memory images: 0 (none) below
    MIN_BYTES, and never more than half the host's available memory."""
    size = min(expected, available // 2)
    return size if size >= MIN_BYTES else 0


class LandingFile:
    def __init__(self, directory: Path, size: int) -> None:
        self.path = directory / LANDING_NAME
        self.size = size
        self.written = 0  # of it, once its writing has ended
        self._part = directory / (LANDING_NAME + PART_SUFFIX)
        self._stop = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._usable = False  # `path` holds page cache written for the images (all or part)
        self._claimed_fd: int | None = None
        self._task: asyncio.Future | None = None

    @property
    def whole(self) -> bool:
        """Written to its full size (and neither used nor dropped since)."""
        return self._usable and self.written == self.size

    def start(self) -> None:
        self._task = asyncio.ensure_future(asyncio.to_thread(self._prepare))

    async def prepared(self) -> bool:
        """Wait for the writing to end; whether the file is whole."""
        if self._task is not None:
            await asyncio.shield(self._task)
        return self.whole

    def _prepare(self) -> None:
        try:
            self._write()
        finally:
            self._done.set()

    def _write(self) -> None:
        try:
            fd = os.open(self._part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            log.warning("no landing file for the images", path=str(self._part), error=str(e))
            return
        written = 0
        try:
            while written < self.size and not self._stop.is_set():
                written += os.write(fd, _ZEROS[: min(_WRITE, self.size - written)])
        except OSError as e:
            log.warning("landing file not written", path=str(self._part), error=str(e))
            written = 0
        finally:
            os.close(fd)
        with self._lock:
            if written:  # what was written is worth landing on, whole or not
                try:
                    os.rename(self._part, self.path)
                    self.written, self._usable = written, True
                    return
                except OSError as e:  # the staging went meanwhile
                    log.warning("landing file not kept", path=str(self._part), error=str(e))
        self._part.unlink(missing_ok=True)

    def abandon(self) -> None:
        """Stop writing it (a stream began first, or the grant ended)."""
        self._stop.set()

    def claim(self) -> int | None:
        """The file, open for writing from its start, if no stream holds it: whole, or as much
        as was written of it (its writing is stopped first: the dump has begun); else None."""
        self._stop.set()
        if not self._done.wait(CLAIM_WAIT):
            return None
        with self._lock:
            if not self._usable or self._claimed_fd is not None:
                return None
            self._claimed_fd = os.open(self.path, os.O_WRONLY | os.O_NOFOLLOW)
            return self._claimed_fd

    def discard(self) -> None:
        """Not needed (the stream ended without a memory image for it): stop, and free its
        page cache now rather than with the staging."""
        self._stop.set()
        with self._lock:
            if self._claimed_fd is None and self._usable:
                self.path.unlink(missing_ok=True)
                self._usable = False

    def release(self) -> None:
        """The claiming stream failed: the file stays (with what it got), for another."""
        with self._lock:
            if self._claimed_fd is not None:
                os.close(self._claimed_fd)
                self._claimed_fd = None

    def settle(self, dir_fd: int, name: str, mode: int) -> int:
        """The claimed file becomes `name` in the directory `dir_fd`, cut where its writing
        ended, with `mode`; returns its size. The landing is then used up."""
        with self._lock:
            fd = self._claimed_fd
            if fd is None:
                raise RuntimeError("settle() without a claim")
            try:
                length = os.lseek(fd, 0, os.SEEK_CUR)
                os.ftruncate(fd, length)
                os.fchmod(fd, mode & 0o700)
                os.rename(self.path, name, dst_dir_fd=dir_fd)
            finally:
                os.close(fd)
                self._claimed_fd = None
                self._usable = False
            return length
