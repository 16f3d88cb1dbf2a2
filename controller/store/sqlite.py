"""SQLite state backend: embedded, one file, durable (WAL + synchronous=FULL).

One connection, so transactions are serialized by a lock: a coroutine's change is
never mixed into another's transaction, and a failed one rolls back only itself
(BEGIN IMMEDIATE ... COMMIT, autocommit otherwise). See base.py for the contract.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import os
import sqlite3
from pathlib import Path
from typing import AsyncIterator, Awaitable, TypeVar

import aiosqlite

from controller.model import Operation
from corral.errors import AlreadyExists, Conflict, FailedPrecondition, NotFound
from corral.model import Container, ContainerState, DesiredState, Limits, NetworkAttachment, NodeFacts

SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY,
    facts TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS containers (
    name TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    template TEXT NOT NULL,
    state TEXT NOT NULL,
    limits TEXT NOT NULL,
    network TEXT NOT NULL,
    storage TEXT NOT NULL,
    created_at REAL NOT NULL,
    message TEXT NOT NULL DEFAULT '',
    volume_generation INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS containers_node ON containers(node);
CREATE TABLE IF NOT EXISTS operations (
    id TEXT PRIMARY KEY,
    container TEXT NOT NULL,
    state TEXT NOT NULL,
    data TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS operations_container ON operations(container);
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS unmanaged (
    node TEXT NOT NULL,
    name TEXT NOT NULL,
    network TEXT NOT NULL,
    seen_at REAL NOT NULL,
    PRIMARY KEY (node, name)
);
"""

# Columns added since the first schema (stores made by older versions get them on open).
_ADDED_COLUMNS = {
    "containers": [
        ("volume_generation", "INTEGER NOT NULL DEFAULT 0"),
        ("desired_state", "TEXT NOT NULL DEFAULT 'stopped'"),
        ("observed_at", "REAL NOT NULL DEFAULT 0"),
        ("init_pid", "INTEGER NOT NULL DEFAULT 0"),
        ("revision", "INTEGER NOT NULL DEFAULT 1"),
        ("in_doubt", "TEXT NOT NULL DEFAULT ''"),
        ("doubt_nodes", "TEXT NOT NULL DEFAULT '[]'"),
        ("ha", "INTEGER NOT NULL DEFAULT 0"),
        ("ha_priority", "INTEGER NOT NULL DEFAULT 0"),
        ("ha_group", "TEXT NOT NULL DEFAULT ''"),
        ("ha_relocations", "INTEGER NOT NULL DEFAULT 0"),
        ("ha_failed", "TEXT NOT NULL DEFAULT ''"),
        ("constraints", "TEXT NOT NULL DEFAULT '[]'"),
        ("placement_group", "TEXT NOT NULL DEFAULT ''"),
    ],
    "nodes": [("cordoned", "INTEGER NOT NULL DEFAULT 0")],
    "operations": [("revision", "INTEGER NOT NULL DEFAULT 0")],
}

_ACTIVE = ("pending", "running", "rolling-back")
# Desired-state columns: written only by update_container (compare-and-set on revision).
_SPEC = ("node", "template", "limits", "network", "storage", "created_at", "message", "volume_generation",
         "desired_state", "in_doubt", "doubt_nodes", "ha", "ha_priority", "ha_group", "ha_relocations",
         "ha_failed", "constraints", "placement_group")  # fmt: skip
_COLUMNS = ("name", "state", "init_pid", "observed_at", "revision") + _SPEC


T = TypeVar("T")


async def _to_the_end(statement: Awaitable[T]) -> T:
    """Await `statement`; if cancelled meanwhile, wait for it to finish first, then re-raise, so that
    the connection's transaction state is what the caller's error handling reads."""
    task = asyncio.ensure_future(statement)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await task
        raise


