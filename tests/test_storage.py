"""Storage drivers against real loop devices and mounts.

The `image` driver runs where an agent runs: inside a lab host's pinned mount
namespace. Each lab host gets a small driver process (HOST_SCRIPT, started with
`lab.host_command`) that holds an ImageStorage like the agent would and answers
JSON commands on stdin; killing it and starting another is an agent restart.
The lab's shared directory plays the SAN.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import pytest

from agent.storage import lvm as lvm_driver
from agent.storage.blockfs import Mount, find_mount, volume_size
from agent.storage.dir import DirStorage
from agent.storage.image import ImageStorage
from agent.storage.ownership import MarkerFile, Ownership, check_attach, volume_lock
from corral import errors
import lab as corral_lab
from corral.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RuntimeFailure,
)
from lab.processes import daemon_env
from corral.proc import run

LAB = "stg"
MiB = 1 << 20

# Runs inside a lab host: one ImageStorage, commands as JSON lines on stdin.
HOST_SCRIPT = r'''
import asyncio, hashlib, json, os, sys, time
from pathlib import Path
from corral import log
log.configure(json_output=True, stream=sys.stderr)
from agent.storage.image import ImageStorage

driver = ImageStorage(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])

def fill(path, limit):
    written = 0
    try:
        with open(path, "wb") as f:
            while written < limit:
                f.write(b"\xa5" * (1 << 20))
                written += 1 << 20
            f.flush()
            os.fsync(f.fileno())
        return {"written": written, "errno": 0}
    except OSError as e:
        return {"written": written, "errno": e.errno}

tasks = {}
written = {"writes": 0, "errors": []}

async def write_forever(path):
    # Stands in for a container using its volume: appends a line every 20 ms.
    while True:
        try:
            with open(path, "a") as f:
                f.write("tick\n")
            written["writes"] += 1
        except OSError as e:
            written["errors"].append(e.errno)
        await asyncio.sleep(0.02)

async def kill(container):
    tasks.pop("writer").cancel()

async def handle(cmd):
    op, name = cmd["op"], cmd.get("name")
    if op == "watch":
        tasks["watch"] = asyncio.create_task(driver.watch(kill))
        return None
    if op == "writer":
        tasks["writer"] = asyncio.create_task(write_forever(driver.rootfs(name) / cmd["file"]))
        return None
    if op == "writer_status":
        return {**written, "running": "writer" in tasks}
    if op == "create":
        return str(await driver.create_volume(name, cmd["size"]))
    if op == "attach":
        return str(await driver.attach(name, cmd["generation"], takeover_from=cmd.get("takeover_from")))
    if op == "detach":
        return await driver.detach(name)
    if op == "destroy":
        return await driver.destroy_volume(name)
    if op == "is_attached":
        return driver.is_attached(name)
    if op == "usage":
        return await driver.usage(name)
    path = driver.rootfs(name) / cmd.get("file", "")
    if op == "write":
        path.write_bytes(bytes.fromhex(cmd["hex"]))
        return None
    if op == "sha256":
        return hashlib.sha256(path.read_bytes()).hexdigest()
    if op == "fill":
        result = await asyncio.to_thread(fill, path, cmd["limit"])
        os.unlink(path)
        return result
    raise ValueError(f"unknown op {op}")

async def main():
    while line := await asyncio.to_thread(sys.stdin.readline):
        cmd = json.loads(line)
        started = time.perf_counter()
        try:
            reply = {"ok": await handle(cmd)}
        except Exception as e:
            reply = {"error": type(e).__name__, "message": str(e)}
        reply["ms"] = round((time.perf_counter() - started) * 1000, 1)
        print(json.dumps(reply), flush=True)

asyncio.run(main())
'''


class HostDriver:
    """The image driver as an agent on lab host `node` would hold it."""

    def __init__(self, node: str, script: Path, shared_dir: Path, mount_root: Path, log_file: Path) -> None:
        self.node, self.script, self.shared_dir, self.mount_root, self.log_file = (
            node, script, shared_dir, mount_root, log_file)
        self.proc: asyncio.subprocess.Process | None = None
        self.timings: dict[str, list[float]] = {}

    async def start(self) -> None:
        argv = corral_lab.host_command(LAB, self.node, [sys.executable, self.script, self.shared_dir,
                                                        self.mount_root, self.node])
        with open(self.log_file, "ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
                env=daemon_env())

    async def stop(self) -> None:
        """Kill it (as an agent crash would): mounts stay, they belong to the host."""
        if self.proc and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self.proc = None

    async def __call__(self, op: str, name: str | None = None, **kw):
        assert self.proc and self.proc.stdin and self.proc.stdout
        self.proc.stdin.write((json.dumps({"op": op, "name": name, **kw}) + "\n").encode())
        await self.proc.stdin.drain()
        async with asyncio.timeout(60):
            line = await self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"driver process on {self.node} died; see {self.log_file}")
        reply = json.loads(line)
        self.timings.setdefault(op, []).append(reply["ms"])
        if "error" in reply:
            raise getattr(errors, reply["error"], RuntimeError)(reply["message"])
        return reply["ok"]


async def host_output(node: str, argv: list[str]) -> str:
    done = await run(corral_lab.host_command(LAB, node, argv), timeout=30, env=daemon_env())
    return done.stdout.decode()


async def mounted_on(node: str, path: str | Path) -> int:
    """How many mounts `path` has in host `node`'s mount table."""
    mounts = await host_output(node, ["cat", "/proc/self/mounts"])
    return sum(1 for line in mounts.splitlines() if line.split()[1] == str(path))


