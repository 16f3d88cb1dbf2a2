"""Detached daemons of the lab, tracked by PID and recognised by a marker.

The marker is the lab's base directory: every process the lab starts (and
every `[lxc monitor] LXCPATH NAME` of its hosts) has it in its command line.
Before signalling a recorded PID we check the marker is still there, since
PIDs get reused; a zombie counts as gone.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import structlog

from corral.errors import RuntimeFailure
from corral.proc import run
from lab.layout import PROJECT_ROOT

log = structlog.get_logger("lab.processes")

STOP_TIMEOUT = 5.0
_POLL = 0.05


async def spawn_detached(
    argv: Sequence[str | os.PathLike[str]],
    *,
    log_file: Path,
    cwd: Path,
    env: Mapping[str, str] | None = None,
) -> int:
    """Start `argv` as a daemon (own session, stdin /dev/null, output appended to
    `log_file`) that outlives this process; returns its PID."""
    launcher = [sys.executable, "-m", "lab.spawn", str(log_file), str(cwd), "--", *map(str, argv)]
    result = await run(launcher, timeout=15.0, env=daemon_env() if env is None else dict(env),
                       what=f"starting {argv[0]}")
    try:
        return int(result.stdout.decode().strip())
    except ValueError:
        raise RuntimeFailure(f"launcher for {argv[0]} printed no PID: {result.stdout!r}") from None


def daemon_env() -> dict[str, str]:
    """Environment for lab daemons and CLI calls: the repository first on
    PYTHONPATH (so `-m agent.main` resolves from any directory) and unbuffered
    output (so logs are current when someone reads them after a failure)."""
    env = dict(os.environ)
    parts = [str(PROJECT_ROOT), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def cmdline(pid: int) -> list[str] | None:
    """The command line of `pid`, or None if it is gone or a zombie (whose is empty)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    if not raw:
        return None
    return raw.rstrip(b"\0").decode(errors="replace").split("\0")


def has_marker(args: Sequence[str], marker: str) -> bool:
    # "/lab/hx/" must not match the processes of "/lab/hxy".
    marker = marker.rstrip("/")
    return any(a == marker or (marker + "/") in a for a in args)


def is_running(pid: int | None, marker: str) -> bool:
    """Is `pid` alive (not a zombie) and still one of ours?"""
    if not pid or pid <= 0:
        return False
    args = cmdline(pid)
    return args is not None and not _is_zombie(pid) and has_marker(args, marker)


def find_marked(marker: str) -> list[int]:
    """Every live process carrying `marker`, except this process and its ancestors."""
    spared = self_and_ancestors()
    found = []
    for pid in _all_pids():
        if pid in spared:
            continue
        args = cmdline(pid)
        if args is not None and has_marker(args, marker) and not _is_zombie(pid):
            found.append(pid)
    return found


def find_lxc_monitors(lxc_path: Path) -> list[int]:
    """PIDs of `[lxc monitor] LXCPATH NAME` processes for containers under `lxc_path`."""
    prefix = f"[lxc monitor] {str(lxc_path).rstrip('/')} "
    found = []
    for pid in _all_pids():
        args = cmdline(pid)
        if args and " ".join(args).startswith(prefix):
            found.append(pid)
    return found


def find_in_namespaces(namespaces: set[tuple[int, int]], kind: str) -> list[int]:
    """Live processes whose `kind` ("net", "mnt") namespace, as (dev, inode), is one of
    `namespaces`, except this process and its ancestors."""
    spared = self_and_ancestors()
    found = []
    for pid in _all_pids():
        if pid in spared:
            continue
        try:
            st = os.stat(f"/proc/{pid}/ns/{kind}")
        except OSError:
            continue  # gone, or a process we may not inspect
        if (st.st_dev, st.st_ino) in namespaces and not _is_zombie(pid):
            found.append(pid)
    return found


def children_of(pid: int) -> list[int]:
    kids: list[int] = []
    task_dir = Path(f"/proc/{pid}/task")
    try:
        tasks = list(task_dir.iterdir())
    except FileNotFoundError:
        return kids
    for task in tasks:
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return kids


async def stop(pid: int | None, marker: str, timeout: float = STOP_TIMEOUT) -> bool:
    """SIGTERM, wait up to `timeout`, then SIGKILL. False if it was not running (or not ours)."""
    if not is_running(pid, marker):
        return False
    assert pid is not None
    _signal(pid, signal.SIGTERM)
    if await wait_gone(pid, timeout):
        return True
    log.warning("process ignored SIGTERM, killing it", pid=pid, timeout=timeout)
    _signal(pid, signal.SIGKILL)
    if not await wait_gone(pid, 5.0):
        raise RuntimeFailure(f"process {pid} survived SIGKILL")
    return True


async def kill(pid: int | None, marker: str) -> bool:
    """SIGKILL at once. False if it was not running (or not ours)."""
    if not is_running(pid, marker):
        return False
    assert pid is not None
    _signal(pid, signal.SIGKILL)
    if not await wait_gone(pid, 5.0):
        raise RuntimeFailure(f"process {pid} survived SIGKILL")
    return True


async def kill_any(pid: int) -> None:
    """SIGKILL `pid` whatever it runs (the caller knows it is ours) and wait for it."""
    _signal(pid, signal.SIGKILL)
    if not await wait_gone(pid, 5.0):
        log.warning("process survived SIGKILL", pid=pid)


async def wait_gone(pid: int, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if cmdline(pid) is None or _is_zombie(pid):
            return True
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(_POLL)


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    # The state follows the parenthesised command name, which may contain spaces.
    return stat[stat.rfind(")") + 2:][:1] in ("Z", "X")


def _all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def self_and_ancestors() -> set[int]:
    """This process and its ancestors: never signalled by the lab's sweeps."""
    spared = set()
    pid = os.getpid()
    while pid > 1 and pid not in spared:
        spared.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            break
        pid = int(stat[stat.rfind(")") + 2:].split()[1])
    return spared
