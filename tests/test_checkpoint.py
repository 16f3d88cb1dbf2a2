"""Checkpoint/restore with real LXC and real CRIU, on the hosts of a two-host lab.

The Checkpointer runs inside an agent, on a host: so each scenario step runs
this file as a driver *on a lab host* (`python tests/test_checkpoint.py
'{json}'` through `lab.host_command`), which prints its results as JSON lines.
Containers are created by the lab's controller (`ct create`), given a counter
workload (`echo "$$ $i" > /tmp/counter` ten times a second) and started. The
workload's PID is the one its shell sees ($$, in the container's PID
namespace): it survives a checkpoint/restore when CRIU keeps it.

The lab is this module's own ("ckp"), so it never collides with the suite's.
Timings are printed at the end (pytest -s) and saved to /tmp/corral-checkpoint-timings.json.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import sys
import time
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest

LAB = "ckp"
COUNTER = '#!/bin/sh\ni=0\nwhile true; do i=$((i+1)); echo "$$ $i" > /tmp/counter; usleep 100000; done\n'
# The same counter, plus a process holding ~16 MB of written memory (pages for post-copy to move).
COUNTER_WITH_MEMORY = (
    "#!/bin/sh\n"
    "sh -c 'x=$(head -c 16000000 /dev/zero | tr \"\\\\000\" x); while true; do sleep 1; done' &\n"
    'i=0\nwhile true; do i=$((i+1)); echo "$$ $i" > /tmp/counter; usleep 100000; done\n'
)
TIMINGS: dict[str, dict] = {}


# -- the lab and what runs on its hosts -------------------------------------------------------


@pytest.fixture(scope="module")
async def ckp():
    import lab

    await lab.lab_down(LAB)  # leftovers of an interrupted run
    info = await lab.lab_up(name=LAB, nodes=2)
    try:
        yield info
    finally:
        if TIMINGS:
            text = json.dumps(TIMINGS, indent=2)
            print("\ncheckpoint timings (ms):\n" + text)
            with open("/tmp/corral-checkpoint-timings.json", "w") as f:
                f.write(text)
        await lab.lab_down(LAB)
        shutil.rmtree(info.base_dir / "checkpoints", ignore_errors=True)  # ours: lab_down keeps what it did not make
        with contextlib.suppress(OSError):
            info.base_dir.rmdir()
        _remove_leftover_cgroups()
    assert not _criu_processes(), "criu processes left behind"


def _remove_leftover_cgroups() -> None:
    """LXC leaves empty cgroups behind when a restore is killed, or for a container it restored
    while another of the same name ran (the lab's hosts share the machine's hierarchies)."""
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        for group in [*hierarchy.glob("lxc.payload.ck-*"), *hierarchy.glob("lxc.monitor.ck-*")]:
            for below in sorted((p for p in group.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                with contextlib.suppress(OSError):
                    below.rmdir()
            with contextlib.suppress(OSError):
                group.rmdir()


def _criu_processes() -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv0 = (entry / "cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if argv0.endswith(b"criu") and f"/{LAB}/".encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return found


def _env() -> dict[str, str]:
    from lab.processes import daemon_env

    return daemon_env()


async def on_host(info, node: str, *argv: str, timeout: float = 60, check: bool = True, output: bool = True) -> str:
    """Run argv on a lab host. `output=False`: stdout and stderr to /dev/null, for commands
    that leave a process behind holding them."""
    import lab

    sink = asyncio.subprocess.PIPE if output else asyncio.subprocess.DEVNULL
    proc = await asyncio.create_subprocess_exec(
        *lab.host_command(info.name, node, list(argv)), stdin=asyncio.subprocess.DEVNULL,
        stdout=sink, stderr=sink, env=_env(),
    )  # fmt: skip
    async with asyncio.timeout(timeout):
        out, err = await proc.communicate()
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} on {node} exited {proc.returncode}: {(err or b'').decode()}")
    return (out or b"").decode()


async def cli(info, *args: str, check: bool = True) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controller.cli.main", "--config", str(info.cli_config), *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_env(),
    )  # fmt: skip
    async with asyncio.timeout(120):
        out, err = await proc.communicate()
    if check and proc.returncode != 0:
        raise AssertionError(f"corral {' '.join(args)} exited {proc.returncode}: {err.decode()}")
    return out.decode()


class Driver:
    """This file, run as a driver on a lab host; JSON lines out, "go" lines in."""

    def __init__(self, proc: asyncio.subprocess.Process, what: str) -> None:
        self.proc, self.what = proc, what

    @classmethod
    async def start(cls, info, node: str, request: dict) -> Driver:
        import lab

        request = {**request, "lxc_path": str(info.host(node).lxc_path)}
        argv = lab.host_command(info.name, node, [sys.executable, str(Path(__file__).resolve()), json.dumps(request)])
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=_env(),
        )  # fmt: skip
        return cls(proc, f"{request['action']} on {node}")

    async def line(self, timeout: float = 120) -> dict:
        async with asyncio.timeout(timeout):
            raw = await self.proc.stdout.readline()
        if not raw:
            err = await self.proc.stderr.read()
            raise AssertionError(f"driver {self.what} ended without an answer: {err.decode()[-3000:]}")
        return json.loads(raw)

    def go(self) -> None:
        self.proc.stdin.write(b"go\n")

    async def close(self, timeout: float = 60) -> None:
        try:
            async with asyncio.timeout(timeout):
                await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


async def drive(info, node: str, request: dict, timeout: float = 180) -> dict:
    driver = await Driver.start(info, node, request)
    try:
        return await driver.line(timeout)
    finally:
        await driver.close()


async def dump_then(info, node: str, name: str, images: Path, then) -> dict:
    """A stopping dump; `then` (the copy and the restore's go) runs as soon as the answer is in,
    before the driver has even exited."""
    driver = await Driver.start(info, node, {"action": "dump", "name": name, "images": str(images)})
    try:
        dump = ok(await driver.line())
        result = then()
        if asyncio.iscoroutine(result):
            await result
        return dump
    finally:
        await driver.close()


def ok(answer: dict) -> dict:
    assert "error" not in answer, f"{answer['error']}: {answer['message']}"
    return answer


# -- containers -----------------------------------------------------------------------------


def rootfs(info, node: str, name: str) -> Path:
    return info.host(node).storage_dir / name / "rootfs"


def read_counter(info, node: str, name: str) -> tuple[int, int]:
    text = (rootfs(info, node, name) / "tmp/counter").read_text().split()
    return int(text[0]), int(text[1])


async def wait_counter(info, node: str, name: str, above: int, timeout: float = 10) -> tuple[int, int]:
    async with asyncio.timeout(timeout):
        while True:
            try:
                pid, value = read_counter(info, node, name)
                if value > above:
                    return pid, value
            except (OSError, ValueError, IndexError):
                pass  # not written yet, or caught mid-write
            await asyncio.sleep(0.05)


async def counter_container(info, name: str, node: str = "n1", workload: str = COUNTER) -> None:
    await cli(info, "ct", "create", name, "-t", "busybox", "--node", node)
    script = rootfs(info, node, name) / "etc/init.d/workload"
    script.write_text(workload)
    script.chmod(0o755)
    await cli(info, "ct", "start", name)
    await wait_counter(info, node, name, above=2)


async def lxc_state(info, node: str, name: str) -> str:
    out = await on_host(info, node, "lxc-info", "-P", str(info.host(node).lxc_path), "-n", name, "-s", "-H",
                        check=False)  # fmt: skip
    return out.strip()


async def destroy(info, name: str, copies_on: tuple[str, ...] = ()) -> None:
    """Remove a test container: hand-made copies on other hosts first, then via the controller."""
    for node in copies_on:
        host = info.host(node)
        await on_host(info, node, "lxc-stop", "-P", str(host.lxc_path), "-n", name, "-k", check=False)
        shutil.rmtree(host.lxc_path / name, ignore_errors=True)
        shutil.rmtree(host.storage_dir / name, ignore_errors=True)
    await cli(info, "ct", "destroy", "--force", name, check=False)


def images_dir(info, node: str, name: str, tag: str = "") -> Path:
    path = info.base_dir / "checkpoints" / node / f"{name}{tag}"
    shutil.rmtree(path, ignore_errors=True)  # lab_down keeps what it did not make
    return path


async def _run(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)  # fmt: skip
    async with asyncio.timeout(60):
        _, err = await proc.communicate()
    assert proc.returncode == 0, f"{argv[0]} failed: {err.decode()}"


async def sync_rootfs(info, name: str, src: str, dst: str) -> None:
    """What the product's rsync channel does (here a local rsync: the lab's hosts share a disk)."""
    target = info.host(dst).storage_dir / name
    target.mkdir(parents=True, exist_ok=True)
    await _run("rsync", "-a", "--delete", f"{info.host(src).storage_dir / name}/", f"{target}/")


async def copy_container_config(info, name: str, src: str, dst: str) -> None:
    """The container's LXC directory, with the source host's paths rewritten to the destination's."""
    s, d = info.host(src), info.host(dst)
    (d.lxc_path / name).mkdir(parents=True, exist_ok=True)
    config = (s.lxc_path / name / "config").read_text()
    config = config.replace(str(s.lxc_path), str(d.lxc_path)).replace(str(s.storage_dir), str(d.storage_dir))
    (d.lxc_path / name / "config").write_text(config)


