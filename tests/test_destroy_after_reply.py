"""An agent's destroy removes a local volume after it replied (agent/containers.py): the
container is gone at once, a create of the same name waits for the volume, and a tombstone
finishes the removal after a crash. No lab: a ContainerManager on a temporary directory."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.containers import ContainerManager
from agent.records import RecordStore
from agent.runtime.cgroups import CgroupLayout
from agent.runtime.lxc import LxcRuntime
from agent.storage.dir import DirStorage
from corral.errors import NotFound
from corral.model import Limits, NetworkAttachment

NET = NetworkAttachment(ipv4_cidr="10.99.0.5/24", gateway="10.99.0.1", mac="02:cc:0a:63:00:05")


def manager(base: Path) -> ContainerManager:
    (base / "lxc").mkdir(exist_ok=True)
    return ContainerManager(
        node="n1", runtime=LxcRuntime(base / "lxc"), storages={"dir": DirStorage(base / "storage")},
        records=RecordStore(base / "state"), bridge="br0", template_cache=base / "templates",
        cgroups=CgroupLayout(v1=True),
    )  # fmt: skip


async def test_destroy_replies_before_the_volume_is_gone_and_a_new_create_waits(tmp_path):
    m = manager(tmp_path)
    await m.create("d1", "busybox", Limits(), NET, "dir")
    volume = tmp_path / "storage" / "d1"
    assert volume.is_dir()
    await m.destroy("d1", force=False)
    assert not m.exists("d1")
    with pytest.raises(NotFound):
        await m.get("d1")
    assert [c.name for c in await m.list()] == []
    # The same name again: waits for the old volume, then gets a fresh one.
    created = await m.create("d1", "busybox", Limits(), NET, "dir")
    assert created.name == "d1" and (volume / "rootfs" / "bin" / "busybox").is_file()
    await m.destroy("d1", force=False)
    await asyncio.gather(*m._removing)
    assert not volume.exists() and not list((tmp_path / "state" / "containers").iterdir())


async def test_a_destroy_cut_short_is_finished_when_the_agent_starts(tmp_path):
    m = manager(tmp_path)
    await m.create("d2", "busybox", Limits(), NET, "dir")
    # As if the agent died right after writing the tombstone: record, config and volume all still there.
    (tmp_path / "state" / "containers" / "d2.destroying").write_text("dir")
    restarted = manager(tmp_path)
    assert await restarted.reconcile() == []
    assert not (tmp_path / "storage" / "d2").exists()
    assert not (tmp_path / "lxc" / "d2").exists()
    assert not list((tmp_path / "state" / "containers").iterdir())
