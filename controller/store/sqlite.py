"""SQLite state backend: embedded, one file, durable (WAL + synchronous=FULL)."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path

import aiosqlite

from controller.model import Operation
from corral.errors import AlreadyExists
from corral.model import Container, ContainerState, Limits, NetworkAttachment, NodeFacts

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
"""

_ACTIVE = ("pending", "running", "rolling-back")


class SqliteStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None

    @property
    def db(self) -> aiosqlite.Connection:
        assert self._db is not None, "store not opened"
        return self._db

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = await aiosqlite.connect(self.path)
        await self.db.execute("PRAGMA journal_mode=WAL")
        await self.db.execute("PRAGMA synchronous=FULL")
        await self.db.executescript(SCHEMA)
        await self.db.commit()
        await self._upgrade()

    async def _upgrade(self) -> None:
        """Columns added since the first schema, for stores made by older versions."""
        async with self.db.execute("PRAGMA table_info(containers)") as cur:
            columns = {row[1] for row in await cur.fetchall()}
        if "volume_generation" not in columns:
            await self.db.execute("ALTER TABLE containers ADD COLUMN volume_generation INTEGER NOT NULL DEFAULT 0")
            await self.db.commit()

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def put_node(self, facts: NodeFacts) -> None:
        await self.db.execute(
            "INSERT INTO nodes(name, facts) VALUES(?, ?) ON CONFLICT(name) DO UPDATE SET facts=excluded.facts",
            (facts.name, json.dumps(dataclasses.asdict(facts))),
        )
        await self.db.commit()

    async def list_nodes(self) -> list[NodeFacts]:
        async with self.db.execute("SELECT facts FROM nodes ORDER BY name") as cur:
            rows = await cur.fetchall()
        out = []
        for (text,) in rows:
            data = json.loads(text)
            for key in ("storage_drivers", "live_strategies"):
                data[key] = tuple(data.get(key, ()))
            out.append(NodeFacts(**data))
        return out

    async def insert_container(self, container: Container) -> None:
        try:
            await self.db.execute(
                "INSERT INTO containers(name, node, template, state, limits, network, storage, created_at, message,"
                " volume_generation) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                _row(container),
            )
        except sqlite3.IntegrityError:
            raise AlreadyExists(f"container {container.name!r} already exists") from None
        await self.db.commit()

    async def update_container(self, container: Container) -> None:
        name, *rest = _row(container)
        await self.db.execute(
            "UPDATE containers SET node=?, template=?, state=?, limits=?, network=?, storage=?, created_at=?,"
            " message=?, volume_generation=? WHERE name=?",
            (*rest, name),
        )
        await self.db.commit()

    async def get_container(self, name: str) -> Container | None:
        async with self.db.execute(f"SELECT {_COLUMNS} FROM containers WHERE name=?", (name,)) as cur:
            row = await cur.fetchone()
        return _container(row) if row else None

    async def list_containers(self, node: str | None = None) -> list[Container]:
        if node:
            query, args = f"SELECT {_COLUMNS} FROM containers WHERE node=? ORDER BY name", (node,)
        else:
            query, args = f"SELECT {_COLUMNS} FROM containers ORDER BY name", ()
        async with self.db.execute(query, args) as cur:
            return [_container(r) for r in await cur.fetchall()]

    async def delete_container(self, name: str) -> None:
        await self.db.execute("DELETE FROM containers WHERE name=?", (name,))
        await self.db.commit()


    async def put_operation(self, op: Operation) -> None:
        await self.db.execute(
            "INSERT INTO operations(id, container, state, data, created_at) VALUES(?, ?, ?, ?, ?)"
            " ON CONFLICT(id) DO UPDATE SET state=excluded.state, data=excluded.data",
            (op.id, op.container, op.state.value, op.to_json(), op.created_at),
        )
        await self.db.commit()

    async def get_operation(self, op_id: str) -> Operation | None:
        async with self.db.execute("SELECT data FROM operations WHERE id=?", (op_id,)) as cur:
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
        async with self.db.execute(query + " ORDER BY created_at", args) as cur:
            return [Operation.from_json(r[0]) for r in await cur.fetchall()]


_COLUMNS = "name, node, template, state, limits, network, storage, created_at, message, volume_generation"


def _row(c: Container) -> tuple:
    return (
        c.name,
        c.node,
        c.template,
        c.state.value,
        json.dumps(dataclasses.asdict(c.limits)),
        json.dumps(dataclasses.asdict(c.network)),
        c.storage,
        c.created_at,
        c.message,
        c.volume_generation,
    )


def _container(row) -> Container:
    name, node, template, state, limits, network, storage, created_at, message, generation = row
    return Container(
        name=name,
        node=node,
        template=template,
        state=ContainerState(state),
        limits=Limits(**json.loads(limits)),
        network=NetworkAttachment(**json.loads(network)),
        storage=storage,
        created_at=created_at,
        message=message,
        volume_generation=generation,
    )
