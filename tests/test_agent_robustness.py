"""The agent stays up and keeps its host tidy and private when things go wrong around it:
damaged record files, unexpected errors in its heartbeat, strangers on its SSH port or in
/tmp, leftovers of failed migrations, a hung shared storage (standalone: no lab)."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path

import pytest

from agent import membership as membership_module
from agent import records as records_module
from agent.containers import ContainerManager
from agent.membership import Membership
from agent.records import ContainerRecord, RecordStore
from agent.runtime.lxc import LxcRuntime
from agent.storage.dir import DirStorage
from corral.config import TlsFiles
from corral.errors import RuntimeFailure
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