async def loops_of(image: Path) -> list[str]:
    done = await run(["losetup", "--list", "--noheadings", "--output", "NAME,AUTOCLEAR,DIO",
                      "--associated", str(image)], timeout=10)
    return done.stdout.decode().splitlines()


# --- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def stg():
    await corral_lab.lab_down(LAB)  # leftovers of an interrupted run
    info = await corral_lab.lab_up(name=LAB, nodes=2, wait_ready=False)  # the agents are not needed
    try:
        yield info
    finally:
        await corral_lab.lab_down(LAB)
        listed = await run(["losetup", "--list", "--noheadings", "--output", "BACK-FILE"], timeout=10)
        assert str(info.shared_dir) not in listed.stdout.decode(), "a loop device still holds a lab image"


@pytest.fixture(scope="module")
async def hosts(stg, tmp_path_factory):
    work = tmp_path_factory.mktemp("stg")
    script = work / "host_driver.py"
    script.write_text(HOST_SCRIPT)
    drivers = {h.node: HostDriver(h.node, script, stg.shared_dir, h.storage_dir / "image", work / f"{h.node}.log")
               for h in stg.hosts}
    for d in drivers.values():
        await d.start()
    try:
        yield drivers
    finally:
        for d in drivers.values():
            await d.stop()
        timings = {node: {op: max(ms) for op, ms in d.timings.items()} for node, d in drivers.items()}
        print(f"\nslowest image driver call per op (ms): {timings}")


def image_of(stg, name: str) -> Path:
    return stg.shared_dir / "images" / f"{name}.img"


def marker_of(stg, name: str) -> Ownership | None:
    return MarkerFile(stg.shared_dir / "images" / f"{name}.owner").read()


def triple(o: Ownership | None) -> tuple[str, int, bool] | None:
    return (o.node, o.generation, o.attached) if o else None


def owner_of(stg, name: str) -> tuple[str, int, bool] | None:
    return triple(marker_of(stg, name))


# --- image driver in the lab -----------------------------------------------------------