class _Writer:
    """The writes of one transaction (the caller holds the store's lock inside BEGIN)."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db

    async def put_node(self, facts: NodeFacts) -> None:
        await self.db.execute(
            "INSERT INTO nodes(name, facts) VALUES(?, ?) ON CONFLICT(name) DO UPDATE SET facts=excluded.facts",
            (facts.name, json.dumps(dataclasses.asdict(facts))),
        )

    async def get_container(self, name: str) -> Container | None:
        async with self.db.execute(f"SELECT {', '.join(_COLUMNS)} FROM containers WHERE name=?", (name,)) as cur:
            row = await cur.fetchone()
        return _container(row) if row else None

    async def insert_container(self, container: Container) -> Container:
        record = dataclasses.replace(container, revision=1)
        values = _values(record)
        try:
            await self.db.execute(
                f"INSERT INTO containers({', '.join(_COLUMNS)}) VALUES({', '.join('?' * len(_COLUMNS))})",
                [values[c] for c in _COLUMNS],
            )
        except sqlite3.IntegrityError:
            raise AlreadyExists(f"container {container.name!r} already exists") from None
        await self.db.execute("DELETE FROM unmanaged WHERE name=?", (container.name,))
        return record

    async def update_container(self, container: Container) -> Container:
        values = _values(container)
        cur = await self.db.execute(
            f"UPDATE containers SET {', '.join(c + '=?' for c in _SPEC)}, revision=revision+1"
            " WHERE name=? AND revision=?",
            [values[c] for c in _SPEC] + [container.name, container.revision],
        )
        if cur.rowcount != 1:
            await self._stale(container.name, container.revision)
        return dataclasses.replace(container, revision=container.revision + 1)

    async def observe_container(
        self, name: str, node: str, state: ContainerState, init_pid: int, at: float, message: str | None = None
    ) -> bool:
        sets, args = "state=?, init_pid=?, observed_at=?", [state.value, init_pid, at]
        if message is not None:
            sets, args = sets + ", message=?", args + [message]
        cur = await self.db.execute(
            f"UPDATE containers SET {sets} WHERE name=? AND node=? AND observed_at<=?", args + [name, node, at]
        )
        return cur.rowcount == 1

    async def delete_container(self, name: str, revision: int) -> None:
        cur = await self.db.execute("DELETE FROM containers WHERE name=? AND revision=?", (name, revision))
        if cur.rowcount != 1:
            await self._stale(name, revision)

    async def _stale(self, name: str, revision: int) -> None:
        current = await self.get_container(name)
        if current is None:
            raise NotFound(f"container {name!r} no longer exists")
        raise Conflict(f"container {name!r} was changed meanwhile (revision {current.revision}, "
                       f"not {revision}): try again")  # fmt: skip

    async def put_operation(self, op: Operation) -> None:
        await self.db.execute(
            "INSERT INTO operations(id, container, state, data, created_at, revision) VALUES(?, ?, ?, ?, ?, ?)"
            " ON CONFLICT(id) DO UPDATE SET state=excluded.state, data=excluded.data, revision=excluded.revision"
            " WHERE excluded.revision > operations.revision",
            (op.id, op.container, op.state.value, op.to_json(), op.created_at, op.revision),
        )

    async def put_unmanaged(self, node: str, name: str, network: NetworkAttachment, seen_at: float) -> None:
        await self.db.execute(
            "INSERT INTO unmanaged(node, name, network, seen_at) VALUES(?, ?, ?, ?)"
            " ON CONFLICT(node, name) DO UPDATE SET network=excluded.network, seen_at=excluded.seen_at",
            (node, name, json.dumps(dataclasses.asdict(network)), seen_at),
        )

    async def forget_unmanaged(self, node: str, name: str) -> None:
        await self.db.execute("DELETE FROM unmanaged WHERE node=? AND name=?", (node, name))

    async def acquire_lease(self, name: str, holder: str, ttl: float, now: float) -> tuple[str, float]:
        async with self.db.execute("SELECT holder, expires FROM leases WHERE name=?", (name,)) as cur:
            row = await cur.fetchone()
        if row is None or row[0] == holder or row[1] <= now:
            await self.db.execute(
                "INSERT INTO leases(name, holder, expires) VALUES(?, ?, ?)"
                " ON CONFLICT(name) DO UPDATE SET holder=excluded.holder, expires=excluded.expires",
                (name, holder, now + ttl),
            )
            return holder, now + ttl
        return row[0], row[1]


class SqliteStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.changes = 0  # committed transactions since open (Store.changes)
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._lock_fd: int | None = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("store not opened")
        return self._db

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._hold_store()
        # isolation_level=None: no implicit transactions; every change is an explicit BEGIN..COMMIT.
        self._db = await aiosqlite.connect(self.path, isolation_level=None)
        await self.db.execute("PRAGMA journal_mode=WAL")
        await self.db.execute("PRAGMA synchronous=FULL")
        for statement in filter(str.strip, SCHEMA.split(";")):
            await self.db.execute(statement)
        await self._upgrade()

    async def _upgrade(self) -> None:
        for table, columns in _ADDED_COLUMNS.items():
            async with self.db.execute(f"PRAGMA table_info({table})") as cur:
                present = {row[1] for row in await cur.fetchall()}
            for column, kind in columns:
                if column not in present:
                    await self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    def _hold_store(self) -> None:
        """One controller per store: a second one would resume the same operations."""
        fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a local file, never blocks: NB
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise FailedPrecondition(f"another controller (pid {holder}) uses the store {self.path}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[_Writer]:
        # BEGIN, COMMIT and ROLLBACK each run to their end even when the caller is cancelled (a
        # request past its deadline): a BEGIN left open would fail every later write.
        async with self._lock:
            try:
                await _to_the_end(self.db.execute("BEGIN IMMEDIATE"))
                yield _Writer(self.db)
            except BaseException:
                if self.db.in_transaction:  # SQLite has already rolled back after some errors (disk full)
                    await _to_the_end(self.db.execute("ROLLBACK"))
                raise
            await _to_the_end(self.db.execute("COMMIT"))
            self.changes += 1

    @contextlib.asynccontextmanager
    async def _read(self) -> AsyncIterator[aiosqlite.Connection]:
        # Reads wait for a transaction in progress: on one connection they would see its uncommitted rows.
        async with self._lock:
            yield self.db

    # -- single changes (each its own transaction) ---------------------------------------------

    async def put_node(self, facts: NodeFacts) -> None:
        async with self.transaction() as tx:
            await tx.put_node(facts)

    async def insert_container(self, container: Container) -> Container:
        async with self.transaction() as tx:
            return await tx.insert_container(container)

    async def update_container(self, container: Container) -> Container:
        async with self.transaction() as tx:
            return await tx.update_container(container)

    async def observe_container(
        self, name: str, node: str, state: ContainerState, init_pid: int, at: float, message: str | None = None
    ) -> bool:
        async with self.transaction() as tx:
            return await tx.observe_container(name, node, state, init_pid, at, message)

    async def delete_container(self, name: str, revision: int) -> None:
        async with self.transaction() as tx:
            await tx.delete_container(name, revision)

    async def put_operation(self, op: Operation) -> None:
        async with self.transaction() as tx:
            await tx.put_operation(op)

    async def put_unmanaged(self, node: str, name: str, network: NetworkAttachment, seen_at: float) -> None:
        async with self.transaction() as tx:
            await tx.put_unmanaged(node, name, network, seen_at)

    async def forget_unmanaged(self, node: str, name: str) -> None:
        async with self.transaction() as tx:
            await tx.forget_unmanaged(node, name)

    async def acquire_lease(self, name: str, holder: str, ttl: float, now: float) -> tuple[str, float]:
        async with self.transaction() as tx:
            return await tx.acquire_lease(name, holder, ttl, now)

    async def set_cordoned(self, node: str, cordoned: bool) -> None:
        async with self.transaction() as tx:
            cur = await tx.db.execute("UPDATE nodes SET cordoned=? WHERE name=?", (int(cordoned), node))
            if cur.rowcount == 0:
                raise NotFound(f"node {node!r} is not registered")

    # -- reads -----------------------------------------------------------------------------------

    async def cordoned_nodes(self) -> set[str]:
        async with self._read() as db, db.execute("SELECT name FROM nodes WHERE cordoned != 0") as cur:
            return {row[0] for row in await cur.fetchall()}

    async def list_nodes(self) -> list[NodeFacts]:
        async with self._read() as db, db.execute("SELECT facts FROM nodes ORDER BY name") as cur:
            rows = await cur.fetchall()
        out = []
        for (text,) in rows:
            data = json.loads(text)
            for key in ("storage_drivers", "live_strategies"):
                data[key] = tuple(data.get(key, ()))
            out.append(NodeFacts(**data))
        return out

    async def get_container(self, name: str) -> Container | None:
        async with self._read() as db:
            return await _Writer(db).get_container(name)

    async def list_containers(self, node: str | None = None) -> list[Container]:
        query, args = f"SELECT {', '.join(_COLUMNS)} FROM containers", ()
        if node:
            query, args = query + " WHERE node=?", (node,)
        async with self._read() as db, db.execute(query + " ORDER BY name", args) as cur:
            return [_container(r) for r in await cur.fetchall()]

    async def list_unmanaged(self) -> list[tuple[str, str, NetworkAttachment]]:
        async with self._read() as db, db.execute("SELECT node, name, network FROM unmanaged ORDER BY name") as cur:
            return [(n, c, NetworkAttachment(**json.loads(net))) for n, c, net in await cur.fetchall()]

    async def get_operation(self, op_id: str) -> Operation | None:
        async with self._read() as db, db.execute("SELECT data FROM operations WHERE id=?", (op_id,)) as cur:
            row = await cur.fetchone()
        return Operation.from_json(row[0]) if row else None

    async def list_operations(self, container: str | None = None, active_only: bool = False) -> list[Operation]:
        query, args = "SELECT data FROM operations WHERE 1=1", []
        if container:
            query += " AND container=?"
            args.append(container)
        if active_only:
            query += f" AND state IN ({','.join('?' * len(_ACTIVE))})"
            args.extend(_ACTIVE)
        async with self._read() as db, db.execute(query + " ORDER BY created_at", args) as cur:
            return [Operation.from_json(r[0]) for r in await cur.fetchall()]


def _values(c: Container) -> dict[str, object]:
    return {
        "name": c.name,
        "node": c.node,
        "template": c.template,
        "state": c.state.value,
        "init_pid": c.init_pid,
        "observed_at": c.observed_at,
        "revision": c.revision,
        "limits": json.dumps(dataclasses.asdict(c.limits)),
        "network": json.dumps(dataclasses.asdict(c.network)),
        "storage": c.storage,
        "created_at": c.created_at,
        "message": c.message,
        "volume_generation": c.volume_generation,
        "desired_state": c.desired_state.value,
        "in_doubt": c.in_doubt,
        "doubt_nodes": json.dumps(list(c.doubt_nodes)),
        "ha": int(c.ha),
        "ha_priority": c.ha_priority,
        "ha_group": c.ha_group,
        "ha_relocations": c.ha_relocations,
        "ha_failed": c.ha_failed,
        "constraints": json.dumps(list(c.constraints)),
        "placement_group": c.group,
    }


def _container(row) -> Container:
    v = dict(zip(_COLUMNS, row))
    return Container(
        name=v["name"],
        node=v["node"],
        template=v["template"],
        state=ContainerState(v["state"]),
        limits=Limits(**json.loads(v["limits"])),
        network=NetworkAttachment(**json.loads(v["network"])),
        storage=v["storage"],
        init_pid=v["init_pid"],
        created_at=v["created_at"],
        message=v["message"],
        volume_generation=v["volume_generation"],
        desired_state=DesiredState(v["desired_state"]),
        observed_at=v["observed_at"],
        revision=v["revision"],
        in_doubt=v["in_doubt"],
        doubt_nodes=tuple(json.loads(v["doubt_nodes"])),
        ha=bool(v["ha"]),
        ha_priority=v["ha_priority"],
        ha_group=v["ha_group"],
        ha_relocations=v["ha_relocations"],
        ha_failed=v["ha_failed"],
        constraints=tuple(json.loads(v["constraints"])),
        group=v["placement_group"],
    )
