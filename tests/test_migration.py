"""An operator moves containers between lab hosts: cold and live, and when things go wrong."""

import asyncio

import pytest

from conftest import running_copies
import lab as corral_lab

COUNTER = """#!/bin/sh
# A workload started by init (so CRIU can dump it): counts ten times a second.
echo $$ > /tmp/workload.pid
i=0
while :; do i=$((i+1)); echo $i > /tmp/counter; usleep 100000; done
"""


async def start_counter(corral, name: str) -> None:
    """Swap the container's workload for the counter; init respawns it."""
    await corral("ct", "exec", "-i", name, "--", "sh", "-c", "cat > /etc/init.d/workload.new && chmod +x /etc/init.d/workload.new && mv /etc/init.d/workload.new /etc/init.d/workload", stdin=COUNTER.encode())
    await corral("ct", "exec", name, "--", "sh", "-c", "kill $(pidof sleep)")
    async with asyncio.timeout(10):
        while True:
            r = await corral("ct", "exec", name, "--", "cat", "/tmp/counter", check=False)
            if r.returncode == 0 and int(r.stdout.strip() or 0) > 3:
                return
            await asyncio.sleep(0.2)


async def read_int(corral, name: str, path: str) -> int:
    # The workload rewrites the file ten times a second: a read can land on it empty.
    async with asyncio.timeout(5):
        while True:
            text = (await corral("ct", "exec", name, "--", "cat", path)).stdout.strip()
            if text:
                return int(text)
            await asyncio.sleep(0.05)


async def test_cold_migration_moves_the_files_and_removes_the_source_copy(corral, cleanup, lab):
    cleanup.append("cold1")
    created = await corral.json("ct", "create", "cold1", "-t", "busybox", "--node", "n1", "--start")
    await corral("ct", "exec", "cold1", "--", "sh", "-c", "echo precious > /root/data; dd if=/dev/urandom of=/root/blob bs=1k count=2048 2>/dev/null; md5sum /root/blob > /root/blob.md5")

    done = await corral("ct", "migrate", "cold1", "--to", "n2")
    assert "downtime" in done.stdout

    shown = await corral.json("ct", "show", "cold1")
    assert shown["node"] == "n2" and shown["state"] == "running"
    assert shown["network"]["ipv4_cidr"] == created["network"]["ipv4_cidr"]
    assert (await corral("ct", "exec", "cold1", "--", "cat", "/root/data")).stdout == "precious\n"
    check = await corral("ct", "exec", "cold1", "--", "md5sum", "-c", "/root/blob.md5")
    assert "OK" in check.stdout
    # The source's copy is gone: no LXC container, no rootfs.
    assert not (lab.host("n1").lxc_path / "cold1").exists()
    assert not (lab.host("n1").storage_dir / "cold1").exists()
    ops = await corral.json("ops", "ls", "--container", "cold1")
    assert ops[-1]["state"] == "succeeded" and ops[-1]["params"]["target"] == "n2"


async def test_live_migration_keeps_processes_pid_and_address(corral, cleanup, lab):
    cleanup.append("live1")
    created = await corral.json("ct", "create", "live1", "-t", "busybox", "--node", "n1", "--start")
    await start_counter(corral, "live1")
    pid_before = await read_int(corral, "live1", "/tmp/workload.pid")
    count_before = await read_int(corral, "live1", "/tmp/counter")

    op = await corral.json("ct", "migrate", "live1", "--to", "n3", "--live")
    assert op["state"] == "succeeded", op["error"]
    assert op["timings_ms"]["downtime"] > 0 and op["timings_ms"]["criu_frozen"] > 0

    shown = await corral.json("ct", "show", "live1")
    assert shown["node"] == "n3" and shown["state"] == "running" and shown["network"]["ipv4_cidr"] == created["network"]["ipv4_cidr"]
    count_after = await read_int(corral, "live1", "/tmp/counter")
    assert count_after >= count_before  # continued, not restarted from zero
    assert await read_int(corral, "live1", "/tmp/workload.pid") == pid_before
    await asyncio.sleep(0.5)
    assert await read_int(corral, "live1", "/tmp/counter") > count_after  # and still counting
    assert not (lab.host("n1").lxc_path / "live1").exists()
    # Reachable at its old address from another host's container.
    cleanup.append("pinger")
    await corral("ct", "create", "pinger", "-t", "busybox", "--node", "n2", "--start")
    ping = await corral("ct", "exec", "pinger", "--", "ping", "-c", "1", "-W", "2", created["network"]["ipv4_cidr"].split("/")[0], check=False)
    assert ping.returncode == 0