async def test_create_mounts_on_owner_only_and_enforces_size(stg, hosts):
    n1 = hosts["n1"]
    rootfs = await n1("create", "v-size", size=64 * MiB)
    assert rootfs == str(stg.host("n1").storage_dir / "image" / "v-size" / "rootfs")
    assert await mounted_on("n1", rootfs) == 1
    assert await mounted_on("n2", rootfs) == 0
    assert not os.path.ismount(rootfs)  # nor here, in the machine's own namespace
    image = image_of(stg, "v-size")
    assert image.stat().st_size == 64 * MiB and image.stat().st_blocks * 512 < 4 * MiB  # sparse
    assert owner_of(stg, "v-size") == ("n1", 0, True)
    [loop] = await loops_of(image)
    assert loop.split()[1:] == ["1", "1"]  # autoclear, direct I/O

    await n1("write", "v-size", file="hello", hex=b"hi".hex())
    filled = await n1("fill", "v-size", file="big", limit=80 * MiB)
    assert filled["errno"] == 28, filled  # ENOSPC
    assert 40 * MiB <= filled["written"] < 64 * MiB
    assert 0 < await n1("usage", "v-size") < 16 * MiB  # the big file is gone again
    await n1("destroy", "v-size")


async def test_handover_moves_the_same_file_not_bytes(stg, hosts):
    n1, n2 = hosts["n1"], hosts["n2"]
    await n1("create", "v-move", size=64 * MiB)
    payload = os.urandom(3 * MiB)
    await n1("write", "v-move", file="data", hex=payload.hex())
    image = image_of(stg, "v-move")
    before = image.stat()

    await n1("detach", "v-move")
    assert await mounted_on("n1", n1.mount_root / "v-move" / "rootfs") == 0
    assert await loops_of(image) == []  # the unmount freed the loop device
    assert owner_of(stg, "v-move") == ("n1", 0, False)
    assert not await n1("is_attached", "v-move")

    rootfs = await n2("attach", "v-move", generation=1)
    assert await mounted_on("n2", rootfs) == 1
    assert await n2("sha256", "v-move", file="data") == hashlib.sha256(payload).hexdigest()
    after = image.stat()
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)  # the same file, not a copy
    assert sorted(p.name for p in image.parent.iterdir()) == ["v-move.img", "v-move.owner"]
    assert owner_of(stg, "v-move") == ("n2", 1, True)
    await n2("destroy", "v-move")


async def test_attach_refused_while_held_or_stale(stg, hosts):
    n1, n2 = hosts["n1"], hosts["n2"]
    await n1("create", "v-own", size=64 * MiB)
    await n1("write", "v-own", file="mark", hex=b"n1 was here".hex())
    await n1("detach", "v-own")
    await n2("attach", "v-own", generation=1)

    with pytest.raises(PermissionDenied, match="attached on n2"):
        await n1("attach", "v-own", generation=2)
    with pytest.raises(PermissionDenied, match="stale"):
        await n1("attach", "v-own", generation=0)
    with pytest.raises(PermissionDenied, match="n2"):
        await n1("destroy", "v-own")
    await n1("detach", "v-own")  # not n1's to release: changes nothing
    assert owner_of(stg, "v-own") == ("n2", 1, True)
    assert await mounted_on("n2", n2.mount_root / "v-own" / "rootfs") == 1

    await n2("detach", "v-own")
    with pytest.raises(PermissionDenied, match="stale"):
        await n1("attach", "v-own", generation=0)
    with pytest.raises(PermissionDenied, match="given to n2"):
        await n1("attach", "v-own", generation=1)
    await n1("attach", "v-own", generation=2)
    assert await n1("sha256", "v-own", file="mark") == hashlib.sha256(b"n1 was here").hexdigest()
    assert owner_of(stg, "v-own") == ("n1", 2, True)
    await n1("destroy", "v-own")


