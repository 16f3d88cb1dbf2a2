"""Checkpoint and restore of LXC containers with CRIU, through `lxc-checkpoint`.

What it takes on these machines (DESIGN.md, measured):
- `lxc-checkpoint -s` freezes, dumps and stops; without `-s` the container
  keeps running (a trial dump). `-r -d` restores and daemonizes: the restored
  container's LXC monitor inherits our stderr, so lxc-checkpoint writes to
  files, never to a pipe someone reads to its end.
- CRIU writes dump.log/restore.log and its stats images (stats-dump,
  stats-restore) into the checkpoint directory; criu_stats.py reads them.
- Options lxc-checkpoint has no flag for (lazy pages, page server address,
  TLS, network lock method) reach CRIU through a config file named by
  CRIU_CONFIG_FILE, which CRIU reads itself. Values there are `key value`;
  optional-argument options need `key=value` (`verbosity=4`).
- Post-copy: the source dumps in lazy-pages mode and stays frozen, serving
  pages from its address until the destination has them all, then stops (with
  keep_source it stays frozen for its caller to stop or keep: start_lazy_dump
  says why). The destination runs `criu lazy-pages` (which fetches the pages), waits for its
  socket, then restores with `lazy-pages`. A failed lazy restore can leave
  `criu restore` waiting forever (and deaf to SIGTERM): every wait here has a
  deadline and ends with SIGKILL of the tool's whole process tree.
- Downtime: a stopping dump freezes the container from a CRIU action script
  (much faster than CRIU's own freezer loop, see Freezer.action_script), and
  the restore thaws what CRIU restores frozen because of it. CRIU's nftables
  network lock (LiveSupport.network_lock) unlocks faster than iptables.
- LXC passes `lxc.apparmor.profile` to CRIU, which refuses it on kernels
  without AppArmor: restores then use a copy of the config without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import structlog

from agent.runtime import dumpability
from agent.runtime.cgroups import container_cgroup_dirs, remove_empty
from agent.runtime.freezer import (
    FREEZE_SCRIPT,
    NETLOCK_RULES,
    NETLOCK_RULES_TEXT,
    NETLOCKED,
    PREFROZEN_MARK,
    Freezer,
    network_lock_error,
    read_frozen_at,
    remove_network_lock,
    write_executable,
)
from agent.runtime.tcp_listen import listening
from agent.runtime.tool_process import ToolProcess, kill_tree, restored_monitor, tools_using
from agent.runtime.criu import check_feature
from agent.runtime.criu_stats import DumpStats, RestoreStats, StatsFormatError, read_dump_stats, read_restore_stats
from agent.runtime.lxc import DEFAULT_PATH
from corral.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, RuntimeFailure

log = structlog.get_logger("corral.agent.checkpoint")

DUMP_CONFIG = "corral-criu-dump.conf"
RESTORE_CONFIG = "corral-criu-restore.conf"
RESTORE_RCFILE = "corral-lxc-restore.conf"
APPARMOR_FS = Path("/sys/kernel/security/apparmor")  # what CRIU looks at (criu/lsm.c, kerndat_lsm)
LAZY_SOCKET = "lazy-pages.socket"
LAZY_LOG = "lazy-pages.log"
_POLL = 0.005  # seconds between looks at a listening port or a socket file: cheap, and 5 ms is noise
# Lines CRIU logs as errors that do not make a dump fail (no CAP_SYS_RESOURCE here).
_BENIGN_ERRORS = ("RLIMIT_NOFILE",)


# -- results -------------------------------------------------------------------------


@dataclass(frozen=True)
class CriuTimes:
    """CRIU's own figures from its stats images, in milliseconds (None where absent)."""

    frozen_ms: float | None = None  # from the tasks seized to the end of the dump (stop: to their death)
    freezing_ms: float | None = None  # freezing the cgroup and seizing the tasks (already paused meanwhile)
    memdump_ms: float | None = None
    memwrite_ms: float | None = None
    pages_written: int | None = None
    pages_lazy: int | None = None  # (post-copy dumps report no figures at all: see LazyDump.finished)
    restore_ms: float | None = None
    forking_ms: float | None = None

    @property
    def paused_ms(self) -> float | None:
        """How long the workload stood still during the dump, as CRIU measured it."""
        if self.frozen_ms is None:
            return None
        return self.frozen_ms + (self.freezing_ms or 0.0)

    @classmethod
    def of(cls, dump: DumpStats | None = None, restore: RestoreStats | None = None) -> CriuTimes:
        times = cls()
        if dump is not None:
            times = replace(
                times, frozen_ms=dump.frozen_us / 1000, freezing_ms=dump.freezing_us / 1000,
                memdump_ms=dump.memdump_us / 1000, memwrite_ms=dump.memwrite_us / 1000,
                pages_written=dump.pages_written, pages_lazy=dump.pages_lazy,
            )  # fmt: skip
        if restore is not None:
            times = replace(times, restore_ms=restore.restore_us / 1000, forking_ms=restore.forking_us / 1000)
        return times


