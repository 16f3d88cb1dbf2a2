"""The kernel watchdog: a host whose agent hung, died or lost its lease is reset (as Proxmox VE does).

Optional: agent config `watchdog_device` (e.g. /dev/watchdog; empty = off) and
`watchdog_timeout` (seconds). The device is armed (opened, its timeout set) at
the first valid lease, not at start: a host that never reached the controller
holds nothing to protect, and must not reset itself in a loop while the
controller is down. From then on it is petted (one byte written) every
`pet_every` seconds *only while the lease is valid*: if the agent hangs or dies
(nothing pets) or its lease runs out (it stops petting), the host is reset
`watchdog_timeout` later, so an agent that cannot fence itself is fenced by the
hardware. A clean shutdown writes the magic 'V' before closing, which disarms it
(unless the driver was built with nowayout); cancelling the pet loop does not.
The device is injectable (tests use a regular file; the simulator a timer).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import stat
import struct
from pathlib import Path
from typing import Callable, Protocol

import structlog

log = structlog.get_logger("corral.agent.watchdog")

# linux/watchdog.h: _IOWR('W', 6, int) and _IOR('W', 7, int).
WDIOC_SETTIMEOUT = 0xC0045706
WDIOC_GETTIMEOUT = 0x80045707
MAGIC_CLOSE = b"V"
# A driver that is not a watchdog answers ioctls with these: it keeps its own timeout.
_NO_IOCTL = (errno.ENOTTY, errno.EOPNOTSUPP, errno.ENOSYS)


class WatchdogDevice(Protocol):
    def arm(self) -> None: ...
    def pet(self) -> None: ...
    def disarm(self) -> None: ...


def check_device(value: str) -> Path:
    """The configured device, checked at startup (stat only: opening a watchdog arms it).
    Raises ValueError saying what is wrong."""
    path = Path(value)
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ValueError(f"{value}: {exc.strerror} (load the driver, e.g. softdog, or leave it empty)") from None
    if not stat.S_ISCHR(mode):
        raise ValueError(f"{value} is not a character device: not a watchdog")
    if not os.access(path, os.W_OK):
        raise ValueError(f"{value} is not writable by this agent")
    return path


class KernelWatchdog:
    """/dev/watchdog (or any path that takes writes, in tests)."""

    def __init__(self, path: Path, timeout: int) -> None:
        self.path = path
        self.timeout = timeout
        self._fd: int | None = None

    def arm(self) -> None:
        """Open the device (the kernel starts counting) and set its timeout where the driver can."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            got = fcntl.ioctl(fd, WDIOC_SETTIMEOUT, struct.pack("i", self.timeout))
            log.info("watchdog armed", device=str(self.path), timeout=struct.unpack("i", got)[0])
        except OSError as exc:
            if exc.errno not in _NO_IOCTL:
                os.close(fd)  # without 'V': the driver may already count; it is reset to its default on reopen
                raise OSError(exc.errno, f"watchdog {self.path} refused a timeout of {self.timeout}s: "
                                         f"{exc.strerror}") from None  # fmt: skip
            log.warning("the watchdog's timeout cannot be set: it keeps its own", device=str(self.path),
                        wanted=self.timeout, error=exc.strerror)  # fmt: skip
        self._fd = fd

    def pet(self) -> None:
        # One byte to a character device returns at once: no need to leave the event loop.
        if self._fd is not None:
            os.write(self._fd, b"\0")

    def disarm(self) -> None:
        if self._fd is not None:
            os.write(self._fd, MAGIC_CLOSE)
            os.close(self._fd)
            self._fd = None


class Watchdog:
    def __init__(self, device: WatchdogDevice, lease_valid: Callable[[], bool], timeout: float,
                 pet_every: float | None = None) -> None:  # fmt: skip
        self.device = device
        self.lease_valid = lease_valid
        self.timeout = timeout
        # Several pets per timeout, so a slow tick or two never resets a healthy host.
        self.pet_every = pet_every if pet_every is not None else min(1.0, timeout / 4)
        self.armed = False
        self._petting = False

    async def run(self) -> None:
        """Pet while the lease is valid; runs until cancelled (which leaves the device armed)."""
        failed = ""
        while True:
            if self.lease_valid():
                if not self.armed:
                    try:
                        await asyncio.to_thread(self.device.arm)
                        self.armed = True
                    except OSError as exc:
                        # Self-fencing still works without it: say so loudly, keep serving, try again.
                        if str(exc) != failed:
                            log.error("cannot arm the watchdog; this host is not reset if its agent hangs",
                                      error=str(exc))  # fmt: skip
                        failed = str(exc)
                if self.armed:
                    self.device.pet()
                    if not self._petting:
                        log.info("petting the watchdog while the lease holds")
                    self._petting = True
            elif self._petting:
                self._petting = False
                log.error("lease lost: the watchdog is no longer petted; this host resets unless the lease is "
                          "renewed first", within=self.timeout)  # fmt: skip
            await asyncio.sleep(self.pet_every)

    def close(self) -> None:
        """A clean agent shutdown: the magic close disarms the device."""
        if self.armed:
            self.device.disarm()
            self.armed = False
            log.info("watchdog disarmed (clean shutdown)")