async def copy_images(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    await _run("cp", "-a", str(src), str(dst))


# -- without the lab: CRIU's stats images, its error lines, its config files -----------------

# A real stats-dump (CRIU 4.1.1, a busybox container): magic, magic, size, StatsEntry{dump{...}}.
STATS_DUMP = bytes.fromhex(
    "4059105506330957240000000a2208c8950610f1820a189b0720990228493000383440004800500c580c600068007000"
)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number: int, value: int | bytes) -> bytes:
    if isinstance(value, bytes):
        return _varint(number << 3 | 2) + _varint(len(value)) + value
    return _varint(number << 3) + _varint(value)


def test_stats_images_are_read_without_crit():
    from agent.runtime.criu_stats import dump_stats_from_bytes, restore_stats_from_bytes, StatsFormatError
    import struct

    dump = dump_stats_from_bytes(STATS_DUMP)
    assert (dump.freezing_us, dump.frozen_us, dump.memdump_us, dump.memwrite_us) == (101064, 164209, 923, 281)
    assert (dump.pages_scanned, dump.pages_written, dump.pages_lazy) == (73, 52, 0)

    entry = _field(2, _field(1, 7) + _field(2, 0) + _field(3, 1575) + _field(4, 161926) + _field(5, 15))
    image = struct.pack("<III", 0x55105940, 0x57093306, len(entry)) + entry
    restore = restore_stats_from_bytes(image)
    assert (restore.forking_us, restore.restore_us, restore.pages_restored) == (1575, 161926, 15)
    assert dump_stats_from_bytes(image) is None  # a restore image has no dump entry

    for bad in (b"", STATS_DUMP[:20], b"\0" * 48, STATS_DUMP[:12] + b"\xff" * 36):
        with pytest.raises(StatsFormatError):
            dump_stats_from_bytes(bad)


