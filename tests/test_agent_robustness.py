"""The agent stays up and keeps its host tidy and private when things go wrong around it:
damaged record files, unexpected errors in its heartbeat, strangers on its SSH port or in
/tmp, leftovers of failed migrations, a hung shared storage (standalone: no lab)."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import shutil
import stat
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from agent import main as agent_main
from agent import membership as membership_module
from agent import records as records_module
from agent.containers import ContainerManager
from agent.membership import Membership
from agent.migration import KEPT_MARK, Migrations
from agent.postcopy import PagesState
from agent.records import ContainerRecord, RecordStore
from agent.runtime.checkpoint import DUMP_CONFIG
from agent.runtime.lxc import LxcRuntime
from agent.storage import ownership
from agent.storage.dir import DirStorage
from agent.storage.ownership import volume_lock
from agent.transfer import client as transfer_client
from agent.transfer import server as transfer_server
from agent.transfer.client import PushTarget, rsync_push
from agent.transfer.grants import GrantRegistry
from agent.transfer.keys import new_operation_keypair
from agent.transfer.server import TransferServer
from corral.config import TlsFiles
from corral.errors import DeadlineExceeded, PermissionDenied, RuntimeFailure
from corral.model import ContainerState, Limits, NetworkAttachment


def _record(name: str) -> ContainerRecord:
    return ContainerRecord(name, "busybox", "dir", Limits(memory_bytes=64 << 20), NetworkAttachment(), 1.0)


# -- M8: damaged record files ------------------------------------------------------------


def _damaged_store(tmp_path: Path) -> RecordStore:
    store = RecordStore(tmp_path / "state")
    store.save(_record("good"))
    (store.dir / "empty.json").write_text("")
    (store.dir / "garbage.json").write_bytes(b"\xff\xfe not json")
    (store.dir / "partial.json").write_text('{"name": "partial"}')
    (store.dir / "list.json").write_text("[1, 2]")
    (store.dir / "other.json").write_text(_record("elsewhere").to_json())  # not its own name
    (store.dir / "adir.json").mkdir()  # unreadable as a file
    return store


class _Log:
    """Stands in for a module's structlog logger: records what was logged."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict]] = []

    def __getattr__(self, level: str):
        return lambda event, *args, **kw: self.events.append((level, event, kw))


def test_a_damaged_record_file_is_reported_and_skipped(tmp_path, monkeypatch):
    logged = _Log()
    monkeypatch.setattr(records_module, "log", logged)
    store = _damaged_store(tmp_path)
    assert [r.name for r in store.all()] == ["good"]
    reported = sorted(kw["path"] for _, event, kw in logged.events if event == "unreadable container record skipped")
    assert reported == sorted(str(store.dir / f"{bad}.json") for bad in ("empty", "garbage", "partial", "list", "other", "adir"))
    store.all()
    assert len(logged.events) == len(reported)  # once per version of a file, not at every heartbeat
    (store.dir / "empty.json").write_text("{")
    store.all()
    assert len(logged.events) == len(reported) + 1  # changed: reported again
    assert (store.dir / "garbage.json").exists()  # never deleted: the operator decides
    with pytest.raises(RuntimeFailure, match=r"record of 'partial' on this host is unreadable .*partial.json"):
        store.load("partial")
    assert store.load("absent") is None


async def test_reconcile_and_list_go_on_past_a_damaged_record(tmp_path):
    store = _damaged_store(tmp_path)
    runtime = LxcRuntime(tmp_path / "lxc")
    for name in ("good", "partial"):
        runtime.container_dir(name).mkdir(parents=True)
        runtime.config_file(name).write_text("lxc.uts.name = x\n")
    manager = ContainerManager(node="n1", runtime=runtime, storages={"dir": DirStorage(tmp_path / "storage")},
                               records=store, bridge="br0", template_cache=tmp_path / "templates", cgroups=None)  # fmt: skip
    containers = await manager.reconcile()
    assert [(c.name, c.state) for c in containers] == [("good", ContainerState.STOPPED)]
    assert [c.name for c in await manager.list()] == ["good"]
    assert (store.dir / "partial.json").exists() and runtime.exists("partial")  # left for the operator