async def test_takeover_from_a_live_holder_waits_until_it_let_go(stg, hosts):
    """The fence at the data (review H5): n1 holds the volume and a process writes to it; n2 is
    told to take it over as if n1 had been fenced, though it was not. n1's re-check finds the
    new owner, shuts its filesystem down (no flush of its stale view), stops the writer and
    unmounts; n2 mounts only after n1's beacon shows that. The two never have it mounted at once."""
    n1, n2 = hosts["n1"], hosts["n2"]
    rootfs1, rootfs2 = n1.mount_root / "v-live" / "rootfs", n2.mount_root / "v-live" / "rootfs"
    await n1("create", "v-live", size=64 * MiB)
    await n1("write", "v-live", file="before", hex=b"n1 wrote this".hex())
    await n1("watch")
    await n1("writer", "v-live", file="ticks")
    await asyncio.sleep(1.5)  # n1's beacon lists the volume

    samples: list[tuple[int, int]] = []

    async def sample() -> None:
        while True:
            samples.append((await mounted_on("n1", rootfs1), await mounted_on("n2", rootfs2)))
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    began = time.monotonic()
    try:
        await n2("attach", "v-live", generation=1, takeover_from="n1")
    finally:
        sampler.cancel()
    took = time.monotonic() - began
    assert samples and all(a + b <= 1 for a, b in samples), samples
    assert (1, 0) in samples, "n1 had it mounted when the takeover began"
    assert 0.2 < took < 5, f"took {took:.1f}s: n2 must wait for n1 to let go, and n1 re-checks every second"
    status = await n1("writer_status")
    assert not status["running"] and status["writes"] > 10
    assert await mounted_on("n1", rootfs1) == 0 and await mounted_on("n2", rootfs2) == 1
    assert await n2("sha256", "v-live", file="before") == hashlib.sha256(b"n1 wrote this").hexdigest()
    assert owner_of(stg, "v-live") == ("n2", 1, True)

    await n2("detach", "v-live")
    fsck = await run(["e2fsck", "-fn", str(image_of(stg, "v-live"))], timeout=60, check=False)
    assert fsck.returncode == 0, fsck.output
    await n2("destroy", "v-live")


async def test_racing_attaches_leave_exactly_one_owner(stg, hosts):
    n1, n2 = hosts["n1"], hosts["n2"]
    await n1("create", "v-race", size=64 * MiB)
    await n1("detach", "v-race")
    results = await asyncio.gather(n1("attach", "v-race", generation=1), n2("attach", "v-race", generation=2),
                                   return_exceptions=True)
    assert sum(isinstance(r, PermissionDenied) for r in results) == 1, results
    mounts = [await mounted_on(node, hosts[node].mount_root / "v-race" / "rootfs") for node in ("n1", "n2")]
    assert sorted(mounts) == [0, 1]
    owner = "n1" if mounts[0] else "n2"
    assert owner_of(stg, "v-race")[0] == owner
    await hosts[owner]("destroy", "v-race")


async def test_attach_is_idempotent_and_survives_agent_restart(stg, hosts):
    n1 = hosts["n1"]
    rootfs = await n1("create", "v-again", size=64 * MiB)
    assert await n1("attach", "v-again", generation=0) == rootfs
    assert await n1("attach", "v-again", generation=3) == rootfs  # a newer order for the same host
    assert await mounted_on("n1", rootfs) == 1
    assert owner_of(stg, "v-again") == ("n1", 3, True)

    await n1.stop()  # the agent dies; the host (its mount namespace) stays
    await n1.start()
    assert await n1("is_attached", "v-again")
    assert await n1("attach", "v-again", generation=3) == rootfs
    assert await mounted_on("n1", rootfs) == 1
    assert len(await loops_of(image_of(stg, "v-again"))) == 1
    await n1("destroy", "v-again")