def test_lazy_pages_are_counted_in_both_pagemap_formats(tmp_path):
    """CRIU 4.2 moved nr_pages to a u64 field 5 and left field 2 as a compat copy: a post-copy's
    page total (the progress the user sees, and the check that memory went lazily) reads both."""
    from agent.runtime.criu_pagemap import lazy_bytes, lazy_pages_of
    from agent.runtime.criu_stats import StatsFormatError
    import struct

    def image(*entries: bytes) -> bytes:
        out = struct.pack("<II", 0x54564319, 0x56084025)
        for e in (_field(1, 3),) + entries:  # pagemap_head{pages_id}, then the entries
            out += struct.pack("<I", len(e)) + e
        return out

    lazy, present = 2, 4
    old = image(_field(1, 0x1000) + _field(2, 10) + _field(4, lazy), _field(1, 0x9000) + _field(2, 5) + _field(4, present))
    new = image(_field(1, 0x1000) + _field(2, 0) + _field(5, 70000) + _field(4, lazy | present),
                _field(1, 0x9000) + _field(2, 5) + _field(5, 5) + _field(4, present))  # fmt: skip
    assert lazy_pages_of(old) == 10
    assert lazy_pages_of(new) == 70000  # over 2^16 pages: only the u64 field holds it
    (tmp_path / "pagemap-1.img").write_bytes(old)
    (tmp_path / "pagemap-7.img").write_bytes(new)
    (tmp_path / "pagemap-shmem-9.img").write_bytes(b"ignored")
    assert lazy_bytes(tmp_path) == (10 + 70000) * 4096
    with pytest.raises(StatsFormatError):
        lazy_pages_of(b"\x19\x43\x56\x54\x00\x00\x00\x00")


def test_failure_reason_prefers_criu_errors(tmp_path):
    from agent.runtime.checkpoint import failure_reason

    log = tmp_path / "dump.log"
    log.write_text(
        "Error (criu/util.c:1533): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n"
        "Warn  (criu/net.c:534): net: The eth0 veth is in an external netns\n"
        "Error (criu/cr-dump.c:1664): A session leader of 1(10) is outside of its pid namespace\n"
        "Error (criu/cr-dump.c:2111): Dumping FAILED.\n"
    )
    reason = failure_reason(log)
    assert reason.startswith("Error (criu/cr-dump.c:1664): A session leader") and "RLIMIT" not in reason
    out = tmp_path / "out"
    out.write_text("lxc-checkpoint: k: lxc_checkpoint.c: checkpoint: 158 k not running, not checkpointing\n")
    assert "not running" in failure_reason(tmp_path / "missing.log", out)


