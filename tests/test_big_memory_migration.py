"""An operator live-migrates a container holding 512 MiB with each memory strategy the
hosts offer: the memory its process holds is the same afterwards, byte for byte (a
checksum of the process's memory, computed inside the container before and after),
and the process goes on where it was."""

import asyncio
import json
import os

import pytest

from conftest import running_copies

NAME = "bigmem"
MIB = 512
# Held by busybox awk in 60 KiB strings of varied bytes; ten ticks a second rewrite 2 MB of
# them (dirtied memory) until /tmp/pause exists. Started by init, so CRIU can dump it.
WORKLOAD = """#!/bin/sh
echo $$ > /tmp/workload.pid
(while :; do [ -e /tmp/pause ] || echo t; usleep 100000; done) | awk -v MB={mb} -f /etc/hold.awk &
while :; do usleep 1000000; done
"""
HOLD_AWK = r"""BEGIN {
    srand(7)
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    for (k = 0; k < 4096; k++) seed = seed substr(chars, int(rand() * 62) + 1, 1)
    chunk = seed; while (length(chunk) < 65536) chunk = chunk chunk
    n = int(MB * 1048576 / 61440)
    for (i = 0; i < n; i++) a[i] = substr(chunk, 1 + (i % 4096), 61440 - 12) sprintf("%12d", i)
    printf "%d\n", n > "/tmp/hold.ready"; close("/tmp/hold.ready")
}
{
    for (k = 0; k < 32; k++) { a[j] = substr(chunk, 1 + ((j + NR) % 4096), 61440 - 12) sprintf("%12d", NR); j = (j + 1) % n }
    printf "%d\n", NR > "/tmp/hold.ticks"; close("/tmp/hold.ticks")
}
"""
# The checksum of the memory holding the workload's data: the process's anonymous private
# mappings (each 60 KiB string is one), read through /proc/PID/mem; and their total size.
# Not [heap] or [stack]: libc and the stack keep state around the read() the process is
# blocked in, which a checkpoint interrupts and restarts (a flag there changes, by design).
MEMORY_SUM = r"""pid=$(pidof awk)
grep ' rw.p ' /proc/$pid/maps | awk '$6 == "" {print $1}' > /tmp/anon.maps
total=0
while read range; do
    start=$((0x${range%-*})); end=$((0x${range#*-})); total=$((total + end - start))
done < /tmp/anon.maps
sum=$(while read range; do
    start=$((0x${range%-*})); end=$((0x${range#*-}))
    dd if=/proc/$pid/mem bs=4096 skip=$((start / 4096)) count=$(((end - start) / 4096)) 2>/dev/null
done < /tmp/anon.maps | md5sum)
echo "$total ${sum%% *}"
"""


async def inside(corral, *script: str, stdin: bytes | None = None) -> str:
    args = ["ct", "exec", *(["-i"] if stdin is not None else []), NAME, "--", "sh", "-c", *script]
    return (await corral(*args, stdin=stdin)).stdout.strip()


async def ticks(corral) -> int:
    return int(await inside(corral, "cat /tmp/hold.ticks 2>/dev/null || echo 0") or 0)


async def quiet_memory_sum(corral) -> tuple[str, int]:
    """Stop the dirtying, wait until awk has handled its last tick, checksum its memory."""
    await inside(corral, "touch /tmp/pause")
    last = -1
    async with asyncio.timeout(30):
        while (now := await ticks(corral)) != last:
            last = now
            await asyncio.sleep(0.5)
    return await inside(corral, MEMORY_SUM), last


@pytest.fixture(scope="module")
async def strategies(corral):
    nodes = {n["name"]: n for n in await corral.json("node", "ls")}
    offered = [set(nodes[n]["facts"]["live_strategies"]) for n in ("n1", "n2")]
    return offered[0] & offered[1]


@pytest.mark.parametrize("strategy", ["stop-and-copy", "post-copy", "pre-copy"])
async def test_512_mib_moves_live_with_its_memory_intact(corral, lab, cleanup, strategies, strategy):
    if strategy not in strategies:
        pytest.skip(f"the lab's hosts do not offer {strategy} (`corral node show n1`)")
    cleanup.append(NAME)
    await corral("ct", "create", NAME, "-t", "busybox", "--node", "n1", "--memory", f"{MIB + 256}M", "--start")
    await inside(corral, "cat > /etc/hold.awk", stdin=HOLD_AWK.encode())
    await inside(corral, "cat > /etc/init.d/workload.new && chmod +x /etc/init.d/workload.new && "
                 "mv /etc/init.d/workload.new /etc/init.d/workload", stdin=WORKLOAD.format(mb=MIB).encode())  # fmt: skip
    await inside(corral, "kill $(pidof sleep)")  # init respawns the workload
    async with asyncio.timeout(120):
        while await inside(corral, "cat /tmp/hold.ready 2>/dev/null; true") == "" or await ticks(corral) < 20:
            await asyncio.sleep(1)
    rss_kib = int(await inside(corral, "grep VmRSS /proc/$(pidof awk)/status | tr -s ' ' | cut -d' ' -f2"))
    assert rss_kib >= MIB * 1024 * 0.95, f"awk holds only {rss_kib} KiB"
    awk_pid = await inside(corral, "pidof awk")
    before, ticks_before = await quiet_memory_sum(corral)
    assert int(before.split()[0]) >= MIB * 1024 * 1024 * 0.95, f"the checksum covers only {before}"

    log_at = os.path.getsize(lab.host("n2").log_file)
    args = ["ct", "migrate", NAME, "--to", "n2", "--live"] + (["--postcopy"] if strategy == "post-copy" else [])
    await corral(*args, check=False)
    op = (await corral.json("ops", "ls", "--container", NAME))[-1]
    assert op["state"] == "succeeded", op["error"]
    assert op["params"]["strategy"] == strategy
    if strategy == "stop-and-copy":  # its memory image was written over page cache made before the freeze
        with open(lab.host("n2").log_file, "rb") as f:
            f.seek(log_at)
            received = [json.loads(line) for line in f if b'"files received"' in line]
        assert "landing" in op["timings_ms"] and received, (op["timings_ms"], received)
        assert max(r.get("landed_bytes", 0) for r in received) >= MIB * 1024 * 1024 * 0.9, received
    assert await running_copies(lab, NAME) == ["n2"]

    assert await inside(corral, "pidof awk") == awk_pid
    after = await inside(corral, MEMORY_SUM)
    assert after == before, "the process's memory changed across the migration"
    assert await ticks(corral) == ticks_before
    await inside(corral, "rm /tmp/pause")  # and it goes on dirtying where it stopped
    async with asyncio.timeout(20):
        while await ticks(corral) < ticks_before + 10:
            await asyncio.sleep(0.5)
