"""Checkpoint in place and snapshots (issue 12): `ct stop --stateful` then `ct start` resumes the
processes where they were; `ct snapshot create|ls|restore|rm` keeps and brings back the disk (and
the processes, with --stateful). Both stay on the container's node: migrations are refused while
they exist, a destroy removes them."""

import asyncio

from test_migration import read_int, start_counter


def _saved(lab, node: str, name: str):
    return lab.host(node).lxc_path / name / "corral-saved"


async def test_stateful_stop_and_start_keep_the_processes(corral, cleanup, lab):
    cleanup.append("sf1")
    await corral("ct", "create", "sf1", "-t", "busybox", "--node", "n1", "--start")
    await start_counter(corral, "sf1")
    pid_before = await read_int(corral, "sf1", "/tmp/workload.pid")
    count_before = await read_int(corral, "sf1", "/tmp/counter")

    stopped = await corral("ct", "stop", "--stateful", "sf1")
    assert "stateful" in stopped.stdout
    shown = await corral.json("ct", "show", "sf1")
    assert shown["state"] == "stopped" and shown["stateful_stopped"] is True
    assert (_saved(lab, "n1", "sf1") / "inventory.img").is_file()
    listed = (await corral("ct", "ls", "--node", "n1")).stdout
    assert any(line.split()[:2] == ["sf1", "stopped(stateful)"] for line in listed.splitlines()), listed
    await asyncio.sleep(3)  # a counter running through the stop would count 30 meanwhile

    started = await corral.json("ct", "start", "sf1")
    assert started["state"] == "running" and not started.get("stateful_stopped")
    assert await read_int(corral, "sf1", "/tmp/workload.pid") == pid_before  # the same process, resumed
    count_after = await read_int(corral, "sf1", "/tmp/counter")
    assert count_before <= count_after < count_before + 20  # on from where it was, not through the stop
    await asyncio.sleep(0.5)
    assert await read_int(corral, "sf1", "/tmp/counter") > count_after  # and still counting
    assert not _saved(lab, "n1", "sf1").exists()  # the images are gone once it runs again

    # Saved processes stay on their node: a migration is refused before anything is touched.
    await corral("ct", "stop", "--stateful", "sf1")
    refused = await corral("ct", "migrate", "sf1", "--to", "n2", check=False)
    assert refused.returncode != 0 and "processes saved" in refused.stdout + refused.stderr
    shown = await corral.json("ct", "show", "sf1")
    assert shown["node"] == "n1" and shown["stateful_stopped"] is True
    # A stateless start drops them and boots afresh (a new workload process).
    await corral("ct", "start", "--stateless", "sf1")
    assert not _saved(lab, "n1", "sf1").exists()
    assert (await corral.json("ct", "show", "sf1"))["state"] == "running"

    # Not running: nothing to save. A destroy removes saved processes with the container.
    await corral("ct", "stop", "--stateful", "sf1")
    again = await corral("ct", "stop", "--stateful", "sf1")  # a repeat is a no-op
    assert again.returncode == 0
    await corral("ct", "start", "--stateless", "sf1")
    await corral("ct", "stop", "sf1")
    nothing = await corral("ct", "stop", "--stateful", "sf1", check=False)
    assert nothing.returncode == 5 and "not running" in nothing.stderr
    await corral("ct", "start", "sf1")
    await corral("ct", "stop", "--stateful", "sf1")
    await corral("ct", "destroy", "sf1")
    assert not (lab.host("n1").lxc_path / "sf1").exists()


async def test_snapshot_restore_brings_back_the_files(corral, cleanup, lab):
    cleanup.append("sf2")
    await corral("ct", "create", "sf2", "-t", "busybox", "--node", "n2", "--start")
    await corral("ct", "exec", "sf2", "--", "sh", "-c", "echo v1 > /root/data; rm -f /root/new")

    taken = await corral.json("ct", "snapshot", "create", "sf2", "s1")
    assert taken["name"] == "s1" and not taken.get("stateful") and int(taken["size_bytes"]) > 0
    table = (await corral("ct", "snapshot", "ls", "sf2")).stdout
    assert table.splitlines()[0].split() == ["NAME", "CREATED", "STATEFUL", "SIZE"]
    rows = (await corral("ct", "snapshot", "ls", "sf2", "--no-headers")).stdout.splitlines()
    assert len(rows) == 1 and rows[0].split()[0] == "s1" and rows[0].split()[3] == "no"
    dup = await corral("ct", "snapshot", "create", "sf2", "s1", check=False)
    assert dup.returncode == 4, dup.stderr
    bad = await corral("ct", "snapshot", "create", "sf2", "../x", check=False)
    assert bad.returncode == 2 and "snapshot name" in bad.stderr

    # Same size, time set back: a restore must not trust rsync's quick check.
    await corral("ct", "exec", "sf2", "--", "sh", "-c", "touch -r /root/data /root/ref; echo v2 > /root/data; "
                 "touch -r /root/ref /root/data; echo later > /root/new")
    running = await corral("ct", "snapshot", "restore", "sf2", "s1", check=False)
    assert running.returncode == 5 and "stop it" in running.stderr
    # Snapshots stay on their node: a migration is refused, nothing moves.
    refused = await corral("ct", "migrate", "sf2", "--to", "n1", check=False)
    assert refused.returncode != 0 and "snapshot" in refused.stdout + refused.stderr
    assert (await corral.json("ct", "show", "sf2"))["node"] == "n2"

    await corral("ct", "stop", "sf2")
    restored = await corral.json("ct", "snapshot", "restore", "sf2", "s1")
    assert restored["state"] == "stopped"
    await corral("ct", "start", "sf2")
    assert (await corral("ct", "exec", "sf2", "--", "cat", "/root/data")).stdout == "v1\n"
    gone = await corral("ct", "exec", "sf2", "--", "test", "-e", "/root/new", check=False)
    assert gone.returncode == 1  # a file made after the snapshot is gone

    missing = await corral("ct", "snapshot", "restore", "sf2", "nope", check=False)
    assert missing.returncode == 3
    await corral("ct", "snapshot", "rm", "sf2", "s1")
    assert await corral.json("ct", "snapshot", "ls", "sf2") == []
    again = await corral("ct", "snapshot", "rm", "sf2", "s1", check=False)
    assert again.returncode == 3

    # A destroy removes the container's snapshots with it.
    await corral("ct", "snapshot", "create", "sf2", "s2")
    await corral("ct", "destroy", "--force", "sf2")
    assert not (lab.host("n2").lxc_path / "sf2").exists()


