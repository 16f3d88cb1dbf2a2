"""Unmount whatever is mounted under a lab's directory (loop-mounted images and the like)."""

from __future__ import annotations

from pathlib import Path

import structlog

from lab.cgroups import parse_mountinfo
from corral.proc import run

log = structlog.get_logger("lab.mounts")


def mounts_under(path: Path, mountinfo_file: Path = Path("/proc/self/mountinfo")) -> list[Path]:
    """Mount points at or below `path`, deepest first."""
    root = str(path).rstrip("/")
    points = {
        m.mount_point
        for m in parse_mountinfo(mountinfo_file.read_text())
        if m.mount_point == root or m.mount_point.startswith(root + "/")
    }
    return [Path(p) for p in sorted(points, key=lambda p: p.count("/"), reverse=True)]


async def unmount_all_under(path: Path) -> None:
    # Stacked mounts on one point need one umount each, hence the loop.
    for _ in range(10):
        points = mounts_under(path)
        if not points:
            return
        for point in points:
            result = await run(["umount", str(point)], timeout=20.0, check=False)
            if result.returncode != 0:
                # Busy: detach it now, the kernel frees it when the last user goes.
                lazy = await run(["umount", "-l", str(point)], timeout=20.0, check=False)
                if lazy.returncode != 0:
                    log.warning("could not unmount", mount_point=str(point), error=lazy.output)
    if mounts_under(path):
        log.warning("mounts remain under lab directory", path=str(path))
