"""The landing file (agent/transfer/landing.py): page cache a live migration's target writes
before the freeze, which the biggest memory image is then written over.

Through the real endpoints: the images' TLS endpoint and the SSH transfer port (in-process
receivers), with the pieces written while "CRIU" (here a coroutine) writes the images.
"""

from __future__ import annotations

import asyncio
import datetime
import os
from pathlib import Path

import pytest

from agent.transfer import tls_stream
from agent.transfer.grants import GrantRegistry
from agent.transfer.keys import new_operation_keypair
from agent.transfer.landing import LANDING_NAME, MIN_BYTES, LandingFile, landing_size
from agent.transfer.server import TransferServer
from agent.transfer.stream_push import StreamPusher
from agent.transfer.tls_stream import ImagesReceiver
from corral import pki
from corral.errors import InvalidArgument
from agent.transfer.client import PushTarget

MiB = 1 << 20


def _memory(n: int) -> list[bytes]:
    """n MiB as a heap looks: half repeating (compresses), half random (goes whole)."""
    seed = os.urandom(4096)
    return [os.urandom(MiB) if i % 2 else seed * 256 for i in range(n)]


async def _dump(images: Path, pieces: list[bytes], small: bytes = b"small process") -> None:
    images.mkdir(exist_ok=True)
    with open(images / "pages-1.img", "wb") as big:
        for piece in pieces:
            big.write(piece)
            big.flush()
            await asyncio.sleep(0.01)
    (images / "pages-2.img").write_bytes(small)
    (images / "inventory.img").write_bytes(b"inventory")


def _grows(name: str) -> bool:
    return name.startswith("pages-")


async def _prepared(staging: Path, size: int) -> LandingFile:
    landing = LandingFile(staging, size)
    landing.start()
    assert await landing.prepared()
    return landing


@pytest.fixture
async def tls_endpoint(tmp_path):
    """An operation's TLS endpoint for its images, and the landing it offers the stream."""
    staging = tmp_path / "staging"
    staging.mkdir()
    offered: list[LandingFile | None] = [None]
    one_time = pki.one_time_tls("127.0.0.1", datetime.timedelta(hours=1), "images of a test")
    receiver = await asyncio.to_thread(ImagesReceiver.open, "127.0.0.1", staging / "checkpoint", one_time, tmp_path,
                                       "optest", lambda: offered[0])  # fmt: skip
    receiver.start()
    try:
        yield receiver, one_time.client(), staging, offered
    finally:
        await receiver.close()


async def _push_tls(receiver, client, tmp_path: Path, pieces: list[bytes], **dump) -> None:
    images = tmp_path / "images"
    sent = await tls_stream.push_while_writing(images, "127.0.0.1", receiver.port, client, tmp_path,
                                               writing=asyncio.ensure_future(_dump(images, pieces, **dump)),
                                               grows=_grows, compress=True, timeout=30)  # fmt: skip
    assert sent is not None


async def test_the_big_memory_image_is_written_over_the_landing_file(tls_endpoint, tmp_path):
    """The landing file becomes pages-1.img (the same inode: its page cache was reused), cut to
    the image's size, its bytes exactly the image's; the small image is written as before."""
    receiver, client, staging, offered = tls_endpoint
    landing = offered[0] = await _prepared(staging, 16 * MiB)
    prepared_inode = (staging / LANDING_NAME).stat().st_ino
    pieces = _memory(10)
    await _push_tls(receiver, client, tmp_path, pieces)
    got = receiver.directory / "pages-1.img"
    assert got.read_bytes() == b"".join(pieces)
    assert got.stat().st_ino == prepared_inode and got.stat().st_size == 10 * MiB
    assert got.stat().st_mode & 0o777 == 0o600
    assert (receiver.directory / "pages-2.img").read_bytes() == b"small process"
    assert (receiver.directory / "inventory.img").read_bytes() == b"inventory"
    assert not [p.name for p in staging.iterdir() if p.name.startswith(LANDING_NAME)], "the landing stayed"
    assert not landing.whole and landing.claim() is None  # used up


async def test_an_image_bigger_than_the_landing_grows_past_it(tls_endpoint, tmp_path):
    receiver, client, staging, offered = tls_endpoint
    offered[0] = await _prepared(staging, 4 * MiB)
    pieces = _memory(9)
    await _push_tls(receiver, client, tmp_path, pieces)
    assert (receiver.directory / "pages-1.img").read_bytes() == b"".join(pieces)


async def test_a_landing_that_no_image_needs_is_freed_when_the_stream_ends(tls_endpoint, tmp_path):
    """Only small memory images (a post-copy dump, a tiny container): the landing's page cache
    goes at the end of the stream, not with the staging much later."""
    receiver, client, staging, offered = tls_endpoint
    offered[0] = await _prepared(staging, 8 * MiB)
    await _push_tls(receiver, client, tmp_path, [b"x" * 4096])
    assert (receiver.directory / "pages-1.img").read_bytes() == b"x" * 4096
    assert not (staging / LANDING_NAME).exists()