def test_criu_config_files_refuse_what_criu_would_misread():
    from agent.runtime.checkpoint import PageServer, TlsFiles, _criu_config_text
    from corral.errors import InvalidArgument

    tls = TlsFiles(Path("/pki/ca.crt"), Path("/pki/agent-n1.crt"), Path("/pki/agent-n1.key"))
    server = PageServer("10.0.0.11", 40000, tls)
    text = _criu_config_text([("lazy-pages", None), *server.criu_options(server=True)])
    assert text.splitlines() == ["lazy-pages", "address 10.0.0.11", "port 40000", "tls", "tls-cacert /pki/ca.crt",
                                 "tls-cert /pki/agent-n1.crt", "tls-key /pki/agent-n1.key", "tls-no-cn-verify"]
    assert ("tls-no-cn-verify", None) not in server.criu_options(server=False)  # the client checks the name
    with pytest.raises(InvalidArgument):
        _criu_config_text([("tls-cert", "/a b/cert.pem")])


# -- tests in the lab -------------------------------------------------------------------------


async def test_probe_live_support(ckp):
    support = ok(await drive(ckp, "n1", {"action": "probe"}))
    assert support["criu_ok"] and support["stop_and_copy"]
    assert support["post_copy"], support["reasons"]  # fs.pipe-max-size is raised on these machines
    assert support["pre_copy"] is False
    assert "dirty tracking" in support["reasons"]["pre-copy"]
    assert "post-copy" not in support["reasons"]
    assert support["strategies"] == ["stop-and-copy", "post-copy"]
    assert support["network_lock"] in ("nftables", "iptables")
    assert support["tls"], support["tls_detail"]


async def test_predump_is_refused_with_the_reason(ckp):
    answer = await drive(ckp, "n1", {"action": "predump", "name": "nothing", "images": str(ckp.base_dir / "pd")})
    assert answer.get("error") == "FailedPrecondition", answer
    assert "dirty tracking" in answer["message"] and "mem_dirty_track" in answer["message"]


async def test_checkpoint_and_restore_on_the_same_host(ckp):
    name = "ck-same"
    await counter_container(ckp, name)
    try:
        pid, _ = await wait_counter(ckp, "n1", name, above=5)
        images = images_dir(ckp, "n1", name)
        # The restorer starts first and waits, so the downtime measured is the checkpointer's, not Python's start-up.
        request = {"action": "restore", "name": name, "images": str(images), "wait": True}
        restorer = await Driver.start(ckp, "n1", request)
        at_dump = 0

        def then() -> None:
            nonlocal at_dump
            _, at_dump = read_counter(ckp, "n1", name)  # stopped now: the restore has not begun
            restorer.go()

        try:
            assert (await restorer.line())["waiting"]
            dump = await dump_then(ckp, "n1", name, images, then)
            restore = ok(await restorer.line())
        finally:
            await restorer.close()
        assert restore["started_at"] > dump["finished_at"]
        assert await lxc_state(ckp, "n1", name) == "RUNNING"
        after_pid, after = await wait_counter(ckp, "n1", name, above=at_dump)
        assert after_pid == pid  # the same shell, same PID, counting on from where it was
        assert at_dump < after < at_dump + 20

        assert dump["criu"]["frozen_ms"] > 0 and dump["images_bytes"] > 0
        assert restore["criu"]["restore_ms"] > 0 and restore["init_pid"] > 0
        host_pid = (await on_host(ckp, "n1", "lxc-info", "-P", str(ckp.host("n1").lxc_path), "-n", name, "-p", "-H"))
        assert int(host_pid) == restore["init_pid"]
        TIMINGS["same-host"] = {
            "dump_wall": dump["wall_ms"], "criu_freezing": dump["criu"]["freezing_ms"],
            "criu_frozen": dump["criu"]["frozen_ms"], "criu_memdump": dump["criu"]["memdump_ms"],
            "criu_memwrite": dump["criu"]["memwrite_ms"], "restore_wall": restore["wall_ms"],
            "criu_restore": restore["criu"]["restore_ms"],
            "freeze_to_running": (restore["finished_at"] - (dump["frozen_at"] or dump["started_at"])) * 1000,
            "launch_to_freeze": ((dump["frozen_at"] or dump["started_at"]) - dump["started_at"]) * 1000,
        }  # fmt: skip
    finally:
        await destroy(ckp, name)