async def test_detach_refused_while_something_uses_the_volume(stg, hosts):
    n1 = hosts["n1"]
    rootfs = await n1("create", "v-busy", size=64 * MiB)
    # A process in a mount namespace of its own copied from the host's keeps the
    # filesystem, as a running container does; the host's umount alone would succeed.
    holder = await asyncio.create_subprocess_exec(
        *corral_lab.host_command(LAB, "n1", ["unshare", "--mount", "--propagation", "private", "sleep", "300"]),
        env=daemon_env())
    try:
        await asyncio.sleep(0.3)
        with pytest.raises(FailedPrecondition, match="still in use"):
            await n1("detach", "v-busy")
        assert await mounted_on("n1", rootfs) == 1  # mounted back as it was
        assert owner_of(stg, "v-busy") == ("n1", 0, True)  # and not released
        with pytest.raises(FailedPrecondition, match="still in use"):
            await n1("destroy", "v-busy")
        assert image_of(stg, "v-busy").exists()
    finally:
        holder.kill()
        await holder.wait()
    await n1("detach", "v-busy")
    assert await loops_of(image_of(stg, "v-busy")) == []
    await n1("destroy", "v-busy")


async def test_takeover_after_host_crash(stg, hosts):
    n1, n2 = hosts["n1"], hosts["n2"]
    await n1("create", "v-fail", size=64 * MiB)
    await n1("write", "v-fail", file="before-crash", hex=b"kept".hex())
    await corral_lab.crash_host(LAB, "n1")  # kills n1's driver process too, drops its mounts
    await n1.stop()
    assert owner_of(stg, "v-fail") == ("n1", 0, True)  # n1 never released it

    with pytest.raises(PermissionDenied, match="attached on n1"):
        await n2("attach", "v-fail", generation=1)
    with pytest.raises(PermissionDenied, match="attached on n1"):
        await n2("attach", "v-fail", generation=1, takeover_from="n3")  # not the holder
    await n2("attach", "v-fail", generation=1, takeover_from="n1")  # n1 was fenced: fail over
    assert await n2("sha256", "v-fail", file="before-crash") == hashlib.sha256(b"kept").hexdigest()
    assert owner_of(stg, "v-fail") == ("n2", 1, True)

    await n1.start()  # n1 comes back with an old order
    with pytest.raises(PermissionDenied):
        await n1("attach", "v-fail", generation=0)
    await n1("detach", "v-fail")
    assert owner_of(stg, "v-fail") == ("n2", 1, True)
    await n2("destroy", "v-fail")


async def test_destroy_removes_image_marker_mount_and_loop(stg, hosts):
    n1 = hosts["n1"]
    rootfs = await n1("create", "v-gone", size=64 * MiB)
    image = image_of(stg, "v-gone")
    await n1("destroy", "v-gone")
    assert not image.exists() and marker_of(stg, "v-gone") is None
    assert await mounted_on("n1", rootfs) == 0
    assert await loops_of(image) == []
    assert not Path(rootfs).parent.exists()
    await n1("destroy", "v-gone")  # again: nothing to do
    with pytest.raises(NotFound):
        await n1("attach", "v-gone", generation=5)


async def test_create_refuses_an_existing_volume_and_bad_input(stg, hosts):
    n1, n2 = hosts["n1"], hosts["n2"]
    await n1("create", "v-dup", size=64 * MiB)
    with pytest.raises(AlreadyExists):
        await n2("create", "v-dup", size=64 * MiB)
    assert await n1("is_attached", "v-dup") and owner_of(stg, "v-dup")[0] == "n1"
    await n1("destroy", "v-dup")
    with pytest.raises(InvalidArgument):
        await n1("create", "../etc", size=64 * MiB)
    with pytest.raises(InvalidArgument):
        await n1("create", "v-tiny", size=MiB)
    assert not image_of(stg, "v-tiny").exists()


# --- pieces that need no lab ------------------------------------------------------------


