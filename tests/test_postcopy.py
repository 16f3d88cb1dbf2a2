"""Post-copy live migration, as an operator sees it: the container resumes on the target at
once and its memory follows on demand from the source; through a network cut; and when
the target dies mid-transfer. Pre-copy where the kernel tracks dirty memory (skipped here).

A copy "runs" when its workload makes progress: each host has its own copy of the root
filesystem, and the counter the workload writes there moves only where it executes (LXC
alone cannot tell: during post-copy the source's tasks are stopped by CRIU's ptrace while
LXC still calls the container RUNNING)."""

import asyncio
import contextlib
import json
import time
from pathlib import Path

import pytest

import lab as corral_lab
from conftest import running_copies as lxc_running

MEMORY = 64_000_000

WORKLOAD = """#!/bin/sh
# Started by init (so CRIU can dump it): a counter ten times a second, and a process holding
# MEMORY bytes of its own heap (awk strings of 1000 bytes), an eighth of it rewritten in place every
# 2 s: dirty pages that stay mapped (a shell variable would be reallocated each time, and
# memory unmapped before it is pulled never crosses the network).
echo $$ > /tmp/workload.pid
sh -c 'echo $$ > /tmp/memory.pid; exec awk "BEGIN { n = MEMORY / 1024; for (i = 0; i < n; i++) a[i] = sprintf(\\"%1000d\\", i); while (1) { for (i = k % 8; i < n; i += 8) a[i] = sprintf(\\"%1000d\\", i + k); k++; system(\\"sleep 2\\") } }"' &
i=0
while :; do i=$((i+1)); echo $i > /tmp/counter; usleep 100000; done
"""


async def start_workload(corral, name: str, memory: int = MEMORY) -> None:
    script = WORKLOAD.replace("MEMORY", str(memory)).encode()
    await corral("ct", "exec", "-i", name, "--", "sh", "-c", "cat > /etc/init.d/workload.new && chmod +x /etc/init.d/workload.new && mv /etc/init.d/workload.new /etc/init.d/workload", stdin=script)
    await corral("ct", "exec", name, "--", "sh", "-c", "kill $(pidof sleep)")
    async with asyncio.timeout(60):
        while await memory_rss(corral, name) < memory * 0.95 or await read_int(corral, name, "/tmp/counter") < 3:
            await asyncio.sleep(0.3)


async def running_workload(corral, cleanup, name: str, node: str = "n1") -> int:
    """A busybox container on `node` whose init runs the counter and holds MEMORY; its workload's PID."""
    cleanup.append(name)
    await corral("ct", "create", name, "-t", "busybox", "--node", node, "--start")
    await start_workload(corral, name)
    return await read_int(corral, name, "/tmp/workload.pid")


async def read_int(corral, name: str, path: str) -> int:
    """The number in `path` (0 if there is none). The counter's `echo > file` empties the file
    before it writes it: an empty read is read again."""
    for _ in range(5):
        r = await corral("ct", "exec", name, "--", "cat", path, check=False)
        if r.returncode == 0 and r.stdout.strip():
            return int(r.stdout.strip())
        await asyncio.sleep(0.05)
    return 0


async def memory_rss(corral, name: str) -> int:
    """VmRSS of the memory-holding process, in bytes (0 while it is not there)."""
    r = await corral("ct", "exec", name, "--", "sh", "-c", "grep VmRSS /proc/$(cat /tmp/memory.pid)/status", check=False)
    fields = r.stdout.split()
    return int(fields[1]) * 1024 if r.returncode == 0 and len(fields) >= 2 else 0


def counter_on(lab, node: str, name: str) -> int | None:
    """The counter in `node`'s own copy of the root filesystem."""
    try:
        return int((lab.host(node).storage_dir / name / "rootfs" / "tmp" / "counter").read_text().strip())
    except (OSError, ValueError):
        return None