async def test_trial_dump_leaves_it_running_and_reports_the_pause(ckp):
    name = "ck-trial"
    await counter_container(ckp, name)
    try:
        pid, before = await wait_counter(ckp, "n1", name, above=3)
        scratch = images_dir(ckp, "n1", name, "-trial")
        trial = ok(await drive(ckp, "n1", {"action": "trial", "name": name, "scratch": str(scratch)}))
        assert trial["criu"]["paused_ms"] > 0 and trial["criu"]["frozen_ms"] > 0
        assert not scratch.exists()  # the images are gone
        assert await lxc_state(ckp, "n1", name) == "RUNNING"
        after_pid, after = await wait_counter(ckp, "n1", name, above=before + 5)
        assert after_pid == pid
        TIMINGS["trial"] = {"wall": trial["wall_ms"], "criu_paused": trial["criu"]["paused_ms"]}
    finally:
        await destroy(ckp, name)


async def test_trial_dump_of_an_undumpable_container_says_why(ckp):
    name = "ck-undump"
    await counter_container(ckp, name)
    try:
        # A process started from outside (lxc-attach): its session leader is outside the
        # container's PID namespace, and its stdio are the host's /dev/null.
        lxc = str(ckp.host("n1").lxc_path)
        await on_host(ckp, "n1", "lxc-attach", "-P", lxc, "-n", name, "--", "sh", "-c", "sleep 1000 &", output=False)
        _, before = read_counter(ckp, "n1", name)
        scratch = images_dir(ckp, "n1", name, "-trial")
        answer = await drive(ckp, "n1", {"action": "trial", "name": name, "scratch": str(scratch)})
        assert answer.get("error") == "RuntimeFailure", answer
        assert "Error (criu/" in answer["message"], answer["message"]  # CRIU's own reason
        assert not scratch.exists()
        assert await lxc_state(ckp, "n1", name) == "RUNNING"
        await wait_counter(ckp, "n1", name, above=before + 3)
        TIMINGS["undumpable-reason"] = {"message": answer["message"][:300]}
    finally:
        await destroy(ckp, name)


async def test_stop_and_copy_to_another_host(ckp):
    name = "ck-move"
    await counter_container(ckp, name)
    try:
        pid, _ = await wait_counter(ckp, "n1", name, above=5)
        ip = (await on_host(ckp, "n1", "lxc-info", "-P", str(ckp.host("n1").lxc_path), "-n", name, "-i", "-H")).strip()
        assert ip
        # As the product does: the rootfs and the container's config go across before the freeze,
        # then the freeze, the dump, a final rootfs sync, the images, the restore.
        await sync_rootfs(ckp, name, "n1", "n2")
        await copy_container_config(ckp, name, "n1", "n2")
        src, dst = images_dir(ckp, "n1", name), images_dir(ckp, "n2", name)
        restorer = await Driver.start(ckp, "n2", {"action": "restore", "name": name, "images": str(dst), "wait": True})
        try:
            assert (await restorer.line())["waiting"]
            copy_ms = 0.0

            async def copy_and_go() -> None:
                nonlocal copy_ms
                t_copy = time.time()
                await sync_rootfs(ckp, name, "n1", "n2")
                await copy_images(src, dst)
                copy_ms = (time.time() - t_copy) * 1000
                restorer.go()

            dump = await dump_then(ckp, "n1", name, src, copy_and_go)
            restore = ok(await restorer.line())
        finally:
            await restorer.close()
        _, at_dump = read_counter(ckp, "n1", name)
        assert await lxc_state(ckp, "n1", name) == "STOPPED"
        assert await lxc_state(ckp, "n2", name) == "RUNNING"
        after_pid, after = await wait_counter(ckp, "n2", name, above=at_dump)
        assert after_pid == pid and at_dump < after < at_dump + 30
        ip_after = await on_host(ckp, "n2", "lxc-info", "-P", str(ckp.host("n2").lxc_path), "-n", name, "-i", "-H")
        assert ip_after.strip() == ip
        # Reachable at its address from the other host (from a busybox shell there).
        ping = await on_host(ckp, "n1", "busybox", "ping", "-c", "2", "-W", "2", ip, check=False)
        assert " 0% packet loss" in ping, ping
        TIMINGS["cross-host-stop-and-copy"] = {
            "dump_wall": dump["wall_ms"], "criu_frozen": dump["criu"]["frozen_ms"],
            "criu_freezing": dump["criu"]["freezing_ms"], "final_copy": copy_ms,
            "restore_wall": restore["wall_ms"], "criu_restore": restore["criu"]["restore_ms"],
            "downtime_freeze_to_running": (restore["finished_at"] - (dump["frozen_at"] or dump["started_at"])) * 1000,
            "launch_to_freeze": ((dump["frozen_at"] or dump["started_at"]) - dump["started_at"]) * 1000,
        }  # fmt: skip
    finally:
        await destroy(ckp, name, copies_on=("n2",))