async def test_bad_migration_requests_are_refused_and_change_nothing(corral, cleanup):
    cleanup.append("stay")
    await corral("ct", "create", "stay", "-t", "busybox", "--node", "n1")
    same = await corral("ct", "migrate", "stay", "--to", "n1", check=False)
    assert same.returncode == 2 and "already on node" in same.stderr
    nowhere = await corral("ct", "migrate", "stay", "--to", "n9", check=False)
    assert nowhere.returncode == 3
    stopped_live = await corral("ct", "migrate", "stay", "--to", "n2", "--live", check=False)
    assert stopped_live.returncode != 0 and "not running" in (stopped_live.stderr + stopped_live.stdout)
    assert (await corral.json("ct", "show", "stay"))["node"] == "n1"
    badname = await corral("ct", "migrate", "../x", "--to", "n2", check=False)
    assert badname.returncode == 2


async def test_cancel_during_rootfs_precopy_leaves_the_source_untouched(corral, cleanup, lab):
    cleanup.append("cancelme")
    await corral("ct", "create", "cancelme", "-t", "busybox", "--node", "n1", "--start")
    # Enough data that the pre-copy takes a while.
    await corral("ct", "exec", "cancelme", "--", "sh", "-c", "dd if=/dev/urandom of=/root/big bs=1M count=300 2>/dev/null")
    op_id = (await corral("ct", "migrate", "cancelme", "--to", "n2", "--detach")).stdout.strip()
    async with asyncio.timeout(30):
        while (await corral.json("ops", "show", op_id))["progress"]["phase"].split(" ")[0] not in ("precopy-rootfs",):
            await asyncio.sleep(0.05)
    await corral("ops", "cancel", op_id)
    final = await corral("ops", "watch", op_id, check=False)
    assert final.returncode == 9, final.stdout + final.stderr
    shown = await corral.json("ct", "show", "cancelme")
    assert shown["node"] == "n1" and shown["state"] == "running"
    assert not (lab.host("n2").lxc_path / "cancelme").exists()


async def test_destination_agent_killed_during_transfer_source_keeps_running(corral, cleanup, lab):
    cleanup.append("victim")
    await corral("ct", "create", "victim", "-t", "busybox", "--node", "n1", "--start")
    await corral("ct", "exec", "victim", "--", "sh", "-c", "dd if=/dev/urandom of=/root/big bs=1M count=300 2>/dev/null")
    op_id = (await corral("ct", "migrate", "victim", "--to", "n2", "--detach")).stdout.strip()
    async with asyncio.timeout(30):
        while (await corral.json("ops", "show", op_id))["progress"]["phase"].split(" ")[0] != "precopy-rootfs":
            await asyncio.sleep(0.05)
    await corral_lab.kill_agent(lab.name, "n2")
    try:
        final = (await corral("--output", "json", "ops", "watch", op_id, check=False)).json()
        assert final["state"] == "failed", final
    finally:
        await corral_lab.start_agent(lab.name, "n2")
    shown = await corral.json("ct", "show", "victim")
    assert shown["node"] == "n1" and shown["state"] == "running"