class RunningCopies:
    """Samples every host's counter in the background: how many copies made progress at once."""

    def __init__(self, lab, name: str) -> None:
        self.lab, self.name = lab, name
        self.most = 0
        self.samples: list[tuple[float, dict]] = []
        self._task = None

    async def _run(self) -> None:
        last = {h.node: counter_on(self.lab, h.node, self.name) for h in self.lab.hosts}
        while True:
            await asyncio.sleep(0.5)
            now = {h.node: counter_on(self.lab, h.node, self.name) for h in self.lab.hosts}
            moving = [n for n in now if now[n] is not None and last[n] is not None and now[n] != last[n]]
            self.most = max(self.most, len(moving))
            self.samples.append((time.time(), now))
            last = now

    async def __aenter__(self):
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc):
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@contextlib.asynccontextmanager
async def throttled(lab, node: str, rate: str):
    """Slow what `node` sends (its pages) so that a test can act while they move."""
    async def tc(*args: str) -> None:
        proc = await asyncio.create_subprocess_exec(*corral_lab.host_command(lab.name, node, ["tc", *args]))
        assert await proc.wait() == 0

    await tc("qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", rate, "burst", "64kb", "latency", "1s")
    try:
        yield
    finally:
        await tc("qdisc", "del", "dev", "eth0", "root")


async def wait_mid_transfer(fleet, op_id: str, timeout: float = 120):
    """Until the operation is waiting for pages and some, not all, have arrived."""
    async with asyncio.timeout(timeout):
        async for op in fleet.watch_operation(op_id):
            p = op.progress
            if op.state not in ("pending", "running"):
                raise AssertionError(f"operation ended before its pages moved: {op.state}: {op.error}")
            if p.phase == "wait-pages" and p.bytes_total * 0.1 < p.bytes_done < p.bytes_total * 0.7:
                return op


async def test_postcopy_live_migration_keeps_processes_pid_address_and_memory(corral, cleanup, lab):
    cleanup.append("pc1")
    created = await corral.json("ct", "create", "pc1", "-t", "busybox", "--node", "n1", "--start")
    await start_workload(corral, "pc1")
    pid_before = await read_int(corral, "pc1", "/tmp/workload.pid")
    memory_pid = await read_int(corral, "pc1", "/tmp/memory.pid")
    count_before = await read_int(corral, "pc1", "/tmp/counter")

    async with RunningCopies(lab, "pc1") as copies:
        result = await corral("--output", "json", "ct", "migrate", "pc1", "--to", "n2", "--live", "--postcopy")
    # The risk was stated before the migration began.
    assert "warning: post-copy" in result.stderr and "lost" in result.stderr
    op = result.json()
    assert op["state"] == "succeeded", op["error"]
    assert op["params"]["strategy"] == "post-copy"
    steps = [s["name"] for s in op["steps"]]
    for step in ("lazy-checkpoint", "adopt", "lazy-restore", "switch", "wait-pages", "release-source"):
        assert step in steps, steps
    assert steps.index("lazy-restore") < steps.index("switch") < steps.index("wait-pages") < steps.index("release-source")
    t = op["timings_ms"]
    assert 0 < t["downtime"] <= t["pages_done"], t
    assert t["lazy_bytes"] > MEMORY * 0.9  # the memory went as pages, not in the images
    assert t["images_bytes"] < 4 << 20
    assert copies.most <= 1

    shown = await corral.json("ct", "show", "pc1")
    assert shown["node"] == "n2" and shown["state"] == "running" and shown["network"]["ipv4_cidr"] == created["network"]["ipv4_cidr"]
    count_after = await read_int(corral, "pc1", "/tmp/counter")
    assert count_after >= count_before  # continued, not restarted from zero
    assert await read_int(corral, "pc1", "/tmp/workload.pid") == pid_before
    assert await read_int(corral, "pc1", "/tmp/memory.pid") == memory_pid
    assert await memory_rss(corral, "pc1") > MEMORY * 0.95  # its memory all arrived
    await asyncio.sleep(0.5)
    assert await read_int(corral, "pc1", "/tmp/counter") > count_after  # and still counting
    assert await lxc_running(lab, "pc1") == ["n2"]
    assert not (lab.host("n1").lxc_path / "pc1").exists()
    assert not (lab.host("n1").state_dir / "checkpoints" / op["id"]).exists()
    cleanup.append("pcping")
    await corral("ct", "create", "pcping", "-t", "busybox", "--node", "n3", "--start")
    ping = await corral("ct", "exec", "pcping", "--", "ping", "-c", "1", "-W", "2", created["network"]["ipv4_cidr"].split("/")[0], check=False)
    assert ping.returncode == 0
    print(f"\npost-copy {MEMORY >> 20} MB: downtime {t['downtime']:.0f} ms, all pages {t['pages_done']:.0f} ms, "
          f"timings {json.dumps(t)}")