def _tls(info, node: str) -> dict:
    pki = info.pki_dir
    return {"cacert": str(pki / "ca.crt"), "cert": str(pki / f"agent-{node}.crt"),
            "key": str(pki / f"agent-{node}.key")}  # fmt: skip


async def test_post_copy_to_another_host_over_tls(ckp, tmp_path):
    """Over the one-time TLS the agent makes for each transfer (corral.pki.one_time_tls)."""
    name = "ck-lazy"
    await counter_container(ckp, name, workload=COUNTER_WITH_MEMORY)
    try:
        pid, _ = await wait_counter(ckp, "n1", name, above=5)
        await sync_rootfs(ckp, name, "n1", "n2")
        await copy_container_config(ckp, name, "n1", "n2")
        src, dst = images_dir(ckp, "n1", name), images_dir(ckp, "n2", name)
        address, port = ckp.host("n1").address, random.randint(30000, 60000)
        server_tls, client_tls = _one_time_tls(tmp_path, address)
        restorer = await Driver.start(ckp, "n2", {
            "action": "lazy-restore", "name": name, "images": str(dst), "wait": True,
            "server": {"address": address, "port": port, "tls": client_tls},
        })  # fmt: skip
        source = await Driver.start(ckp, "n1", {
            "action": "lazy-dump", "name": name, "images": str(src),
            "server": {"address": address, "port": port, "tls": server_tls},
        })  # fmt: skip
        try:
            assert (await restorer.line())["waiting"]
            ready = ok(await source.line())
            await sync_rootfs(ckp, name, "n1", "n2")
            await copy_images(src, dst)
            restorer.go()
            running = ok(await restorer.line())
            pages_done = ok(await restorer.line())
            dumped = ok(await source.line())
        finally:
            await restorer.close()
            await source.close()
        assert await lxc_state(ckp, "n1", name) == "STOPPED"
        assert await lxc_state(ckp, "n2", name) == "RUNNING"
        _, at_dump = read_counter(ckp, "n1", name)
        after_pid, _ = await wait_counter(ckp, "n2", name, above=at_dump)
        assert after_pid == pid
        # The 16 MB went across as lazy pages, not in the images.
        assert ready["images_bytes"] < 2 << 20
        usage = await on_host(ckp, "n2", "lxc-info", "-P", str(ckp.host("n2").lxc_path), "-n", name, "-S", "-H")
        memory = int(next(line.split(":")[1] for line in usage.splitlines() if line.startswith("Memory use")))
        assert memory > 15 << 20, usage
        TIMINGS["cross-host-post-copy-tls"] = {
            "images_ready": ready["wall_ms"], "images_bytes": ready["images_bytes"],
            "restore_wall": running["wall_ms"],
            "freeze_to_running": (running["finished_at"] - (dumped["frozen_at"] or dumped["started_at"])) * 1000,
            "freeze_to_all_pages": (pages_done["pages_done_at"] - (dumped["frozen_at"] or dumped["started_at"])) * 1000,
            "launch_to_freeze": ((dumped["frozen_at"] or dumped["started_at"]) - dumped["started_at"]) * 1000,
            "source_exit": (dumped["finished_at"] - dumped["started_at"]) * 1000,
            "memory_on_destination": memory,
        }  # fmt: skip
    finally:
        await destroy(ckp, name, copies_on=("n2",))


