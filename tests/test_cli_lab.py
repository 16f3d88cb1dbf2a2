"""The CLI against the real lab: machine output wherever -o is written, the user-facing
storage names, and `lab up`/`lab down` keeping the user's other contexts."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest
import yaml

from corral.v1 import types_pb2 as pb


def _keys(message_type) -> set[str]:
    return {f.name for f in message_type.DESCRIPTOR.fields}


async def test_machine_output_before_and_after_the_subcommand(corral, cleanup):
    cleanup.append("out1")
    await corral("ct", "create", "out1", "-t", "busybox", "--node", "n1", "--start")
    op = await corral.json("ct", "migrate", "out1", "--to", "n2")
    reads = [
        (("node", "ls"), pb.Node, True), (("node", "show", "n1"), pb.Node, False),
        (("ct", "ls"), pb.Container, True), (("ct", "show", "out1"), pb.Container, False),
        (("ops", "ls"), pb.Operation, True), (("ops", "show", op["id"]), pb.Operation, False),
    ]  # fmt: skip
    for command, message, is_list in reads:
        expected = _keys(message) | ({"name"} if message is pb.Node else set())
        for fmt in ("json", "yaml"):
            before = await corral("-o", fmt, *command)
            after = await corral(*command, "--output", fmt)
            for result in (before, after):
                data = json.loads(result.stdout) if fmt == "json" else yaml.safe_load(result.stdout)
                for obj in data if is_list else [data]:
                    assert set(obj) == expected, (command, fmt)
    shown = await corral.json("ct", "show", "out1")
    assert (shown["name"], shown["node"], shown["state"]) == ("out1", "n2", "running")
    assert shown["created_at"].endswith("Z")
    node = await corral.json("node", "show", "n1")
    assert node["facts"]["agent_version"] and node["facts"]["live_strategies"]
    assert "name" not in op and op["params"]["target"] == "n2"


async def test_shared_storage_migrates_without_copying(corral, cleanup, lab):
    cleanup.append("shr1")
    created = await corral.json("ct", "create", "shr1", "-t", "busybox", "--node", "n1", "--storage", "shared",
                                "--disk", "64M", "--start")  # fmt: skip
    assert created["storage"] == "image"  # the record keeps the concrete driver
    assert (lab.shared_dir / "images" / "shr1.img").exists()
    op = await corral.json("ct", "migrate", "shr1", "--to", "n2")
    assert op["state"] == "succeeded", op["error"]
    assert op["result"]["bytes_sent"] == 0
    assert "precopy-rootfs" not in [s["name"] for s in op["steps"]]
    shown = await corral.json("ct", "show", "shr1")
    assert shown["node"] == "n2" and shown["state"] == "running"


async def test_local_storage_is_the_dir_driver(corral, cleanup, lab):
    cleanup.append("loc1")
    created = await corral.json("ct", "create", "loc1", "-t", "busybox", "--node", "n1", "--storage", "local",
                                "--start")  # fmt: skip
    assert created["storage"] == "dir"
    assert not (lab.shared_dir / "images" / "loc1.img").exists()
    op = await corral.json("ct", "migrate", "loc1", "--to", "n2")
    assert op["state"] == "succeeded", op["error"]
    assert op["result"]["bytes_sent"] > 0  # copied with rsync, as dir
    assert "precopy-rootfs" in [s["name"] for s in op["steps"]]
    assert (await corral.json("ct", "show", "loc1"))["node"] == "n2"


async def test_api_callers_get_the_same_storage_names(fleet, cleanup):
    from corral.errors import InvalidArgument

    cleanup.append("api1")
    created = await fleet.create_container("api1", "busybox", node="n1", storage="local")
    assert created.storage == "dir"
    with pytest.raises(InvalidArgument, match="unknown storage 'nfs'.*local, shared"):
        await fleet.create_container("api2", "busybox", storage="nfs")
    with pytest.raises(InvalidArgument, match="unknown template 'gentoo'"):
        await fleet.create_container("api2", "gentoo")


async def _cli(*args: str, env: dict[str, str]):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controller.cli.main", *args, env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(300):
        out, err = await proc.communicate()
    assert proc.returncode == 0, f"corral {' '.join(args)} exited {proc.returncode}: {err.decode()}"
    return out.decode()


@pytest.mark.usefixtures("lab")
async def test_lab_up_keeps_other_contexts_and_lab_down_reselects_the_old_one(tmp_path, lab):
    home = tmp_path / "home"
    config = home / ".config" / "corral" / "config.yaml"
    config.parent.mkdir(parents=True)
    # The user's own controller (here: the test lab), in the older single-controller format.
    config.write_text(yaml.safe_dump(_absolute(lab.cli_config)))
    env = {**os.environ, "HOME": str(home)}
    env.pop("CORRAL_CONFIG", None)
    env.pop("CORRAL_CONTEXT", None)
    name = (lab.name + "ctx")[:6]
    await _cli("lab", "down", "--name", name, env=env)  # leftovers of an interrupted run
    try:
        await _cli("lab", "up", "--nodes", "1", "--name", name, env=env)
        doc = yaml.safe_load(config.read_text())
        assert doc["current-context"] == f"lab-{name}"
        assert set(doc["contexts"]) == {"default", f"lab-{name}"}
        assert doc["contexts"][f"lab-{name}"]["previous-context"] == "default"
        assert oct(config.stat().st_mode & 0o777) == "0o600"
        nodes = json.loads(await _cli("node", "ls", "-o", "json", env=env))
        assert [n["name"] for n in nodes] == ["n1"]  # the new lab's one node
        listed = json.loads(await _cli("context", "ls", "-o", "json", env=env))
        assert [(c["name"], c["current"]) for c in listed] == [("default", False), (f"lab-{name}", True)]
        # The old context is still usable by name.
        old = json.loads(await _cli("--context", "default", "node", "ls", "-o", "json", env=env))
        assert {n["name"] for n in old} == {"n1", "n2", "n3"}
    finally:
        await _cli("lab", "down", "--name", name, env=env)
    doc = yaml.safe_load(config.read_text())
    assert doc["current-context"] == "default" and set(doc["contexts"]) == {"default"}
    assert len(json.loads(await _cli("node", "ls", "-o", "json", env=env))) == 3


def _absolute(cli_config) -> dict:
    doc = yaml.safe_load(cli_config.read_text())
    doc["tls"] = {k: str(cli_config.parent / v) for k, v in doc["tls"].items()}
    return doc