async def test_postcopy_survives_a_network_cut_while_pages_move(corral, cleanup, lab, fleet):
    pid_before = await running_workload(corral, cleanup, "pc2")

    async with RunningCopies(lab, "pc2") as copies, throttled(lab, "n1", "50mbit"):
        op = await fleet.migrate("pc2", "n2", live=True, postcopy=True)
        mid = await wait_mid_transfer(fleet, op.id)
        await corral_lab.set_host_link(lab.name, "n2", up=False)
        try:
            await asyncio.sleep(3)
        finally:
            await corral_lab.set_host_link(lab.name, "n2", up=True)
        final = await fleet.wait_operation(op.id)
    assert final.state == "succeeded", final.error
    assert mid.progress.bytes_done < mid.progress.bytes_total  # the cut came while pages were moving
    assert copies.most <= 1
    shown = await corral.json("ct", "show", "pc2")
    assert shown["node"] == "n2" and shown["state"] == "running"
    assert await read_int(corral, "pc2", "/tmp/workload.pid") == pid_before
    assert await memory_rss(corral, "pc2") > MEMORY * 0.95
    count = await read_int(corral, "pc2", "/tmp/counter")
    await asyncio.sleep(0.5)
    assert await read_int(corral, "pc2", "/tmp/counter") > count
    assert await lxc_running(lab, "pc2") == ["n2"]
    t = final.timings_ms
    print(f"\npost-copy through a 3 s cut: downtime {t['downtime']:.0f} ms, all pages {t['pages_done']:.0f} ms "
          f"(cut at {mid.progress.bytes_done >> 20}/{mid.progress.bytes_total >> 20} MiB)")


async def test_postcopy_target_crash_keeps_the_source_checkpoint(corral, cleanup, lab, fleet):
    pid_before = await running_workload(corral, cleanup, "pc3")
    memory_pid = await read_int(corral, "pc3", "/tmp/memory.pid")

    async with RunningCopies(lab, "pc3") as copies:
        async with throttled(lab, "n1", "50mbit"):
            op = await fleet.migrate("pc3", "n2", live=True, postcopy=True)
            await wait_mid_transfer(fleet, op.id)
            await corral_lab.crash_host(lab.name, "n2")
            await corral_lab.start_agent(lab.name, "n2")
            final = await fleet.wait_operation(op.id)
        await asyncio.sleep(2)  # nothing runs on afterwards either
    assert final.state == "failed", final
    assert copies.most <= 1, copies.samples
    assert await lxc_running(lab, "pc3") == []
    kept = lab.host("n1").state_dir / "checkpoints" / op.id
    # The error says what happened, where the container's state is, and how to run it from there.
    assert "resumed on n2" in final.error and "not running anywhere" in final.error, final.error
    assert str(kept) in final.error and f"--from-checkpoint {op.id}" in final.error, final.error
    assert (kept / "inventory.img").is_file() and (kept / "corral-kept.json").is_file()
    assert json.loads(final.params["kept_checkpoint"]) == str(kept)
    wait = next(s for s in final.steps if s.name == "wait-pages")
    assert wait.state == "failed"
    assert "resume-source" not in [s.name for s in final.steps]  # never resumed by itself
    for _ in range(50):  # (an empty read: caught between the counter's truncate and write)
        if (frozen_count := counter_on(lab, "n1", "pc3")) is not None:
            break

    # The operator runs it from the kept checkpoint: as it was at the freeze, on the source.
    back = await corral.json("ct", "migrate", "pc3", "--to", "n1", "--from-checkpoint", op.id)
    assert back["state"] == "succeeded", back["error"]
    shown = await corral.json("ct", "show", "pc3")
    assert shown["node"] == "n1" and shown["state"] == "running"
    assert await read_int(corral, "pc3", "/tmp/workload.pid") == pid_before
    assert await read_int(corral, "pc3", "/tmp/memory.pid") == memory_pid
    assert await memory_rss(corral, "pc3") > MEMORY * 0.95
    async with asyncio.timeout(10):
        while (counter_on(lab, "n1", "pc3") or 0) <= frozen_count + 3:  # on from where it froze
            await asyncio.sleep(0.2)
    assert await lxc_running(lab, "pc3") == ["n1"]
    assert not (lab.host("n2").lxc_path / "pc3").exists()
    assert not kept.exists()
    # Its network came back with it (the failed dump's lock is gone).
    cleanup.append("pcping3")
    await corral("ct", "create", "pcping3", "-t", "busybox", "--node", "n3", "--start")
    ping = await corral("ct", "exec", "pcping3", "--", "ping", "-c", "1", "-W", "2", shown["network"]["ipv4_cidr"].split("/")[0], check=False)
    assert ping.returncode == 0