async def test_heartbeat_loop_survives_unexpected_errors(tmp_path, monkeypatch):
    for name in ("ca", "cert", "key"):
        (tmp_path / name).write_text("not a PEM")
    monkeypatch.setattr(membership_module, "RETRY_DELAY", 0.01)
    member = Membership("127.0.0.1:9", TlsFiles(tmp_path / "ca", tmp_path / "cert", tmp_path / "key"),
                        facts=None, containers=None, interval=1.0)  # fmt: skip
    failures = [KeyError("limits"), ValueError("bad lxc-info line"), OSError(5, "Input/output error")]

    async def register(stub):
        if failures:
            raise failures.pop(0)
        member.registered.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(member, "_register", register)
    task = asyncio.ensure_future(member.run())
    try:
        async with asyncio.timeout(5):
            await member.registered.wait()
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# -- M7: the push sessions' directory ------------------------------------------------------


def _push_target() -> PushTarget:
    private, public = new_operation_keypair()
    _, host_key = new_operation_keypair()
    return PushTarget("127.0.0.1:7702", "op-abc", host_key, private)


def _untrusted_roots(tmp_path: Path):
    open_dir = tmp_path / "world-writable"
    open_dir.mkdir()
    os.chmod(open_dir, 0o1777)
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, 65534, 65534)  # nobody's
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(mine)
    plain = tmp_path / "file"
    plain.write_text("")
    return {"world-writable": open_dir, "foreign": foreign, "symlink": link, "file": plain}, mine


def test_push_sessions_never_use_a_directory_someone_else_could_control(tmp_path, monkeypatch):
    roots, behind_link = _untrusted_roots(tmp_path)
    for why, root in roots.items():
        monkeypatch.setattr(transfer_client, "SESSION_ROOT", root)
        with pytest.raises(PermissionDenied, match="refusing to keep the transfer's keys there"):
            with transfer_client.session_files(_push_target()):
                pass
        assert root.is_file() or not any(root.iterdir()), why  # nothing written into it
    assert not any(behind_link.iterdir())