async def test_stateful_snapshot_brings_the_processes_back(corral, cleanup, lab):
    cleanup.append("sf3")
    await corral("ct", "create", "sf3", "-t", "busybox", "--node", "n3", "--start")
    await start_counter(corral, "sf3")
    pid = await read_int(corral, "sf3", "/tmp/workload.pid")
    count_at_snapshot = await read_int(corral, "sf3", "/tmp/counter")

    taken = await corral.json("ct", "snapshot", "create", "sf3", "warm", "--stateful")
    assert taken["stateful"] is True
    # It runs on after the snapshot, the same process.
    assert (await corral.json("ct", "show", "sf3"))["state"] == "running"
    assert await read_int(corral, "sf3", "/tmp/workload.pid") == pid
    await asyncio.sleep(2)
    count_later = await read_int(corral, "sf3", "/tmp/counter")
    assert count_later > count_at_snapshot + 10

    await corral("ct", "stop", "--force", "sf3")
    restored = await corral.json("ct", "snapshot", "restore", "sf3", "warm")
    assert restored["state"] == "running" and restored["desired_state"] == "running"
    assert await read_int(corral, "sf3", "/tmp/workload.pid") == pid
    count_restored = await read_int(corral, "sf3", "/tmp/counter")
    # Back to the moment of the snapshot (and counting on from there), not where it was stopped.
    assert count_at_snapshot <= count_restored < count_later
    rows = (await corral("ct", "snapshot", "ls", "sf3", "--no-headers")).stdout.splitlines()
    assert rows[0].split()[0] == "warm" and rows[0].split()[3] == "yes"


async def test_a_failed_restore_keeps_the_saved_processes_and_stateless_starts_afresh(corral, cleanup, lab):
    cleanup.append("sf4")
    await corral("ct", "create", "sf4", "-t", "busybox", "--node", "n1", "--start")
    await corral("ct", "stop", "--stateful", "sf4")
    saved = _saved(lab, "n1", "sf4")
    for pages in saved.glob("pages-*.img"):
        pages.unlink()  # the saved memory is damaged: CRIU cannot restore it

    failed = await corral("ct", "start", "sf4", check=False)
    assert failed.returncode == 5, failed.stderr
    assert "cannot restore" in failed.stderr and "--stateless" in failed.stderr and "restore.log" in failed.stderr
    shown = await corral.json("ct", "show", "sf4")
    assert shown["state"] == "stopped" and shown["stateful_stopped"] is True  # kept, for the operator to look at
    assert (saved / "inventory.img").is_file()

    started = await corral.json("ct", "start", "--stateless", "sf4")
    assert started["state"] == "running" and not started.get("stateful_stopped")
    assert not saved.exists()
    assert (await corral("ct", "exec", "sf4", "--", "true")).returncode == 0


GHOST_WORKLOAD = """#!/bin/sh
# Holds a deleted 2 MiB file open: more than CRIU dumps of a ghost file (its --ghost-limit, 1 MiB).
dd if=/dev/zero of=/root/big bs=1M count=2 2>/dev/null
exec 3</root/big
rm /root/big
echo $$ > /tmp/workload.pid
exec sleep 2147483647
"""


async def test_a_container_criu_cannot_dump_keeps_running_and_says_why(corral, cleanup, lab):
    cleanup.append("sf5")
    await corral("ct", "create", "sf5", "-t", "busybox", "--node", "n2", "--start")
    await corral("ct", "exec", "-i", "sf5", "--", "sh", "-c", "cat > /etc/init.d/w.new && chmod +x /etc/init.d/w.new "
                 "&& mv /etc/init.d/w.new /etc/init.d/workload && kill $(pidof sleep)", stdin=GHOST_WORKLOAD.encode())
    async with asyncio.timeout(10):
        while (await corral("ct", "exec", "sf5", "--", "test", "-s", "/tmp/workload.pid", check=False)).returncode:
            await asyncio.sleep(0.2)
    pid = await read_int(corral, "sf5", "/tmp/workload.pid")

    refused = await corral("ct", "stop", "--stateful", "sf5", check=False)
    assert refused.returncode == 5, refused.stderr
    assert "cannot save the processes" in refused.stderr and "ghost file" in refused.stderr
    assert "keeps running" in refused.stderr
    shown = await corral.json("ct", "show", "sf5")
    # Nothing changed: it runs, the same process, and the fleet still wants it running.
    assert shown["state"] == "running" and shown["desired_state"] == "running" and not shown.get("stateful_stopped")
    assert await read_int(corral, "sf5", "/tmp/workload.pid") == pid
    assert not _saved(lab, "n2", "sf5").exists()