async def test_cold_migration_on_shared_storage_hands_the_volume_over(corral, cleanup, lab):
    cleanup.append("shared1")
    await corral("ct", "create", "shared1", "-t", "busybox", "--node", "n1", "--storage", "image", "--disk", "64M", "--start")
    await corral("ct", "exec", "shared1", "--", "sh", "-c", "echo on-the-san > /root/data")
    image = lab.shared_dir / "images" / "shared1.img"
    inode = image.stat().st_ino

    op = await corral.json("ct", "migrate", "shared1", "--to", "n2")
    assert op["state"] == "succeeded", op["error"]
    assert op["result"]["bytes_sent"] == 0  # nothing copied: the volume changed hands
    assert "precopy-rootfs" not in [s["name"] for s in op["steps"]]
    shown = await corral.json("ct", "show", "shared1")
    assert shown["node"] == "n2" and shown["state"] == "running"
    assert (await corral("ct", "exec", "shared1", "--", "cat", "/root/data")).stdout == "on-the-san\n"
    assert image.stat().st_ino == inode
    owner = (lab.shared_dir / "images" / "shared1.owner").read_text()
    assert '"node": "n2"' in owner and '"attached": true' in owner
    # A write past the volume's size fails: the disk limit is real on image storage.
    full = await corral("ct", "exec", "shared1", "--", "sh", "-c", "dd if=/dev/zero of=/root/fill bs=1M count=100", check=False)
    assert full.returncode != 0


async def test_destination_disk_full_fails_cleanly_and_source_is_untouched(corral, cleanup, lab):
    cleanup.append("roomy")
    await corral("ct", "create", "roomy", "-t", "busybox", "--node", "n1", "--start")
    await corral("ct", "exec", "roomy", "--", "sh", "-c", "dd if=/dev/urandom of=/root/big bs=1M count=40 2>/dev/null; md5sum /root/big > /root/big.md5")
    staging = lab.host("n2").state_dir / "staging"
    mount = corral_lab.host_command(lab.name, "n2", ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(staging)])
    assert (await (await asyncio.create_subprocess_exec(*mount)).wait()) == 0
    try:
        result = await corral("--output", "json", "ct", "migrate", "roomy", "--to", "n2", check=False)
        op = result.json()
        assert result.returncode != 0 and op["state"] == "failed"
        assert "space" in op["error"].lower(), op["error"]
    finally:
        umount = corral_lab.host_command(lab.name, "n2", ["umount", str(staging)])
        await (await asyncio.create_subprocess_exec(*umount)).wait()
    shown = await corral.json("ct", "show", "roomy")
    assert shown["node"] == "n1" and shown["state"] == "running"
    assert "OK" in (await corral("ct", "exec", "roomy", "--", "md5sum", "-c", "/root/big.md5")).stdout
    assert not (lab.host("n2").lxc_path / "roomy").exists()


@pytest.mark.parametrize("kill_at", ["checkpoint", "restore"])
async def test_controller_killed_mid_live_migration_container_runs_exactly_once(corral, cleanup, lab, fleet, kill_at):
    name = f"crash-{kill_at}"
    cleanup.append(name)
    await corral("ct", "create", name, "-t", "busybox", "--node", "n1", "--start")
    await start_counter(corral, name)
    op = await fleet.migrate(name, "n2", live=True)
    async for snapshot in fleet.watch_operation(op.id):
        if snapshot.progress.phase == kill_at or snapshot.state not in ("pending", "running"):
            break
    assert snapshot.progress.phase == kill_at, snapshot
    await corral_lab.kill_controller(lab.name)
    await corral_lab.start_controller(lab.name)

    async with asyncio.timeout(90):
        while True:
            r = await corral("--output", "json", "ops", "show", op.id, check=False)
            if r.returncode == 0 and r.json()["state"] in ("succeeded", "failed"):
                final = r.json()
                break
            await asyncio.sleep(0.5)
    assert len(await running_copies(lab, name)) == 1
    shown = await corral.json("ct", "show", name)
    assert shown["state"] == "running"
    expected = "n2" if final["state"] == "succeeded" else "n1"
    assert shown["node"] == expected and await running_copies(lab, name) == [expected]
    assert await read_int(corral, name, "/tmp/counter") > 3  # its memory came along (or stayed)