def criu_serving(lab, node: str, op_id: str) -> list[int]:
    """PIDs of CRIU tools still working on operation `op_id`'s checkpoint on `node`."""
    images = str(lab.host(node).state_dir / "checkpoints" / op_id).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if argv and Path(argv[0].decode(errors="replace")).name in ("criu", "lxc-checkpoint") and images in argv:
                    found.append(int(entry.name))
    return found


async def test_postcopy_source_agent_restart_while_pages_move(corral, cleanup, lab, fleet):
    """The source's agent dies and comes back while it serves pages: CRIU's page server, in a
    session of its own, serves on; the agent finds it again and the migration finishes."""
    pid_before = await running_workload(corral, cleanup, "pc6")

    async with RunningCopies(lab, "pc6") as copies, throttled(lab, "n1", "50mbit"):
        op = await fleet.migrate("pc6", "n2", live=True, postcopy=True)
        await wait_mid_transfer(fleet, op.id)
        await corral_lab.kill_agent(lab.name, "n1")
        await corral_lab.start_agent(lab.name, "n1")
        final = await fleet.wait_operation(op.id)
    assert final.state == "succeeded", final.error
    assert copies.most <= 1, copies.samples
    shown = await corral.json("ct", "show", "pc6")
    assert shown["node"] == "n2" and shown["state"] == "running"
    assert await read_int(corral, "pc6", "/tmp/workload.pid") == pid_before
    assert await memory_rss(corral, "pc6") > MEMORY * 0.95
    assert await lxc_running(lab, "pc6") == ["n2"]
    assert not (lab.host("n1").lxc_path / "pc6").exists()
    assert criu_serving(lab, "n1", op.id) == []


async def test_postcopy_source_agent_restart_then_target_crash_keeps_the_source(corral, cleanup, lab, fleet):
    """Both sides lose track: the source's agent restarts while it serves pages, then the
    target host dies. The restarted agent still knows the frozen source for what it is and
    keeps it as a checkpoint (not 'memory lost'); the operator runs it from there."""
    pid_before = await running_workload(corral, cleanup, "pc7")

    async with RunningCopies(lab, "pc7") as copies:
        async with throttled(lab, "n1", "50mbit"):
            op = await fleet.migrate("pc7", "n2", live=True, postcopy=True)
            await wait_mid_transfer(fleet, op.id)
            await corral_lab.kill_agent(lab.name, "n1")
            await corral_lab.start_agent(lab.name, "n1")
            await corral_lab.crash_host(lab.name, "n2")
            await corral_lab.start_agent(lab.name, "n2")
            final = await fleet.wait_operation(op.id)
        await asyncio.sleep(2)
    assert final.state == "failed", final
    assert copies.most <= 1, copies.samples
    assert await lxc_running(lab, "pc7") == []
    kept = lab.host("n1").state_dir / "checkpoints" / op.id
    assert (kept / "corral-kept.json").is_file(), final.error
    assert f"--from-checkpoint {op.id}" in final.error, final.error
    assert criu_serving(lab, "n1", op.id) == []

    back = await corral.json("ct", "migrate", "pc7", "--to", "n1", "--from-checkpoint", op.id)
    assert back["state"] == "succeeded", back["error"]
    assert await read_int(corral, "pc7", "/tmp/workload.pid") == pid_before
    assert await memory_rss(corral, "pc7") > MEMORY * 0.95
    count = await read_int(corral, "pc7", "/tmp/counter")
    await asyncio.sleep(0.5)
    assert await read_int(corral, "pc7", "/tmp/counter") > count
    assert await lxc_running(lab, "pc7") == ["n1"]