@dataclass(frozen=True)
class DumpResult:
    images: Path
    wall_ms: float  # lxc-checkpoint from launch to exit
    started_at: float  # time.time() when lxc-checkpoint was launched (the freeze follows 40-60 ms later here)
    criu: CriuTimes
    images_bytes: int
    finished_at: float = 0.0  # time.time() when it exited
    frozen_at: float | None = None  # when our action script began the freeze (None: CRIU froze it itself)
    memory_bytes: int = 0  # pre-flight: the memory a dump copies, as /proc showed it (dumpability.py)

    @property
    def freeze_began(self) -> float:
        """Best estimate of when the workload stopped (the start of downtime)."""
        return self.frozen_at or self.started_at


@dataclass(frozen=True)
class RestoreResult:
    wall_ms: float  # lxc-checkpoint -r from launch to exit, and the thaw (see PREFROZEN_MARK)
    finished_at: float  # time.time() when the container was running again
    criu: CriuTimes
    init_pid: int
    started_at: float = 0.0
    pages_done_at: float | None = None  # post-copy: when the last page arrived


@dataclass(frozen=True)
class TlsFiles:
    """This host's TLS identity for the page server: the fleet CA, its own cert and key (PEM)."""

    cacert: Path
    cert: Path
    key: Path
    cacrl: Path | None = None


@dataclass(frozen=True)
class PageServer:
    """Where a post-copy source serves its pages. Each side gives its own `tls` files:
    the source as the server (it accepts any peer certificate its CA signed, CRIU's
    server-side name check being against its own address: the agent makes a one-time CA
    per transfer, corral.pki.one_time_tls, so that is one client), the destination as the
    client (it also checks the source's certificate names `address`)."""

    address: str
    port: int
    tls: TlsFiles | None = None

    def criu_options(self, *, server: bool) -> list[tuple[str, str | None]]:
        opts: list[tuple[str, str | None]] = [("address", self.address), ("port", str(self.port))]
        if self.tls is not None:
            opts += [("tls", None), ("tls-cacert", str(self.tls.cacert)),
                     ("tls-cert", str(self.tls.cert)), ("tls-key", str(self.tls.key))]  # fmt: skip
            if self.tls.cacrl is not None:
                opts.append(("tls-cacrl", str(self.tls.cacrl)))
            if server:
                opts.append(("tls-no-cn-verify", None))
        return opts


@dataclass(frozen=True)
class LazyDumpReady:
    """A post-copy source whose images (without memory) are written and whose page server listens."""

    images: Path
    started_at: float
    ready_at: float
    wall_ms: float
    images_bytes: int


# -- helpers ------------------------------------------------------------------------------


def _criu_config_text(options: Sequence[tuple[str, str | None]]) -> str:
    lines = []
    for key, value in options:
        if value is None:
            lines.append(key)
            continue
        # CRIU's config parser splits on blanks and has no quoting we can rely on.
        if not value or any(c.isspace() for c in value) or "#" in value:
            raise InvalidArgument(f"CRIU option {key} cannot carry {value!r} (blank, '#' or empty)")
        lines.append(f"{key} {value}")
    return "\n".join(lines) + "\n"