async def _refused_lazy_transfer(ckp, name: str, server_tls: dict, client_tls: dict | None):
    """A post-copy from n1 to n2 whose destination the page server must refuse. Returns the
    restorer's answers, the source's last answer and both image directories; checks that
    neither side runs a copy it should not (the destination none, the source its own)."""
    await sync_rootfs(ckp, name, "n1", "n2")
    await copy_container_config(ckp, name, "n1", "n2")
    src, dst = images_dir(ckp, "n1", name), images_dir(ckp, "n2", name)
    address, port = ckp.host("n1").address, random.randint(30000, 60000)
    client = {"address": address, "port": port} | ({"tls": client_tls} if client_tls else {})
    restorer = await Driver.start(ckp, "n2", {
        "action": "lazy-restore", "name": name, "images": str(dst), "wait": True, "timeout": 20, "server": client,
    })  # fmt: skip
    source = await Driver.start(ckp, "n1", {
        "action": "lazy-dump", "name": name, "images": str(src), "timeout": 30, "resume_on_failure": True,
        "server": {"address": address, "port": port, "tls": server_tls},
    })  # fmt: skip
    try:
        assert (await restorer.line())["waiting"]
        ok(await source.line())
        await copy_images(src, dst)
        restorer.go()
        answers = [await restorer.line(60)]
        if "error" not in answers[0]:
            answers.append(await restorer.line(60))
        failed = await source.line(60)
    finally:
        await restorer.close()
        await source.close()
    assert answers[-1].get("error") in ("RuntimeFailure", "DeadlineExceeded"), answers
    assert failed.get("error") == "RuntimeFailure", failed
    assert await lxc_state(ckp, "n2", name) != "RUNNING"
    assert await lxc_state(ckp, "n1", name) == "RUNNING"
    _, now = read_counter(ckp, "n1", name)
    await wait_counter(ckp, "n1", name, above=now + 2)  # thawed, the source counts on
    return answers, failed, src, dst


async def test_post_copy_source_refuses_a_destination_without_tls(ckp):
    """The page server speaks only TLS: a destination that does not cannot take the pages.
    What is left is what the caller must know: the destination's restored container (it ran
    without its memory) is killed; the source stays frozen, its network locked, until the
    caller resumes it (LazyDump.resume_source)."""
    name = "ck-notls"
    await counter_container(ckp, name)
    try:
        await wait_counter(ckp, "n1", name, above=3)
        ip = (await on_host(ckp, "n1", "lxc-info", "-P", str(ckp.host("n1").lxc_path), "-n", name, "-i", "-H")).strip()
        answers, failed, src, dst = await _refused_lazy_transfer(ckp, name, _tls(ckp, "n1"), None)
        assert "TLS handshake failed" in (src / "dump.log").read_text()
        assert "page-xfer" in (dst / "lazy-pages.log").read_text()
        # ...and its network lock is gone: it answers at its address again.
        ping = await on_host(ckp, "n1", "busybox", "ping", "-c", "2", "-W", "2", ip, check=False)
        assert " 0% packet loss" in ping, ping
        TIMINGS["post-copy-without-tls"] = {"destination": answers[-1]["message"][:300],
                                            "source": failed["message"][:300]}  # fmt: skip
    finally:
        await destroy(ckp, name, copies_on=("n2",))


def _one_time_tls(directory: Path, server_address: str) -> tuple[dict, dict]:
    """(server files, client files) of a one-time TLS for a page server at `server_address`."""
    import datetime

    from agent.postcopy import write_tls_files
    from corral import pki

    t = pki.one_time_tls(server_address, datetime.timedelta(hours=1), "test")
    server = write_tls_files(directory / "server", t.ca_pem, t.server_cert_pem, t.server_key_pem)
    client = write_tls_files(directory / "client", t.ca_pem, t.client_cert_pem, t.client_key_pem)
    as_dict = lambda f: {"cacert": str(f.cacert), "cert": str(f.cert), "key": str(f.key)}  # noqa: E731
    return as_dict(server), as_dict(client)


async def test_post_copy_pages_go_only_to_the_transfers_own_client(ckp, tmp_path):
    """A page server with a one-time CA (what the agent gives it) refuses a destination holding
    a valid fleet certificate: being in the fleet is not being this transfer's destination
    (any agent's or user's certificate would otherwise read the container's memory)."""
    name = "ck-onetime"
    await counter_container(ckp, name)
    try:
        await wait_counter(ckp, "n1", name, above=3)
        server_tls, _ = _one_time_tls(tmp_path, ckp.host("n1").address)
        _, _, src, _ = await _refused_lazy_transfer(ckp, name, server_tls, _tls(ckp, "n2"))  # a fleet cert
        dump_log = (src / "dump.log").read_text()
        assert "TLS handshake failed" in dump_log or "certificate" in dump_log.lower(), dump_log[-2000:]
    finally:
        await destroy(ckp, name, copies_on=("n2",))


# -- the driver (runs on a lab host) -------------------------------------------------------------