async def test_stop_and_copy_reports_the_images_as_they_go(corral, cleanup, lab, fleet):
    """The images of a stop-and-copy travel inside its checkpoint step (the downtime's critical
    path): `ops watch` still sees their bytes move, not only the phase."""
    cleanup.append("pc8")
    memory = 192 << 20
    await corral("ct", "create", "pc8", "-t", "busybox", "--node", "n1", "--start")
    await start_workload(corral, "pc8", memory)
    op = await fleet.migrate("pc8", "n2", live=True)
    seen, final = [], None
    async for final in fleet.watch_operation(op.id):
        if final.progress.phase == "send-checkpoint":
            seen.append((final.progress.bytes_done, final.progress.bytes_total))
    assert final.state == "succeeded", final.error
    assert seen, "no progress while the images were sent"
    assert max(total for _, total in seen) > memory * 0.9, seen
    assert any(0 < done <= total for done, total in seen), seen
    assert await memory_rss(corral, "pc8") > memory * 0.95
    # Its memory (space-padded numbers) went compressed: far fewer bytes than the images hold.
    assert final.timings_ms["images_bytes"] < final.timings_ms["images_size_bytes"] / 4, final.timings_ms


async def test_precopy_live_migration_where_the_kernel_tracks_dirty_memory(corral, cleanup, fleet):
    nodes = {n.facts.name: n.facts for n in await fleet.list_nodes()}
    missing = [f"{name}: {facts.live_unavailable.get('pre-copy', 'not offered')}"
               for name, facts in sorted(nodes.items()) if name in ("n1", "n2") and "pre-copy" not in facts.live_strategies]
    if missing:
        pytest.skip("pre-copy is not available here: " + "; ".join(missing))
    cleanup.append("pre1")
    await corral("ct", "create", "pre1", "-t", "busybox", "--node", "n1", "--start")
    await start_workload(corral, "pre1")
    pid_before = await read_int(corral, "pre1", "/tmp/workload.pid")
    op = await corral.json("ct", "migrate", "pre1", "--to", "n2", "--live")
    assert op["state"] == "succeeded", op["error"]
    assert op["params"]["strategy"] == "pre-copy" and op["params"]["predumps"] >= 1
    assert "precopy-memory" in [s["name"] for s in op["steps"]]
    assert await read_int(corral, "pre1", "/tmp/workload.pid") == pid_before
    assert await memory_rss(corral, "pre1") > MEMORY * 0.95


async def test_postcopy_refusals_change_nothing(corral, cleanup):
    cleanup.append("pcshared")
    await corral("ct", "create", "pcshared", "-t", "busybox", "--node", "n1", "--storage", "image", "--disk", "64M", "--start")
    shared = await corral("ct", "migrate", "pcshared", "--to", "n2", "--live", "--postcopy", check=False)
    assert shared.returncode == 5 and "post-copy cannot move" in shared.stderr, shared.stderr
    cold = await corral("ct", "migrate", "pcshared", "--to", "n2", "--postcopy", check=False)
    assert cold.returncode == 2 and "add --live" in cold.stderr
    bogus = await corral("ct", "migrate", "pcshared", "--to", "n2", "--from-checkpoint", "mig-nope", check=False)
    assert bogus.returncode == 3, bogus.stderr
    shown = await corral.json("ct", "show", "pcshared")
    assert shown["node"] == "n1" and shown["state"] == "running"


def test_postcopy_verdicts():
    from controller.operations.postcopy import DONE, FAILED, MOVING, UNKNOWN, UNREACHABLE, SideReport, failure_message, pages_moved, target_gone

    assert pages_moved(SideReport(DONE), SideReport(MOVING), None)
    assert pages_moved(SideReport(UNKNOWN), SideReport(DONE), True)  # target agent restarted, its puller finished
    assert not pages_moved(SideReport(UNKNOWN), SideReport(DONE), None)
    assert not pages_moved(SideReport(FAILED), SideReport(DONE), False)
    assert target_gone(SideReport(FAILED), None) and target_gone(SideReport(UNKNOWN), False)
    assert not target_gone(SideReport(UNREACHABLE), None)
    kept = SideReport(FAILED, "page transfer failed", "/var/lib/corral/agent/checkpoints/op1")
    gone = failure_message("c", "op1", "n1", "n2", SideReport(FAILED, "lazy-pages exited 1"), kept, True)
    assert "not running anywhere" in gone and "/checkpoints/op1" in gone and "--to n1 --from-checkpoint op1" in gone
    unsure = failure_message("c", "op1", "n1", "n2", SideReport(UNREACHABLE), kept, False)
    assert "may still be running" in unsure and "only once n2 is known to be down" in unsure
    lost = failure_message("c", "op1", "n1", "n2", SideReport(FAILED, "x"), SideReport(UNREACHABLE, "no route"), True)
    assert "memory is lost" in lost and "corral ct start c" in lost