def _env(config: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CRIU_CONFIG_FILE"}
    env["PATH"] = DEFAULT_PATH  # lxc-checkpoint finds criu on PATH
    if config is not None:
        env["CRIU_CONFIG_FILE"] = str(config)
    return env


def _dir_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def _tail(path: Path, limit: int = 65536) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def failure_reason(criu_log: Path, output: Path | None = None, lines: int = 6) -> str:
    """Why CRIU failed, in its own words: its last error lines, else the end of its log,
    else what lxc-checkpoint printed."""
    text = _tail(criu_log)
    errors = [line.strip() for line in text.splitlines()
              if line.startswith("Error") and not any(b in line for b in _BENIGN_ERRORS)]  # fmt: skip
    if errors:
        return " | ".join(errors[-lines:])
    tail = [line.strip() for line in text.splitlines() if line.strip()]
    if tail:
        return " | ".join(tail[-lines:])
    out = [line.strip() for line in _tail(output).splitlines() if line.strip()] if output else []
    return " | ".join(out[-lines:]) or f"no log at {criu_log}"


def _init_pid(lxc_path: Path, name: str) -> int:
    """The container's init, via the monitor pid LXC (lxc-start -p) or our restore recorded."""
    try:
        monitor = int((lxc_path / name / "monitor.pid").read_text().strip())
        cmdline = Path(f"/proc/{monitor}/cmdline").read_bytes().replace(b"\0", b" ")
        if f"{lxc_path} {name}".encode() not in cmdline:
            return 0
        children = Path(f"/proc/{monitor}/task/{monitor}/children").read_text().split()
        return int(children[0]) if children else 0
    except (OSError, ValueError):
        return 0


def _cgroup2_root(pid: int) -> str | None:
    """Where the container's cgroup2 tree begins: the root of the cgroup2 mount its init sees
    (e.g. /lxc.payload.NAME), or None (no cgroup2 mount, or the whole hierarchy)."""
    try:
        mounts = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in mounts:
        pre, _, post = line.partition(" - ")
        if post.split()[:1] == ["cgroup2"]:
            root = pre.split()[3]
            return root if root != "/" else None
    return None


def _check_images_dir(images: Path) -> None:
    if images.exists() and any(images.iterdir()):
        raise FailedPrecondition(f"checkpoint directory {images} is not empty")
    images.mkdir(parents=True, exist_ok=True, mode=0o700)


# -- the checkpointer ---------------------------------------------------------------------


class Checkpointer:
    def __init__(self, lxc_path: Path, *, network_lock: str = "", prefreeze: bool = True) -> None:
        """`network_lock`: "" for CRIU's default (iptables), or "nftables" (LiveSupport.network_lock;
        measured here it takes ~25 ms off a restore). `prefreeze`: stopping dumps freeze the
        container through a CRIU action script rather than CRIU's slow loop (see
        Freezer.action_script; ~100 ms less downtime)."""
        if network_lock not in ("", "iptables", "nftables"):
            raise InvalidArgument(f"unknown CRIU network lock {network_lock!r}")
        self.lxc_path = lxc_path
        self.network_lock = network_lock
        self.prefreeze = prefreeze
        self._dirty_tracking: tuple[bool, str] | None = None
        self._cgroups_before_restore: dict[str, set[Path]] = {}

    # -- common ---------------------------------------------------------------

    def _argv(self, name: str, images: Path, *flags: str) -> list[str]:
        return ["lxc-checkpoint", "-P", str(self.lxc_path), "-n", name, "-D", str(images), *flags]

    def _dump_options(self) -> list[tuple[str, str | None]]:
        return [("network-lock", self.network_lock)] if self.network_lock else []

    async def _cgroup_options(self, name: str) -> list[tuple[str, str | None]]:
        """CRIU saves the cgroup2 tree from the container's own root only if told where that is:
        LXC names a root for each v1 hierarchy but, in a hybrid layout, none for cgroup2, and
        CRIU then walks it from init's cgroup. Under systemd (init in /init.scope) the
        container's other cgroup2 directories, empty ones included, are then missing on restore,
        and so are systemd's inotify watches on their cgroup.events ("fsnotify: Unable to open
        .../system-getty.slice/cgroup.events"). `cgroup-root :ROOT` names it (controller "")."""
        pid = await asyncio.to_thread(_init_pid, self.lxc_path, name)
        root = await asyncio.to_thread(_cgroup2_root, pid) if pid else None
        if root is None or any(c.isspace() for c in root) or "#" in root:
            return []
        return [("cgroup-root", f":{root}")]

    def _write_config(self, path: Path, options: Sequence[tuple[str, str | None]]) -> Path | None:
        if not options:
            return None
        path.write_text(_criu_config_text(options))
        return path

    def _require_config(self, name: str) -> None:
        if not (self.lxc_path / name / "config").is_file():
            raise FailedPrecondition(f"container {name!r} has no LXC config at {self.lxc_path / name / 'config'}")

    async def _require_dirty_tracking(self) -> None:
        if self._dirty_tracking is None:
            check = await check_feature("mem_dirty_track")
            self._dirty_tracking = (check.supported, check.detail)
        supported, detail = self._dirty_tracking
        if not supported:
            raise FailedPrecondition(
                "memory pre-copy is not possible on this host: the kernel has no memory dirty tracking "
                f"(criu check --feature mem_dirty_track: {detail}); use stop-and-copy or post-copy"
            )

    async def _prefreeze(self, name: str, images: Path) -> tuple[Freezer | None, list[str]]:
        """The container's freezer and the lxc-checkpoint flags that freeze it fast (see
        Freezer.action_script); (None, []) to leave the freezing to CRIU."""
        if not self.prefreeze:
            return None, []
        pid = await asyncio.to_thread(_init_pid, self.lxc_path, name)
        freezer = await asyncio.to_thread(Freezer.of, pid) if pid else None
        if freezer is None:
            log.info("container's freezer not found, CRIU will freeze", container=name)
            return None, []
        script = images / FREEZE_SCRIPT
        await asyncio.to_thread(write_executable, script, freezer.action_script(images))
        return freezer, ["-A", str(script)]

    async def _undo_killed_dump(self, name: str, freezer: Freezer | None, images: Path) -> None:
        """We killed CRIU mid-dump (deadline, cancellation): it could not undo its freeze and
        network lock as it does when it fails by itself. Its tasks, released from ptrace, run on."""
        self._thaw_after_failure(freezer, images)
        pid = await asyncio.to_thread(_init_pid, self.lxc_path, name)
        if pid:
            await remove_network_lock(pid)

    async def stop_orphaned_dump(self, name: str, images: Path) -> bool:
        """A dump into `images` that an earlier run of this agent started and lost track of (a
        post-copy source's page server: its own session outlives the agent): freeze the
        container first (while serving, CRIU holds the tasks by ptrace in a thawed cgroup),
        then kill that CRIU. True if the container is here and frozen now."""
        pid = await asyncio.to_thread(_init_pid, self.lxc_path, name)
        freezer = await asyncio.to_thread(Freezer.of, pid) if pid else None
        if freezer is None:
            return False
        frozen = await asyncio.to_thread(freezer.freeze)
        for orphan in await asyncio.to_thread(tools_using, images):
            log.warning("stopping a dump an earlier agent left running", container=name, pid=orphan)
            kill_tree(orphan)
        return frozen

    @staticmethod
    async def orphaned_dump_running(images: Path) -> bool:
        """Whether an lxc-checkpoint or criu working on `images` still runs (see stop_orphaned_dump)."""
        return bool(await asyncio.to_thread(tools_using, images))

    async def resume_frozen(self, name: str) -> None:
        """Thaw a container kept frozen (with our network lock, or CRIU's) and unlock its network:
        only once it is known not to run anywhere else."""
        pid = await asyncio.to_thread(_init_pid, self.lxc_path, name)
        freezer = await asyncio.to_thread(Freezer.of, pid) if pid else None
        if freezer is not None:
            freezer.thaw()
        if pid:
            await remove_network_lock(pid)

    async def unlock_network(self, name: str) -> None:
        """Remove every CRIU network lock in the running container's network namespace: after
        restoring images that hold a stale one (a dump of a container whose earlier dump had
        failed with its lock in place: CRIU saves the netns's nftables ruleset, that lock too)."""
        pid = await asyncio.to_thread(_init_pid, self.lxc_path, name)
        if pid:
            await remove_network_lock(pid)

    @staticmethod
    def _thaw_after_failure(freezer: Freezer | None, images: Path) -> None:
        # A failed dump leaves the cgroup as CRIU found it: frozen, if our script froze it.
        if freezer is not None and (images / PREFROZEN_MARK).exists():
            freezer.thaw()

    async def _failed(self, what: str, name: str, images: Path, criu_log: str, child: ToolProcess) -> RuntimeFailure:
        reason = await asyncio.to_thread(failure_reason, images / criu_log, child.output)
        log.warning(f"{what} failed", container=name, exit=child.returncode, reason=reason, log=str(images / criu_log))
        return RuntimeFailure(f"{what} of {name} failed (lxc-checkpoint exit {child.returncode}): {reason}")

    async def _stats(self, images: Path, *, dump: bool) -> CriuTimes:
        try:
            if dump:
                return CriuTimes.of(dump=await asyncio.to_thread(read_dump_stats, images))
            return CriuTimes.of(restore=await asyncio.to_thread(read_restore_stats, images))
        except (StatsFormatError, OSError) as e:  # the figures are a report, not the result
            log.warning("unreadable CRIU stats", images=str(images), error=str(e))
            return CriuTimes()

    # -- dumps -----------------------------------------------------------------

    async def dump(
        self, name: str, images: Path, *, stop: bool = True, lazy: PageServer | None = None,
        parent: Path | None = None, timeout: float = 120, resume_on_failure: bool = True,
    ) -> DumpResult:  # fmt: skip
        """Checkpoint `name` into `images` (an empty or new directory). `stop`: the container
        is stopped after the dump; else it keeps running. `lazy`: post-copy, returns once the
        destination has every page (use start_lazy_dump to act when the images are ready).
        `parent`: a pre-dump to diff against (needs dirty tracking). `resume_on_failure=False`:
        a failed or killed dump leaves the container frozen (and its network locked) instead of
        letting it run on: for a container that must not run here (a post-copy source whose
        destination may have run it)."""
        if lazy is not None:
            if not stop or parent is not None:
                raise InvalidArgument("a lazy (post-copy) dump always stops the container and has no parent")
            lazy_dump = await self.start_lazy_dump(name, images, lazy, timeout=timeout)
            await lazy_dump.images_ready()
            return await lazy_dump.finished()
        self._require_config(name)
        flags = ["-s"] if stop else []
        if parent is not None:
            await self._require_dirty_tracking()
            flags += ["--predump-dir", os.path.relpath(parent, images)]
        return await self._run_dump(name, images, flags, "checkpoint", timeout, resume_on_failure=resume_on_failure)

    async def _run_dump(self, name: str, images: Path, flags: list[str], what: str, timeout: float,
                        criu_log: str = "dump.log", resume_on_failure: bool = True) -> DumpResult:  # fmt: skip
        await asyncio.to_thread(_check_images_dir, images)
        config = self._write_config(images / DUMP_CONFIG, [*self._dump_options(), *await self._cgroup_options(name)])
        freezer, freeze_flags = await self._prefreeze(name, images) if "-s" in flags else (None, [])
        started_at, t0 = time.time(), time.perf_counter()
        try:
            child = await ToolProcess.launch(self._argv(name, images, *flags, *freeze_flags), what=f"{what} of {name}",
                                        output=images / "lxc-checkpoint.out", env=_env(config))  # fmt: skip
            rc = await child.wait(timeout)
        except BaseException:
            if resume_on_failure:
                await asyncio.shield(self._undo_killed_dump(name, freezer, images))
            raise
        wall_ms, finished_at = (time.perf_counter() - t0) * 1000, time.time()
        if rc != 0:
            if resume_on_failure:
                self._thaw_after_failure(freezer, images)
            raise await self._failed(what, name, images, criu_log, child)
        criu = await self._stats(images, dump=True)
        size = await asyncio.to_thread(_dir_bytes, images)
        frozen_at = await asyncio.to_thread(read_frozen_at, images)
        log.info(f"{what} done", container=name, wall_ms=round(wall_ms, 1), criu_paused_ms=criu.paused_ms,
                 images_bytes=size)  # fmt: skip
        return DumpResult(images, wall_ms, started_at, criu, size, finished_at, frozen_at)

    async def inspect(self, name: str) -> dumpability.Dumpability:
        """What CRIU would refuse to dump in the running container `name`, looked for in /proc
        while it runs on (agent/runtime/dumpability.py says what this sees and what not)."""
        self._require_config(name)
        pid = await asyncio.to_thread(_init_pid, self.lxc_path, name)
        try:
            if not pid:
                raise ProcessLookupError(name)
            return await asyncio.to_thread(dumpability.inspect, pid)
        except ProcessLookupError:
            raise FailedPrecondition(f"container {name!r} is not running") from None

    async def trial_dump(self, name: str, scratch: Path, timeout: float = 60) -> DumpResult:
        """Dump while leaving the container running, to learn whether CRIU can dump it and
        how long the pause is; the images are removed afterwards. The workload does pause
        (DumpResult.criu.paused_ms), and its network is locked meanwhile."""
        self._require_config(name)
        await asyncio.to_thread(_check_images_dir, scratch)  # never remove what someone else put there
        try:
            return await self._run_dump(name, scratch, [], "trial checkpoint", timeout)
        finally:
            await asyncio.to_thread(shutil.rmtree, scratch, True)

    async def predump(self, name: str, images: Path, parent: Path | None = None, timeout: float = 60) -> DumpResult:
        """One round of iterative memory pre-copy (the container keeps running)."""
        await self._require_dirty_tracking()
        self._require_config(name)
        flags = ["-p"]
        if parent is not None:
            flags += ["--predump-dir", os.path.relpath(parent, images)]
        return await self._run_dump(name, images, flags, "pre-dump", timeout, criu_log="pre-dump.log")

    async def start_lazy_dump(
        self, name: str, images: Path, server: PageServer, *, timeout: float = 120, keep_source: bool = False
    ) -> LazyDump:
        """Post-copy source, step one: freeze and dump everything but the memory, then serve
        the pages from `server` (address on this host). `timeout` bounds the whole thing.

        `keep_source`: when the page transfer ends, leave the source's tasks frozen (and its
        network locked, by our own lock) instead of letting CRIU kill them; the caller stops
        them once the destination is known to have all its memory, or dumps them whole if it
        is not. Why: CRIU's lazy page server (4.1.1, 4.2.1) ends *successfully* whenever its peer
        closes the connection (criu/page-xfer.c, page_server_serve: "the data were not
        flushed" is checked only when receiving), and `criu lazy-pages` closes it cleanly as
        soon as the restored tasks are gone: so a destination container killed mid-transfer
        made CRIU kill the source too, and the container's memory was lost on both hosts."""
        self._require_config(name)
        await asyncio.to_thread(_check_images_dir, images)
        config = self._write_config(
            images / DUMP_CONFIG,
            [("lazy-pages", None), *server.criu_options(server=True), *self._dump_options(), *await self._cgroup_options(name)],
        )
        if listening(server.port):
            raise FailedPrecondition(f"port {server.port} is already in use on this host")
        freezer, freeze_flags = await self._prefreeze(name, images)
        if keep_source:
            if freezer is None:
                raise FailedPrecondition(f"cannot keep the post-copy source {name}: its freezer cgroup was not found")
            await asyncio.to_thread((images / NETLOCK_RULES).write_text, NETLOCK_RULES_TEXT)
            await asyncio.to_thread(write_executable, images / FREEZE_SCRIPT, freezer.action_script(images, True))
        stop = [] if keep_source else ["-s"]
        started_at = time.time()
        child = await ToolProcess.launch(self._argv(name, images, *stop, *freeze_flags),
                                    what=f"post-copy checkpoint of {name}",
                                    output=images / "lxc-checkpoint.out", env=_env(config))  # fmt: skip
        log.info("post-copy checkpoint started", container=name, address=server.address, port=server.port,
                 tls=server.tls is not None, keep_source=keep_source)  # fmt: skip
        return LazyDump(self, name, images, server, child, started_at, time.perf_counter() + timeout, freezer,
                        keep_source)  # fmt: skip

    # -- restore ---------------------------------------------------------------

    async def restore(
        self, name: str, images: Path, *, lazy_from: PageServer | None = None, timeout: float = 120
    ) -> RestoreResult:
        """Restore `name` from `images` (its LXC config must be in lxc_path/NAME/config).
        Returns once it runs; with `lazy_from` (post-copy), once every page has arrived too."""
        if lazy_from is not None:
            lazy = await self.start_lazy_restore(name, images, lazy_from, timeout=timeout)
            running = await lazy.running()
            return replace(running, pages_done_at=await lazy.finished())
        self._check_restorable(name, images)
        config = self._write_config(images / RESTORE_CONFIG, [])
        started_at, t0 = time.time(), time.perf_counter()
        child = await self._launch_restore(name, images, config)
        return await self._finish_restore(name, images, child, started_at, t0, timeout)

    def _check_restorable(self, name: str, images: Path) -> None:
        self._require_config(name)
        if not (images / "inventory.img").is_file():
            raise FailedPrecondition(f"no checkpoint images at {images}")

    def _restore_rcfile(self, name: str, images: Path) -> list[str]:
        """LXC hands an `lxc.apparmor.profile` to CRIU as `--lsm-profile apparmor:...`, which CRIU
        refuses on a kernel without AppArmor ("apparmor LSM specified but apparmor not supported
        by kernel") although lxc-start ignores it there. Then restore from a copy of the config
        without the AppArmor keys (`lxc-checkpoint --rcfile`)."""
        if APPARMOR_FS.exists():
            return []
        config = (self.lxc_path / name / "config").read_text()
        kept = [line for line in config.splitlines() if not line.strip().startswith("lxc.apparmor.")]
        if len(kept) == len(config.splitlines()):
            return []
        rcfile = images / RESTORE_RCFILE
        rcfile.write_text("\n".join(kept) + "\n")
        return [f"--rcfile={rcfile}"]

    async def _launch_restore(self, name: str, images: Path, config: Path | None) -> ToolProcess:
        flags = await asyncio.to_thread(self._restore_rcfile, name, images)
        self._cgroups_before_restore[name] = set(await asyncio.to_thread(container_cgroup_dirs, name))
        # Output to a file: the restored container's monitor keeps lxc-checkpoint's stderr open.
        return await ToolProcess.launch(self._argv(name, images, "-r", "-d", *flags), what=f"restore of {name}",
                                   output=images / "lxc-restore.out", env=_env(config))  # fmt: skip

    async def _finish_restore(
        self, name: str, images: Path, child: ToolProcess, started_at: float, t0: float, timeout: float
    ) -> RestoreResult:
        try:
            rc = await child.wait(timeout)
        except DeadlineExceeded:
            await self._kill_container(name)
            raise
        if rc != 0:
            failure = await self._failed("restore", name, images, "restore.log", child)
            await self._forget_cgroups(name)
            raise failure
        monitor, init_pid = await asyncio.to_thread(restored_monitor, child.proc.pid)
        if (images / PREFROZEN_MARK).exists():
            await self._thaw_restored(name, init_pid)
        wall_ms, finished_at = (time.perf_counter() - t0) * 1000, time.time()
        if monitor:
            # LxcRuntime.status() reads the monitor's pid from here (lxc-start -p writes it on start).
            with contextlib.suppress(OSError):
                (self.lxc_path / name / "monitor.pid").write_text(f"{monitor}\n")
        criu = await self._stats(images, dump=False)
        log.info("restore done", container=name, wall_ms=round(wall_ms, 1), criu_restore_ms=criu.restore_ms,
                 init_pid=init_pid)  # fmt: skip
        return RestoreResult(wall_ms, finished_at, criu, init_pid, started_at)

    async def _thaw_restored(self, name: str, init_pid: int) -> None:
        freezer = await asyncio.to_thread(Freezer.of, init_pid) if init_pid else None
        if freezer is None:
            await self._kill_container(name)
            raise RuntimeFailure(f"restored {name} from pre-frozen images but cannot find its freezer to thaw it")
        freezer.thaw()

    async def start_lazy_restore(
        self, name: str, images: Path, source: PageServer, *, timeout: float = 120
    ) -> LazyRestore:
        """Post-copy destination: start `criu lazy-pages` (it fetches pages from `source`),
        wait for its socket, then launch the restore. `timeout` bounds the whole thing."""
        self._check_restorable(name, images)
        deadline = time.perf_counter() + timeout
        (images / LAZY_SOCKET).unlink(missing_ok=True)
        config = self._write_config(images / RESTORE_CONFIG, [("lazy-pages", None)])
        started_at, t0 = time.time(), time.perf_counter()
        argv = ["criu", "lazy-pages", "--page-server", "-D", str(images), "-o", LAZY_LOG]
        for key, value in source.criu_options(server=False):
            argv += [f"--{key}"] + ([value] if value is not None else [])
        pages = await ToolProcess.launch(argv, what=f"criu lazy-pages for {name}", output=images / "lazy-pages.out",
                                    env=_env(None))  # fmt: skip
        try:
            async with asyncio.timeout(max(0.0, deadline - time.perf_counter())):
                while not (images / LAZY_SOCKET).exists():
                    if pages.returncode is not None:
                        reason = await asyncio.to_thread(failure_reason, images / LAZY_LOG, pages.output)
                        raise RuntimeFailure(f"criu lazy-pages for {name} exited {pages.returncode}: {reason}")
                    await asyncio.sleep(_POLL)
        except TimeoutError:
            await pages.kill()
            raise DeadlineExceeded(f"criu lazy-pages for {name} did not open its socket in time") from None
        except BaseException:
            await pages.kill()
            raise
        restore = await self._launch_restore(name, images, config)
        return LazyRestore(self, name, images, pages, restore, started_at, t0, deadline)

    async def _kill_container(self, name: str) -> None:
        """Best effort after a failed or hung restore: nothing of it may keep running."""
        argv = ["lxc-stop", "-P", str(self.lxc_path), "-n", name, "-k"]
        child = await ToolProcess.launch(argv, what=f"lxc-stop {name}", output=Path(os.devnull), env=_env(None))
        with contextlib.suppress(DeadlineExceeded):
            await child.wait(30)
        await self._forget_cgroups(name)

    async def _forget_cgroups(self, name: str) -> None:
        """The empty cgroups a failed restore of `name` made (LXC made them, CRIU never filled
        them): left, the next start of `name` lands in lxc.payload.NAME-1. Only those it made:
        the same name's on another lab host, sharing the hierarchies, are not ours."""
        before = self._cgroups_before_restore.pop(name, None)
        if before is None:
            return
        made = set(await asyncio.to_thread(container_cgroup_dirs, name)) - before
        removed = await asyncio.to_thread(remove_empty, sorted(made))
        if removed:
            log.info("empty cgroups of a failed restore removed", container=name, cgroups=len(removed))


class LazyDump:
    """A post-copy source in flight (see Checkpointer.start_lazy_dump)."""

    def __init__(self, owner: Checkpointer, name: str, images: Path, server: PageServer, child: ToolProcess,
                 started_at: float, deadline: float, freezer: Freezer | None,
                 keep_source: bool = False) -> None:  # fmt: skip
        self._owner, self.name, self.images, self.server = owner, name, images, server
        self._child, self.started_at, self._deadline = child, started_at, deadline
        self._freezer = freezer
        self.keep_source = keep_source
        self._ready: LazyDumpReady | None = None

    def _left(self) -> float:
        return max(0.0, self._deadline - time.perf_counter())

    def why_source_not_kept(self) -> str:
        """'' when keeps_source_frozen, else what went wrong, said as it was seen."""
        if self._freezer is None:
            return "the container's freezer cgroup was not found"
        if not (self.images / PREFROZEN_MARK).exists():
            return "the agent's freeze script did not freeze it before CRIU's dump (CRIU froze it itself)"
        if self.keep_source and not (self.images / NETLOCKED).exists():
            return f"its network lock failed: {network_lock_error(self.images)}"
        return ""

    @property
    def keeps_source_frozen(self) -> bool:
        """Whether a failed page transfer leaves the source frozen (known once images_ready()
        returned). Only if our action script froze it: CRIU restores the freezer state it found,
        so had CRIU frozen it itself, a failure would let the source's tasks run again. With
        keep_source, its network must also be locked by us (CRIU lifts its own lock before it
        serves the pages)."""
        if self._freezer is None or not (self.images / PREFROZEN_MARK).exists():
            return False
        return not self.keep_source or (self.images / NETLOCKED).exists()

    async def images_ready(self) -> LazyDumpReady:
        """Wait until the images (without memory) are written and the page server listens:
        copy the images to the destination and start its restore now."""
        if self._ready is not None:
            return self._ready
        try:
            async with asyncio.timeout(self._left()):
                while not listening(self.server.port):
                    if self._child.returncode is not None:
                        # CRIU failed before serving pages (and unlocked the network): the source goes on.
                        await self._resume_after_failure()
                        raise await self._owner._failed("post-copy checkpoint", self.name, self.images,
                                                        "dump.log", self._child)  # fmt: skip
                    await asyncio.sleep(_POLL)
        except TimeoutError:
            await self._child.kill()
            await self._resume_after_failure()
            raise DeadlineExceeded(f"post-copy checkpoint of {self.name}: page server not listening in time") from None
        except asyncio.CancelledError:
            await self._child.kill()
            await self._resume_after_failure()
            raise
        ready_at = time.time()
        size = await asyncio.to_thread(_dir_bytes, self.images)
        self._ready = LazyDumpReady(self.images, self.started_at, ready_at, (ready_at - self.started_at) * 1000, size)
        log.info("post-copy images ready", container=self.name, ms=round(self._ready.wall_ms, 1), images_bytes=size)
        return self._ready

    async def _resume_after_failure(self) -> None:
        if self.keep_source:
            await self.resume_source()  # our own lock may be in place too
        else:
            Checkpointer._thaw_after_failure(self._freezer, self.images)

    async def finished(self) -> DumpResult:
        """Wait until the destination has every page and the source container has stopped
        (keep_source: until the page server's peer has closed; the source stays frozen).
        Cancelling this leaves a keep_source CRIU serving (it runs in a session of its own)."""
        if self.keep_source:
            try:
                async with asyncio.timeout(self._left()):
                    rc = await self._child.proc.wait()
            except TimeoutError:
                await self.abort()
                raise DeadlineExceeded(f"post-copy page transfer of {self.name} not done in time (stopped)") from None
        else:
            rc = await self._child.wait(self._left())
        finished_at = time.time()
        if rc != 0:
            raise await self._owner._failed("post-copy checkpoint", self.name, self.images, "dump.log", self._child)
        # No CRIU figures: in lazy mode its page server re-initialises the dump stats (cr_page_server
        # calls init_stats again, CRIU 4.1.1 and 4.2.1), so stats-dump holds zeros and a bogus frozen time.
        size = self._ready.images_bytes if self._ready else await asyncio.to_thread(_dir_bytes, self.images)
        wall_ms = (finished_at - self.started_at) * 1000
        frozen_at = await asyncio.to_thread(read_frozen_at, self.images)
        log.info("post-copy checkpoint done", container=self.name, wall_ms=round(wall_ms, 1))
        return DumpResult(self.images, wall_ms, self.started_at, CriuTimes(), size, finished_at, frozen_at)

    async def abort(self) -> None:
        """Kill CRIU, the source's tasks left frozen: the caller knows whether the destination
        ran, and so whether to resume_source() or to stop the source container. (While it
        serves pages CRIU holds the tasks by ptrace in a thawed cgroup: killing it alone
        would let them run. So the cgroup is frozen first.)"""
        if self._freezer is not None and self._child.returncode is None:
            if not await asyncio.to_thread(self._freezer.freeze):
                log.warning("could not freeze the post-copy source before stopping CRIU", container=self.name)
        await self._child.kill()

    async def resume_source(self) -> None:
        """After a failed post-copy (finished() raised), let the source run on as it was: only
        if its copy on the destination never ran or has been killed (at most one copy).
        CRIU leaves it half-undone: the cgroup frozen (if we pre-froze it; else CRIU resumed
        the tasks itself) and, in every case, its network lock still in place (measured: an
        nftables table `CRIU-...` dropping all traffic in the container's netns)."""
        Checkpointer._thaw_after_failure(self._freezer, self.images)
        pid = await asyncio.to_thread(_init_pid, self._owner.lxc_path, self.name)
        if pid:
            await remove_network_lock(pid)


class LazyRestore:
    """A post-copy destination in flight (see Checkpointer.start_lazy_restore)."""

    def __init__(self, owner: Checkpointer, name: str, images: Path, pages: ToolProcess, restore: ToolProcess,
                 started_at: float, t0: float, deadline: float) -> None:  # fmt: skip
        self._owner, self.name, self.images = owner, name, images
        self._pages, self._restore = pages, restore
        self.started_at, self._t0, self._deadline = started_at, t0, deadline
        self._running: RestoreResult | None = None

    def _left(self) -> float:
        return max(0.0, self._deadline - time.perf_counter())

    async def running(self) -> RestoreResult:
        """Wait until the container runs on this host (its memory still arriving)."""
        if self._running is not None:
            return self._running
        restore = asyncio.ensure_future(self._owner._finish_restore(
            self.name, self.images, self._restore, self.started_at, self._t0, self._left()
        ))  # fmt: skip
        try:
            # If criu lazy-pages fails first (say, the source refused it), the restore would only
            # hang waiting for its tasks: end it now rather than at the deadline.
            pages_ended = asyncio.ensure_future(self._pages.proc.wait())
            await asyncio.wait([restore, pages_ended], return_when=asyncio.FIRST_COMPLETED)
            pages_ended.cancel()
            if not restore.done() and self._pages.returncode not in (None, 0):
                reason = await asyncio.to_thread(failure_reason, self.images / LAZY_LOG, self._pages.output)
                await self._restore.kill()
                restore.cancel()
                await self._owner._kill_container(self.name)
                raise RuntimeFailure(f"post-copy restore of {self.name} failed, criu lazy-pages exited "
                                     f"{self._pages.returncode}: {reason}")  # fmt: skip
            self._running = await restore
        except BaseException:
            restore.cancel()
            await self._pages.kill()
            raise
        return self._running

    async def finished(self) -> float:
        """Wait until every page has arrived; returns when (time.time()). If the transfer
        fails the restored container is killed: its missing memory cannot come back.
        (Cancelling this, as an agent that stops does, leaves both running: `criu lazy-pages`
        has a session of its own. Note that it also ends well, exit 0, when the restored
        tasks are all gone: the caller checks that the container still runs.)"""
        await self.running()
        try:
            async with asyncio.timeout(self._left()):
                rc = await self._pages.proc.wait()
        except TimeoutError:
            await self._pages.kill()
            await self._owner._kill_container(self.name)
            raise DeadlineExceeded(f"post-copy page transfer for {self.name} not done in time (killed)") from None
        done_at = time.time()
        if rc != 0:
            reason = await asyncio.to_thread(failure_reason, self.images / LAZY_LOG, self._pages.output)
            await self._owner._kill_container(self.name)
            raise RuntimeFailure(f"post-copy page transfer for {self.name} failed (exit {rc}): {reason}")
        log.info("post-copy pages all here", container=self.name, ms=round((done_at - self.started_at) * 1000, 1))
        return done_at

    async def abort(self) -> None:
        await self._restore.kill()
        await self._pages.kill()
        await self._owner._kill_container(self.name)