async def test_a_landing_still_being_written_when_the_dump_begins_is_landed_on_as_far_as_it_got(tls_endpoint, tmp_path):
    """Its writing stops when the stream begins (it must not compete with the dump), and the
    image is written over what it had, then past it."""
    receiver, client, staging, offered = tls_endpoint
    landing = offered[0] = LandingFile(staging, 4096 * MiB)
    landing.start()
    part = staging / (LANDING_NAME + ".part")
    async with asyncio.timeout(20):
        while not part.exists() or part.stat().st_size < 4 * MiB:
            await asyncio.sleep(0.005)
    inode = part.stat().st_ino
    pieces = _memory(64)
    await _push_tls(receiver, client, tmp_path, pieces)
    assert not await asyncio.wait_for(landing.prepared(), 10)
    assert 4 * MiB <= landing.written < 4096 * MiB
    got = receiver.directory / "pages-1.img"
    assert got.read_bytes() == b"".join(pieces) and got.stat().st_ino == inode
    assert not [p.name for p in staging.iterdir() if p.name.startswith(LANDING_NAME)]


async def test_the_ssh_transfer_port_lands_the_images_too(tmp_path):
    """The fallback channel (images over the SSH port) takes the grant's landing file."""
    grants = GrantRegistry(tmp_path / "staging")
    server = TransferServer("127.0.0.1", 0, tmp_path / "hk", grants)
    await server.start()
    pusher = StreamPusher()
    try:
        private, public = new_operation_keypair()
        grant = grants.authorize("opland", public, 60)
        landing = await _prepared(grant.staging, 8 * MiB)
        grants.attach_landing("opland", landing)
        inode = landing.path.stat().st_ino
        images, pieces = tmp_path / "images", _memory(6)
        target = PushTarget(server.address, grant.user, server.host_key, private)
        await pusher.push_while_writing(images, target, "checkpoint", writing=asyncio.ensure_future(_dump(images, pieces)),
                                        grows=_grows, timeout=30, compress=True)  # fmt: skip
        got = grant.staging / "checkpoint" / "pages-1.img"
        assert got.read_bytes() == b"".join(pieces) and got.stat().st_ino == inode
        # The grant ends: a landing of the operation is dropped with it.
        grants.attach_landing("opland", LandingFile(grant.staging, 8 * MiB))
        grants.revoke("opland", remove_staging=True)
        assert grants.landing("opland") is None and not grant.staging.exists()
    finally:
        await pusher.close()
        await server.close()


class _NoContainers:
    node = "n1"

    @staticmethod
    def exists(name):
        return False


def _migrations(server: TransferServer, state: Path, **config):
    """The destination's side of migrations, with no containers (none is adopted here)."""
    from agent.migration import Migrations

    return Migrations(_NoContainers(), server, server.grants, None, state, images_endpoint=False, **config)


def test_landing_size_follows_the_memory_within_what_the_host_can_spare():
    assert landing_size(0, 64 << 30) == 0
    assert landing_size(MIN_BYTES - 1, 64 << 30) == 0  # not worth holding page cache for
    assert landing_size(1 << 30, 64 << 30) == 1 << 30
    assert landing_size(1 << 30, 1 << 30) == 512 * MiB  # at most half the available memory
    assert landing_size(1 << 30, 100 * MiB) == 0


async def test_prepare_receive_writes_the_landing_unless_the_host_turns_it_off(tmp_path):
    """PrepareReceive with the memory the pre-flight saw: a landing file of that size in the
    operation's staging (written in the background, AwaitLanding waits for it); `images_landing: false`, or too little to
    be worth it: none; a negative size is refused."""
    grants = GrantRegistry(tmp_path / "staging")
    server = TransferServer("127.0.0.1", 0, tmp_path / "hk", grants)
    await server.start()
    _, public = new_operation_keypair()
    try:
        for on in (True, False):
            migrations = _migrations(server, tmp_path / f"state-{on}", images_landing=on)
            op = f"op-{str(on).lower()}"
            await migrations.prepare_receive(op, "c1", public, 60, expect_image_bytes=MIN_BYTES)
            landing = grants.landing(op)
            assert (landing is not None) is on
            # What the controller waits on before the freeze (AwaitLanding).
            assert await migrations.await_landing(op, 30) == ((True, MIN_BYTES) if on else (False, 0))
            if on:
                assert landing.path.stat().st_size == MIN_BYTES
            await migrations.prepare_receive("op-small", "c1", public, 60, expect_image_bytes=MiB)
            assert grants.landing("op-small") is None
            with pytest.raises(InvalidArgument):
                await migrations.prepare_receive("op-bad", "c1", public, 60, expect_image_bytes=-1)
            await migrations.finish_receive(op, discard=True)
            assert grants.landing(op) is None and not (tmp_path / "staging" / op).exists()
            await migrations.close()
    finally:
        await server.close()


async def test_an_agent_that_stops_stops_writing_its_landings(tmp_path):
    """A shutdown does not wait for gigabytes of zeros: the writing stops (the next start sweeps
    the staging, and the file with it)."""
    grants = GrantRegistry(tmp_path / "staging")
    server = TransferServer("127.0.0.1", 0, tmp_path / "hk", grants)
    await server.start()
    try:
        migrations = _migrations(server, tmp_path / "state")
        _, public = new_operation_keypair()
        await migrations.prepare_receive("op-big", "c1", public, 60, expect_image_bytes=4096 * MiB)
        landing = grants.landing("op-big")
        assert landing is not None
        await migrations.close()
        assert not await asyncio.wait_for(landing.prepared(), 10)
        assert landing.written < 4096 * MiB
    finally:
        await server.close()