async def test_controller_restart_while_pages_move_finishes_the_migration(corral, cleanup, lab, fleet):
    pid_before = await running_workload(corral, cleanup, "pc4")

    async with RunningCopies(lab, "pc4") as copies, throttled(lab, "n1", "50mbit"):
        op = await fleet.migrate("pc4", "n2", live=True, postcopy=True)
        await wait_mid_transfer(fleet, op.id)
        await corral_lab.kill_controller(lab.name)
        await corral_lab.start_controller(lab.name)
        async with asyncio.timeout(120):
            while True:
                r = await corral("--output", "json", "ops", "show", op.id, check=False)
                if r.returncode == 0 and r.json()["state"] in ("succeeded", "failed"):
                    final = r.json()
                    break
                await asyncio.sleep(0.5)
    assert final["state"] == "succeeded", final["error"]
    assert [s["state"] for s in final["steps"] if s["name"] == "wait-pages"] == ["done"]
    assert copies.most <= 1
    shown = await corral.json("ct", "show", "pc4")
    assert shown["node"] == "n2" and shown["state"] == "running"
    assert await read_int(corral, "pc4", "/tmp/workload.pid") == pid_before
    assert await memory_rss(corral, "pc4") > MEMORY * 0.95
    assert await lxc_running(lab, "pc4") == ["n2"]


async def test_postcopy_failing_before_the_target_runs_rolls_back_to_the_source(corral, cleanup, lab):
    """The destination cannot reach the source's page server: its restore fails, so the source,
    frozen and serving, is thawed where it stood (same processes, same memory, its network back)."""
    cleanup.append("pc5")
    created = await corral.json("ct", "create", "pc5", "-t", "busybox", "--node", "n1", "--start")
    await start_workload(corral, "pc5")
    pid_before = await read_int(corral, "pc5", "/tmp/workload.pid")
    n2 = lab.host("n2").address
    block = ["nft", "-f", "-"]
    rules = (f"table inet pctest {{\n chain input {{\n  type filter hook input priority 0;\n"
             f"  ip saddr {n2} ct state new meta l4proto tcp reject with tcp reset\n }}\n}}\n")
    proc = await asyncio.create_subprocess_exec(*corral_lab.host_command(lab.name, "n1", block), stdin=asyncio.subprocess.PIPE)
    await proc.communicate(rules.encode())
    assert proc.returncode == 0
    try:
        async with RunningCopies(lab, "pc5") as copies:
            result = await corral("--output", "json", "ct", "migrate", "pc5", "--to", "n2", "--live", "--postcopy", check=False)
    finally:
        unblock = corral_lab.host_command(lab.name, "n1", ["nft", "delete", "table", "inet", "pctest"])
        await (await asyncio.create_subprocess_exec(*unblock)).wait()
    op = result.json()
    assert result.returncode != 0 and op["state"] == "failed", op
    steps = {s["name"]: s["state"] for s in op["steps"]}
    assert steps["lazy-restore"] == "failed" and steps["resume-source"] == "done", steps
    assert copies.most <= 1
    shown = await corral.json("ct", "show", "pc5")
    assert shown["node"] == "n1" and shown["state"] == "running"
    assert await read_int(corral, "pc5", "/tmp/workload.pid") == pid_before
    count = await read_int(corral, "pc5", "/tmp/counter")
    await asyncio.sleep(0.5)
    assert await read_int(corral, "pc5", "/tmp/counter") > count
    assert await lxc_running(lab, "pc5") == ["n1"]
    assert not (lab.host("n2").lxc_path / "pc5").exists()
    assert not (lab.host("n1").state_dir / "checkpoints" / op["id"]).exists()  # it runs again: its dump went
    cleanup.append("pcping5")
    await corral("ct", "create", "pcping5", "-t", "busybox", "--node", "n3", "--start")
    ping = await corral("ct", "exec", "pcping5", "--", "ping", "-c", "1", "-W", "2", created["network"]["ipv4_cidr"].split("/")[0], check=False)
    assert ping.returncode == 0  # its network lock is gone