def _plain(value):
    if is_dataclass(value):
        out = {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
        for prop in ("paused_ms",):
            if hasattr(value, prop):
                out[prop] = getattr(value, prop)
        if hasattr(value, "strategies"):
            out["strategies"] = value.strategies()
        return out
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _emit(value) -> None:
    print(json.dumps(_plain(value)), flush=True)


async def _driver(request: dict) -> None:
    from agent.runtime.checkpoint import Checkpointer, PageServer, TlsFiles
    from agent.runtime.criu_features import probe_live_support

    support = await probe_live_support()
    if request["action"] == "probe":
        # asdict() drops properties: add the ones the test reads.
        answer = _plain(support)
        _emit(answer)
        return
    lxc_path = Path(request["lxc_path"])
    checkpointer = Checkpointer(lxc_path, network_lock=support.network_lock)
    name = request.get("name", "")

    def page_server() -> PageServer:
        s = request["server"]
        t = s.get("tls")
        tls = TlsFiles(Path(t["cacert"]), Path(t["cert"]), Path(t["key"])) if t else None
        return PageServer(s["address"], int(s["port"]), tls)

    async def wait_for_go() -> None:
        if request.get("wait"):
            _emit({"waiting": True})
            line = await asyncio.to_thread(sys.stdin.readline)
            assert line.strip() == "go", line

    action = request["action"]
    if action == "predump":
        _emit(await checkpointer.predump(name, Path(request["images"]), None))
    elif action == "dump":
        _emit(await checkpointer.dump(name, Path(request["images"]), stop=True))
    elif action == "trial":
        _emit(await checkpointer.trial_dump(name, Path(request["scratch"])))
    elif action == "restore":
        await wait_for_go()
        _emit(await checkpointer.restore(name, Path(request["images"])))
    elif action == "lazy-dump":
        lazy = await checkpointer.start_lazy_dump(name, Path(request["images"]), page_server(),
                                                  timeout=request.get("timeout", 120))  # fmt: skip
        _emit(await lazy.images_ready())
        try:
            _emit(await lazy.finished())
        except BaseException:
            if request.get("resume_on_failure"):
                await lazy.resume_source()
            raise
    elif action == "lazy-restore":
        await wait_for_go()
        lazy = await checkpointer.start_lazy_restore(name, Path(request["images"]), page_server(),
                                                     timeout=request.get("timeout", 120))  # fmt: skip
        _emit(await lazy.running())
        _emit({"pages_done_at": await lazy.finished()})
    else:
        raise ValueError(f"unknown action {action}")


def _main() -> int:
    import logging

    import structlog

    from corral.errors import CorralError

    # The driver's stdout carries its answers: logs go to stderr, warnings only (nobody reads
    # that pipe until the driver ends).
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
                        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))  # fmt: skip
    request = json.loads(sys.argv[1])
    try:
        asyncio.run(_driver(request))
    except CorralError as e:
        _emit({"error": type(e).__name__, "message": e.message})
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())


def test_leftover_cgroups_are_found_by_name_and_only_empty_ones_removed(tmp_path):
    """LXC's cgroups of a container: found by name in every hierarchy (with LXC's -N suffix),
    and of those only the empty ones go (a cgroup with a process in it refuses rmdir: here a
    file in the directory plays the process), children first."""
    from agent.runtime.cgroups import cgroup_dirs_of, container_cgroup_dirs, remove_empty

    memory, unified = tmp_path / "memory", tmp_path / "unified"
    for d in (memory / "lxc.payload.web" / "init.scope", memory / "lxc.monitor.web", memory / "lxc.payload.web-3",
              memory / "lxc.payload.webx", memory / "lxc.payload.other", unified / "lxc.payload.web-1"):  # fmt: skip
        d.mkdir(parents=True)
    (unified / "lxc.payload.web-1" / "cgroup.procs").write_text("42\n")  # busy
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        f"30 25 0:26 / {memory} rw,nosuid - cgroup cgroup rw,memory\n"
        f"31 25 0:27 / {unified} rw,nosuid - cgroup2 cgroup2 rw\n"
        f"32 25 0:28 / {tmp_path} rw - ext4 /dev/vda rw\n"
    )
    found = container_cgroup_dirs("web", mountinfo)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in found) == [
        "memory/lxc.monitor.web", "memory/lxc.payload.web", "memory/lxc.payload.web-3", "unified/lxc.payload.web-1",
    ]  # fmt: skip
    removed = remove_empty(found)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in removed) == [
        "memory/lxc.monitor.web", "memory/lxc.payload.web", "memory/lxc.payload.web-3",
        "memory/lxc.payload.web/init.scope",
    ]  # fmt: skip
    assert (memory / "lxc.payload.webx").is_dir() and (memory / "lxc.payload.other").is_dir()
    assert (unified / "lxc.payload.web-1").is_dir()
    # A process's own cgroups, per hierarchy, from /proc/PID/cgroup (this test's process).
    assert cgroup_dirs_of(0) == [] and all(d.is_dir() for d in cgroup_dirs_of(os.getpid()))