@pytest.fixture
def short_dir():
    """pytest's tmp_path is too long for a ControlPath (a unix socket's path)."""
    path = Path(tempfile.mkdtemp(prefix="crl-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_push_sessions_are_private_and_under_the_agents_state_dir(short_dir, monkeypatch):
    monkeypatch.setattr(transfer_client, "SESSION_ROOT", transfer_client.SESSION_ROOT)  # restored afterwards
    state = short_dir / "state"
    state.mkdir()
    transfer_client.use_session_root(state / "push")
    assert stat.S_IMODE(os.lstat(state / "push").st_mode) == 0o700
    with transfer_client.session_files(_push_target()) as (key, known_hosts, control):
        assert key.parent.parent == state / "push" and control == key.parent / "cm"
        assert stat.S_IMODE(os.lstat(key.parent).st_mode) == 0o700
        assert stat.S_IMODE(os.lstat(key).st_mode) == 0o600
    # A ControlPath too long for a unix socket: pushes go on without a shared connection.
    deep = state / ("d" * 100)
    deep.mkdir()
    transfer_client.use_session_root(deep / "push")
    with transfer_client.session_files(_push_target()) as (key, known_hosts, control):
        assert control is None and key.is_file()


# -- M12: shared-storage locks off the event loop ------------------------------------------

_HOLDER = """
import fcntl, os, select, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
select.select([sys.stdin], [], [], 5)  # until the test closes our stdin (or 5 s: a frozen test loop)
"""


class _Ticker:
    """Counts how often the event loop gets to run something else, and its longest stall."""

    def __init__(self) -> None:
        self.ticks, self.longest = 0, 0.0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(0.01)
            now = loop.time()
            self.ticks, self.longest, last = self.ticks + 1, max(self.longest, now - last), now


async def _hold_lock(path: Path) -> asyncio.subprocess.Process:
    holder = await asyncio.create_subprocess_exec(sys.executable, "-c", _HOLDER, str(path),
                                                  stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)  # fmt: skip
    assert await asyncio.wait_for(holder.stdout.readline(), 10) == b"locked\n"
    return holder


async def _release(holder: asyncio.subprocess.Process) -> None:
    holder.stdin.close()
    await asyncio.wait_for(holder.wait(), 10)


async def test_waiting_for_a_volume_lock_held_elsewhere_leaves_the_loop_free(tmp_path):
    path = tmp_path / "v.img"
    path.write_bytes(b"")
    holder = await _hold_lock(path)
    ticker = _Ticker()
    ticking = asyncio.ensure_future(ticker.run())
    try:
        entered = asyncio.Event()

        async def waiter():
            async with volume_lock(path, timeout=10):
                entered.set()

        task = asyncio.ensure_future(waiter())
        await asyncio.sleep(0.5)
        assert not entered.is_set()  # still excluded by the other process
        await _release(holder)
        await asyncio.wait_for(task, 5)
        assert entered.is_set()
    finally:
        ticking.cancel()
        if holder.returncode is None:
            holder.kill()
    assert ticker.ticks >= 20 and ticker.longest < 0.3


async def test_a_volume_lock_stuck_in_the_kernel_never_freezes_the_agent(tmp_path, monkeypatch):
    """A hung NFS server makes flock (or open, fstat) block: here a flock made to block
    while another process holds the lock. The loop goes on, the request gives up in time,
    and the lock is not left held once the stuck call returns."""
    path = tmp_path / "v.img"
    path.write_bytes(b"")
    real_flock = fcntl.flock
    monkeypatch.setattr(ownership.fcntl, "flock", lambda fd, op: real_flock(fd, op & ~fcntl.LOCK_NB))
    monkeypatch.setattr(ownership, "STUCK_GRACE", 0.5, raising=False)
    holder = await _hold_lock(path)
    ticker = _Ticker()
    ticking = asyncio.ensure_future(ticker.run())
    try:
        with pytest.raises(DeadlineExceeded, match="did not answer"):
            async with volume_lock(path, timeout=0.2):
                pass
        assert ticker.ticks >= 30 and ticker.longest < 0.3
        await _release(holder)  # the stuck flock returns now, in its thread, and lets go
        monkeypatch.setattr(ownership.fcntl, "flock", real_flock)
        async with volume_lock(path, timeout=5):
            pass
    finally:
        ticking.cancel()
        if holder.returncode is None:
            holder.kill()


# -- M10: strangers on the SSH transfer port ------------------------------------------------


async def _flood(port: int, source: str, count: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """Raw TCP connections that never log in (they do not even send a banner)."""
    return [await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)) for _ in range(count)]


async def _closed_by_server(reader: asyncio.StreamReader, wait: float) -> bool:
    try:
        async with asyncio.timeout(wait):
            while await reader.read(4096):
                pass
        return True
    except TimeoutError:  # (an OSError too: first)
        return False
    except OSError:  # reset
        return True


async def _push_through(server: TransferServer, grants: GrantRegistry, src: Path) -> None:
    private, public = new_operation_keypair()
    grant = grants.authorize(f"op{os.urandom(4).hex()}", public, 60)
    target = PushTarget(server.address, grant.user, server.host_key, private)
    await rsync_push(src, target, "rootfs", timeout=60)
    assert (grant.staging / "rootfs" / "f").read_text() == "payload"


async def test_transfer_endpoint_caps_unauthenticated_connections_and_still_serves_grants(short_dir, monkeypatch):
    monkeypatch.setattr(transfer_server, "LOGIN_TIMEOUT", 2.0)
    grants = GrantRegistry(short_dir / "staging")
    server = TransferServer("127.0.0.1", 0, short_dir / "hostkey", grants)
    await server.start()
    src = short_dir / "src"
    src.mkdir()
    (src / "f").write_text("payload")
    flood = []
    try:
        # One address opening many: held to its own share, and a grant from elsewhere gets through.
        flood += await _flood(server.port, "127.0.0.2", 40)
        closed = await asyncio.gather(*(_closed_by_server(r, 1.0) for r, _ in flood))
        assert sum(not c for c in closed) == transfer_server.MAX_PREAUTH_PER_PEER
        assert server.connection_count == transfer_server.MAX_PREAUTH_PER_PEER
        await _push_through(server, grants, src)
        # Many addresses: the total waiting to log in is capped too.
        for i in range(3, 3 + 2 * transfer_server.MAX_PREAUTH // transfer_server.MAX_PREAUTH_PER_PEER):
            flood += await _flood(server.port, f"127.0.0.{i}", transfer_server.MAX_PREAUTH_PER_PEER)
        await asyncio.sleep(0.3)
        assert server.connection_count <= transfer_server.MAX_PREAUTH + 1  # + the push's shared connection
        # The login timeout ends them all; the endpoint serves a grant as before.
        assert all(await asyncio.gather(*(_closed_by_server(r, 5.0) for r, _ in flood)))
        assert server.connection_count <= 1
        await _push_through(server, grants, src)
    finally:
        for _, writer in flood:
            writer.close()
        await server.close()


def test_refused_logins_are_logged_at_most_once_per_interval(monkeypatch):
    logged = _Log()
    monkeypatch.setattr(transfer_server, "log", logged)
    quiet = transfer_server._QuietWarnings(interval=60)
    for i in range(1000):
        quiet.warning("transfer login refused", user=f"op-{i}")
    quiet.warning("transfer connection refused", peer="x")
    assert [event for _, event, _ in logged.events] == ["transfer login refused", "transfer connection refused"]


# -- M11: leftovers of failed and finished operations ---------------------------------------


class _Restored:
    wall_ms = 1.0


class _FakeCheckpointer:
    def __init__(self) -> None:
        self.restored: list[tuple[str, Path]] = []

    async def restore(self, name: str, images: Path):
        self.restored.append((name, images))
        return _Restored()


def _migrations(root: Path, running: set[str] = frozenset()) -> tuple[Migrations, ContainerManager]:
    store = RecordStore(root / "state")
    runtime = LxcRuntime(root / "lxc")
    for name in ("web", "db"):
        store.save(_record(name))
        runtime.container_dir(name).mkdir(parents=True)
        runtime.config_file(name).write_text("lxc.uts.name = x\n")
    runtime.running_names = lambda: set(running)
    manager = ContainerManager(node="n1", runtime=runtime, storages={"dir": DirStorage(root / "storage")},
                               records=store, bridge="br0", template_cache=root / "templates", cgroups=None)  # fmt: skip
    grants = GrantRegistry(root / "state" / "staging")
    return Migrations(manager, None, grants, _FakeCheckpointer(), root / "state"), manager


def _dump(directory: Path, *, container: str | None = None, lazy: bool = False, kept: bool = False) -> Path:
    directory.mkdir(parents=True)
    (directory / "inventory.img").write_bytes(b"\0" * 64)
    (directory / "pages-1.img").write_bytes(b"\0" * 4096)
    if lazy:
        (directory / DUMP_CONFIG).write_text("lazy-pages\n")
    if kept:
        (directory / KEPT_MARK).write_text("{}\n")
    if container is not None:
        (directory.parent / f"{directory.name}.json").write_text(json.dumps({"container": container}))
    return directory


async def test_agent_start_sweeps_what_no_operation_can_use_and_keeps_the_rest(short_dir):
    migrations, _ = _migrations(short_dir, running={"web"})
    ck, staging = migrations.checkpoints_root, migrations.staging_root
    keep = [
        _dump(ck / "kept", container="db", kept=True), ck / "kept-lazy", ck / "kept-tls", ck / "kept.json",  # --from-checkpoint
        _dump(ck / "served", container="web", lazy=True), ck / "served-tls",  # a post-copy an earlier run served
        _dump(ck / "rollback", container="db"), ck / "rollback.json",  # db is here, stopped: a rollback restores it
        _dump(ck / "legacy"),  # no note of its container: cannot tell, kept
        ck / "fresh-predump", ck / "fresh.json",  # web runs: maybe still pre-copying
    ]
    gone = [
        _dump(ck / "moved", container="elsewhere"), ck / "moved.json", ck / "moved-tls",  # released: lives elsewhere
        _dump(ck / "resumed", container="web"), ck / "resumed.json", ck / "resumed-predump",  # runs again here
        ck / "x-trial",  # a trial dump's scratch
        ck / "target-tls",  # a destination's one-time TLS, its op long over
        ck / "old-predump", ck / "old.json",  # pre-dumps a day old
        staging / "op1", staging / ".expired-op2-1234",
    ]
    for path in keep + gone:
        if not path.exists():
            if path.suffix == ".json":
                path.write_text(json.dumps({"container": "web"}))
            else:
                (path / "1").mkdir(parents=True)
                (path / "1" / "pages-1.img").write_bytes(b"x")
    (ck / "old.json").write_text(json.dumps({"container": "web"}))
    day_ago = time.time() - 2 * 24 * 3600
    os.utime(ck / "old-predump", (day_ago, day_ago))
    await migrations.sweep_leftovers()
    assert [p.name for p in gone if p.exists()] == []
    assert [p.name for p in keep if not p.exists()] == []


async def test_an_expired_grant_loses_its_staging_but_a_renewed_or_busy_one_does_not(short_dir):
    migrations, _ = _migrations(short_dir)
    grants = migrations.grants
    _, public = new_operation_keypair()
    for op in ("expiring", "renewed", "pulling"):
        staging = grants.authorize(op, public, 0.2).staging
        (staging / "rootfs").mkdir()
        (staging / "rootfs" / "big").write_bytes(b"x" * 4096)
    grants.authorize("renewed", public, 60)
    migrations._targets["pulling"] = SimpleNamespace(state=PagesState.MOVING)  # a post-copy restore's pages arriving
    await asyncio.sleep(0.3)
    assert await migrations.sweep_expired() == ["expiring"]
    assert not (migrations.staging_root / "expiring").exists() and grants.lookup("op-expiring") is None
    assert (migrations.staging_root / "renewed" / "rootfs" / "big").exists()
    assert (migrations.staging_root / "pulling" / "rootfs" / "big").exists()
    migrations._targets["pulling"] = SimpleNamespace(state=PagesState.DONE)
    assert await migrations.sweep_expired() == ["pulling"]
    assert not (migrations.staging_root / "pulling").exists()
    assert [p.name for p in migrations.staging_root.iterdir()] == ["renewed"]


async def test_a_rolled_back_source_drops_its_dump_once_it_runs_again(short_dir, monkeypatch):
    migrations, manager = _migrations(short_dir)
    ck = migrations.checkpoints_root
    images = _dump(ck / "op7", container="db")
    (ck / "op7-predump" / "1").mkdir(parents=True)

    async def get(name, wait_idle=False):
        return name

    monkeypatch.setattr(manager, "get", get)
    assert (await migrations.restore("op7", "db", local=True))[0] == "db"
    assert migrations.checkpointer.restored == [("db", images)]
    assert sorted(p.name for p in ck.iterdir()) == []
    # A destination's restore (received images) leaves staging to FinishReceive.
    received = _dump(migrations.staging_root / "op8" / "checkpoint")
    await migrations.restore("op8", "db", local=False)
    assert received.exists()


# -- M13: privileged containers' files are root's alone -------------------------------------


async def test_container_and_state_directories_are_private(tmp_path):
    dirs = {key: tmp_path / key for key in ("lxc_path", "state_dir", "storage_dir", "template_cache")}
    dirs["lxc_path"].mkdir(mode=0o755)  # made open by an older agent
    agent_main._make_private_dirs(SimpleNamespace(**dirs))
    for key, path in dirs.items():
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o700, key
    storage = DirStorage(dirs["storage_dir"])
    rootfs = await storage.create_volume("web", 0)
    assert stat.S_IMODE(os.lstat(rootfs.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.lstat(rootfs).st_mode) == 0o755  # the container's / as it expects it