def test_ownership_rules():
    held = Ownership("n2", 4, attached=True, updated_at="")
    released = Ownership("n2", 4, attached=False, updated_at="")
    check_attach("v", None, "n1", 0)
    check_attach("v", held, "n2", 4)  # the holder again
    check_attach("v", held, "n2", 5)
    check_attach("v", released, "n1", 5)  # a handover
    check_attach("v", held, "n1", 5, takeover_from="n2")  # failover
    for current, node, generation, takeover in [
        (held, "n1", 5, None),  # held elsewhere
        (held, "n1", 4, "n2"),  # a takeover needs a newer generation
        (held, "n1", 5, "n3"),  # and must name the holder
        (released, "n1", 3, None),  # stale
        (released, "n1", 4, None),  # generation 4 belongs to n2
        (held, "n2", 3, None),  # stale, even for the holder
    ]:
        with pytest.raises(PermissionDenied):
            check_attach("v", current, node, generation, takeover)
    with pytest.raises(InvalidArgument):
        check_attach("v", None, "n1", -1)


def test_marker_file_round_trip_and_damage(tmp_path):
    marker = MarkerFile(tmp_path / "v.owner")
    assert marker.read() is None
    marker.write(Ownership.now("n1", 7, attached=True))
    got = marker.read()
    assert triple(got) == ("n1", 7, True) and got.updated_at.endswith("Z")
    assert [p.name for p in tmp_path.iterdir()] == ["v.owner"]  # no temporary file left
    (tmp_path / "v.owner").write_text("{not json")
    with pytest.raises(RuntimeFailure, match="unreadable"):
        marker.read()
    marker.remove()
    assert marker.read() is None


async def test_volume_lock_excludes_and_notices_removal(tmp_path):
    path = tmp_path / "v.img"
    async with volume_lock(path, create=True):
        with pytest.raises(AlreadyExists):
            async with volume_lock(path, create=True):
                pass
        with pytest.raises(errors.DeadlineExceeded):
            async with volume_lock(path, timeout=0.1):
                pass
    waiter_entered = asyncio.Event()

    async def waiter():
        async with volume_lock(path, timeout=5):
            waiter_entered.set()

    async with volume_lock(path):
        task = asyncio.create_task(waiter())
        await asyncio.sleep(0.1)
        assert not waiter_entered.is_set()
        path.unlink()  # destroyed while the other request waits
    with pytest.raises(NotFound):
        await task
    with pytest.raises(NotFound):
        async with volume_lock(path):
            pass


def test_find_mount_reads_mountinfo(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
        "90 22 7:3 / /srv/a\\040b/rootfs rw,relatime - ext4 /dev/loop3 rw\n"
        "91 90 7:4 / /srv/a\\040b/rootfs rw,relatime - ext4 /dev/loop4 rw\n")
    got = find_mount(Path("/srv/a b/rootfs"), info)
    assert got == Mount(Path("/srv/a b/rootfs"), "/dev/loop4", "ext4", "7:4")  # the topmost of two
    assert find_mount(Path("/srv"), info) is None


def test_volume_sizes():
    assert volume_size(0) == 1 << 30
    assert volume_size(64 * MiB + 1) == 64 * MiB + 4096
    for bad in (-1, MiB, 1.5, True):
        with pytest.raises(InvalidArgument):
            volume_size(bad)


async def test_dir_storage_is_local(tmp_path):
    d = DirStorage(tmp_path)
    assert d.shared is False
    rootfs = await d.create_volume("c1", 0)
    assert d.is_attached("c1")
    (rootfs / "a").write_bytes(b"x" * MiB)
    os.link(rootfs / "a", rootfs / "b")  # counted once, like du
    (rootfs / "sub").mkdir()
    (rootfs / "sub" / "c").write_bytes(b"y" * 10000)
    used = await d.usage("c1")
    assert MiB + 10000 <= used < 2 * MiB
    with pytest.raises(FailedPrecondition, match="local"):
        await d.attach("c1", 1)
    with pytest.raises(FailedPrecondition, match="local"):
        await d.detach("c1")
    await d.destroy_volume("c1")
    assert not d.is_attached("c1")
    with pytest.raises(NotFound):
        await d.usage("c1")