def test_strategy_choice_prefers_precopy_and_postcopy_is_opt_in():
    from controller.operations.migrate import choose_strategy
    from corral.errors import FailedPrecondition

    here = ("stop-and-copy", "post-copy")  # what these machines offer
    assert choose_strategy(here, here, postcopy=False) == "stop-and-copy"
    assert choose_strategy(here, here, postcopy=True) == "post-copy"
    tracking = ("stop-and-copy", "pre-copy", "post-copy")
    assert choose_strategy(tracking, tracking, postcopy=False) == "pre-copy"
    assert choose_strategy(tracking, here, postcopy=False) == "stop-and-copy"  # both must offer it
    with pytest.raises(FailedPrecondition):
        choose_strategy(("stop-and-copy",), here, postcopy=True)


async def test_memory_precopy_stops_when_the_dirty_set_stops_shrinking():
    """The pre-copy loop (it cannot run on these machines: no dirty-memory tracking)."""
    import structlog

    from controller.operations.migrate import MigrationPlan
    from controller.model import Operation
    from corral.v1 import agent_pb2 as apb

    class Source:
        def __init__(self, pages):
            self.pages, self.calls = list(pages), []

        async def checkpoint(self, op_id, name, mode, iteration=0):
            self.calls.append((mode, iteration))
            return apb.CheckpointResult(pages_written=self.pages.pop(0), pause_ms=5)

    class Ctx:
        op = Operation.new("migrate", "c", {"source": "n1", "target": "n2"})
        log = structlog.get_logger("test")

        def check_cancel(self):
            pass

    sent = []
    plan = MigrationPlan(Ctx.op, None, None, None)

    async def send(ctx, content, label, key, grant):
        sent.append((content, label))

    plan._send = send
    src = Source([50000, 20000, 15000, 15500, 1])
    assert await plan._precopy_memory(Ctx(), src, "key", "grant") == 4  # 15500 >= 15000: stop there
    assert src.calls == [(apb.CHECKPOINT_MODE_PREDUMP, n) for n in (1, 2, 3, 4)]
    assert [c for c, _ in sent] == [apb.TRANSFER_CONTENT_PREDUMP] * 4  # each pre-dump goes across at once
    assert await plan._precopy_memory(Ctx(), Source([100]), "key", "grant") == 1  # small from the start


@pytest.mark.parametrize("kill_at", ["lazy-checkpoint", "lazy-restore"])
async def test_controller_killed_mid_postcopy_container_runs_exactly_once(corral, cleanup, lab, fleet, kill_at):
    name = f"pck-{kill_at}"
    cleanup.append(name)
    await corral("ct", "create", name, "-t", "busybox", "--node", "n1", "--start")
    await start_workload(corral, name, memory=8_000_000)
    pid_before = await read_int(corral, name, "/tmp/workload.pid")
    async with RunningCopies(lab, name) as copies:
        op = await fleet.migrate(name, "n2", live=True, postcopy=True)
        # Killed once the step is recorded: its call to the agent is under way (or done).
        async for snapshot in fleet.watch_operation(op.id):
            if kill_at in [s.name for s in snapshot.steps] or snapshot.state not in ("pending", "running"):
                break
        assert kill_at in [s.name for s in snapshot.steps], snapshot
        await corral_lab.kill_controller(lab.name)
        await corral_lab.start_controller(lab.name)
        async with asyncio.timeout(120):
            while True:
                r = await corral("--output", "json", "ops", "show", op.id, check=False)
                if r.returncode == 0 and r.json()["state"] in ("succeeded", "failed"):
                    final = r.json()
                    break
                await asyncio.sleep(0.5)
        await asyncio.sleep(1)
    assert copies.most <= 1
    expected = "n2" if final["state"] == "succeeded" else "n1"
    shown = await corral.json("ct", "show", name)
    assert shown["node"] == expected and shown["state"] == "running", (final["state"], final["error"])
    assert await lxc_running(lab, name) == [expected]
    assert await read_int(corral, name, "/tmp/workload.pid") == pid_before  # its processes, moved or resumed
    count = await read_int(corral, name, "/tmp/counter")
    await asyncio.sleep(0.5)
    assert await read_int(corral, name, "/tmp/counter") > count