def test_image_storage_layout(tmp_path):
    s = ImageStorage(tmp_path / "shared", tmp_path / "mnt", "n1")
    assert (s.shared, s.enforces_disk_limit, s.name) == (True, True, "image")
    assert s.image_path("web") == tmp_path / "shared" / "images" / "web.img"
    assert s.rootfs("web") == tmp_path / "mnt" / "web" / "rootfs"
    with pytest.raises(InvalidArgument):
        s.rootfs("a/b")


def test_lvm_ownership_tags_round_trip():
    for o in (Ownership("n1", 0, True, ""), Ownership("node-7", 42, False, "")):
        assert lvm_driver.ownership_from_tags(lvm_driver.owner_tags(o)) == o
    assert lvm_driver.owner_tags(Ownership("n1", 3, True, "")) == ["corral_owner_n1_3", "corral_attached"]
    assert lvm_driver.ownership_from_tags(["other"]) is None
    with pytest.raises(RuntimeFailure):
        lvm_driver.ownership_from_tags(["corral_owner_n1_3", "corral_owner_n2_4"])


# --- lvm driver: needs device-mapper ---------------------------------------------------


@pytest.fixture
async def volume_group(tmp_path):
    """A throw-away VG on a loop device (a stand-in for a shared LUN)."""
    reason = await lvm_driver.unavailable_reason()
    if reason:
        pytest.skip(f"lvm driver not testable here: {reason}")
    backing = tmp_path / "pv.img"
    with open(backing, "wb") as f:
        f.truncate(256 * MiB)
    device = (await run(["losetup", "--find", "--show", str(backing)], timeout=10)).stdout.decode().strip()
    vg = f"corraltest{os.getpid()}"
    env = dict(os.environ, LVM_SUPPRESS_FD_WARNINGS="1")
    try:
        await run(["pvcreate", "--yes", device], timeout=60, env=env)
        await run(["vgcreate", vg, device], timeout=60, env=env)
        yield vg
    finally:
        await run(["vgremove", "--yes", "--force", vg], timeout=60, env=env, check=False)
        await run(["pvremove", "--yes", device], timeout=60, env=env, check=False)
        await run(["losetup", "--detach", device], timeout=10, check=False)


async def test_lvm_create_handover_refusal_destroy(volume_group, tmp_path):
    # Two "hosts" on one machine: the ownership contract, not cross-host locking
    # (which needs lvmlockd on real hosts).
    n1 = lvm_driver.LvmStorage(volume_group, tmp_path / "n1", "n1")
    n2 = lvm_driver.LvmStorage(volume_group, tmp_path / "n2", "n2")
    try:
        rootfs = await n1.create_volume("lv-one", 64 * MiB)
        assert n1.is_attached("lv-one") and os.path.ismount(rootfs)
        assert triple(await n1.ownership("lv-one")) == ("n1", 0, True)
        (rootfs / "data").write_bytes(b"payload")
        with pytest.raises(OSError) as enospc:
            (rootfs / "big").write_bytes(b"x" * 80 * MiB)
        assert enospc.value.errno == 28
        (rootfs / "big").unlink()

        with pytest.raises(PermissionDenied, match="attached on n1"):
            await n2.attach("lv-one", 1)
        await n1.detach("lv-one")
        assert not os.path.ismount(rootfs)
        assert triple(await n1.ownership("lv-one")) == ("n1", 0, False)
        rootfs2 = await n2.attach("lv-one", 1)
        assert (rootfs2 / "data").read_bytes() == b"payload"
        assert await n2.attach("lv-one", 1) == rootfs2  # idempotent
        with pytest.raises(PermissionDenied, match="stale"):
            await n1.attach("lv-one", 0)
        with pytest.raises(PermissionDenied):
            await n1.destroy_volume("lv-one")
        assert await n2.usage("lv-one") > 0
        await n2.destroy_volume("lv-one")
        assert not os.path.ismount(rootfs2)
        with pytest.raises(NotFound):
            await n2.ownership("lv-one")
    finally:
        for d in (n1, n2):
            if d.is_attached("lv-one"):
                await run(["umount", str(d.rootfs("lv-one"))], timeout=30, check=False)
