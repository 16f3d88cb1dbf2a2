"""`corral ct exec` streams: output arrives as the command writes it, any amount, with the
agent's memory bounded; the exit status comes last; a timeout (or the caller going away)
kills the command inside the container; bad input is refused before anything runs."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from controller.agents import AgentClient
from corral.config import TlsFiles
from corral.errors import InvalidArgument
from corral.proc import Exited, Output

NAME = "stream1"
BIG = 400_000_000  # bytes of output: far beyond what one gRPC message may carry (64 MiB)


@pytest.fixture(scope="module")
async def container(lab, corral):
    await corral("ct", "destroy", "--force", NAME, check=False)
    await corral("ct", "create", NAME, "--template", "busybox", "--node", lab.hosts[0].node, "--start")
    yield NAME
    await corral("ct", "destroy", "--force", NAME, check=False)


@pytest.fixture
def helper_env(lab, tmp_path):
    """The environment of a `corral` that runs its commands in a warm helper of this test's own
    (stopped afterwards, by its pid)."""
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env.update(CORRAL_RUNTIME_DIR=str(runtime), CORRAL_CONFIG=str(lab.cli_config), CORRAL_HELPER_IDLE="60")
    yield env
    for lock in runtime.glob("helper-*.lock"):
        text = lock.read_text().strip()
        if text.isdigit():
            try:
                os.kill(int(text), signal.SIGTERM)
            except ProcessLookupError:
                pass


def cli_argv(lab, helped: bool, *args: str) -> list[str]:
    if helped:  # the launcher hands the command to the warm helper
        return [sys.executable, "-m", "controller.cli.launcher", *args]
    return [sys.executable, "-m", "controller.cli.main", "--config", str(lab.cli_config), *args]


async def start_cli(argv: list[str], env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )


async def warm_up(lab, env) -> None:
    """The first invocation starts the helper (and runs in-process); wait until it serves."""
    proc = await start_cli(cli_argv(lab, True, "--help"), env)
    await proc.communicate()
    runtime = Path(env["CORRAL_RUNTIME_DIR"])
    for _ in range(200):
        if list(runtime.glob("helper-*.sock")):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("no warm helper came up")


def memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def host_processes(marker: str) -> list[str]:
    """Command lines of the host's processes (those in containers too) that contain `marker`."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                cmdline = Path(f"/proc/{entry.name}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in cmdline:
                found.append(f"{entry.name}: {cmdline}")
    return found


async def test_400_mb_of_output_arrives_complete_with_the_agent_bounded(lab, container):
    agent = lab.hosts[0].agent_pid
    Path(f"/proc/{agent}/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak of this exec only
    before = memory_kib(agent)["VmRSS"]
    peak_rss = before

    async def sample() -> None:
        nonlocal peak_rss
        while True:
            peak_rss = max(peak_rss, memory_kib(agent)["VmRSS"])
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample())
    started = time.monotonic()
    proc = await start_cli(cli_argv(lab, False, "ct", "exec", container, "--", "head", "-c", str(BIG), "/dev/zero"))
    received, first_at = 0, None
    async with asyncio.timeout(240):
        while chunk := await proc.stdout.read(1 << 20):
            first_at = first_at or time.monotonic() - started
            assert chunk.count(0) == len(chunk)
            received += len(chunk)
        stderr = await proc.stderr.read()
        await proc.wait()
    sampler.cancel()
    elapsed = time.monotonic() - started
    growth_mib = (max(memory_kib(agent)["VmHWM"], peak_rss) - before) / 1024
    print(f"\n400 MB exec: {received} bytes in {elapsed:.1f} s, first after {first_at or elapsed:.2f} s, "
          f"agent VmRSS {before / 1024:.0f} MiB before, peak +{growth_mib:.1f} MiB")  # fmt: skip
    assert (proc.returncode, stderr) == (0, b"")
    assert received == BIG
    assert growth_mib < 64, f"the agent grew by {growth_mib:.0f} MiB"
    assert first_at < elapsed / 2, "the output arrived only at the end"


@pytest.mark.parametrize("helped", [False, True], ids=["in-process", "warm-helper"])
async def test_stdout_and_stderr_arrive_apart_as_they_come(lab, container, helped, helper_env):
    env = helper_env if helped else None
    if helped:
        await warm_up(lab, env)
    script = "i=0; while [ $i -lt 300 ]; do echo out$i; echo err$i >&2; i=$((i+1)); done; sleep 3; echo last; exit 42"
    started = time.monotonic()
    proc = await start_cli(cli_argv(lab, helped, "ct", "exec", container, "--", "sh", "-c", script), env)
    async with asyncio.timeout(60):
        first = await proc.stdout.readline()
        first_at = time.monotonic() - started
        rest, stderr = await asyncio.gather(proc.stdout.read(), proc.stderr.read())
        await proc.wait()
    elapsed = time.monotonic() - started
    assert first == b"out0\n"
    assert first_at < elapsed - 2, f"the first line came {first_at:.1f} s in, the command ended at {elapsed:.1f} s"
    assert (first + rest).decode() == "".join(f"out{i}\n" for i in range(300)) + "last\n"
    assert stderr.decode() == "".join(f"err{i}\n" for i in range(300))
    assert proc.returncode == 42


async def test_exit_codes_propagate(corral, container):
    for script, code in (("true", 0), ("exit 3", 3), ("exit 255", 255), ("kill -9 $$", 137)):
        done = await corral("ct", "exec", container, "--", "sh", "-c", script, check=False)
        assert done.returncode == code, (script, done.stderr)
    machine = await corral("-o", "json", "ct", "exec", container, "--", "sh", "-c", "echo hi; echo no >&2; exit 5",
                           check=False)  # fmt: skip
    assert machine.returncode == 5
    assert machine.json() == {"name": container, "exit_code": 5, "timed_out": False, "stdout": "hi\n", "stderr": "no\n"}


async def test_a_timeout_kills_the_command_inside_the_container(lab, corral, container):
    # One child stays in lxc-attach's process group, one leaves it (setsid): both must go.
    script = "sleep 7341 & setsid sleep 7342; echo not reached"
    started = time.monotonic()
    done = await corral("ct", "exec", container, "--timeout", "2", "--", "sh", "-c", script, check=False)
    assert time.monotonic() - started < 20
    assert done.returncode == 7 and "did not finish within 2 s" in done.stderr, done
    assert "not reached" not in done.stdout
    await asyncio.sleep(0.5)
    inside = await corral("ct", "exec", container, "--", "ps", "-o", "pid,args")
    assert "sleep 734" not in inside.stdout, inside.stdout
    assert host_processes("sleep 734") == []


async def test_a_caller_that_goes_away_kills_the_command(lab, container):
    proc = await start_cli(cli_argv(lab, False, "ct", "exec", container, "--", "sh", "-c", "echo up; sleep 7343"))
    async with asyncio.timeout(30):
        assert await proc.stdout.readline() == b"up\n"
    assert host_processes("sleep 7343")
    proc.kill()  # no goodbye: the connection drops, the controller and the agent cancel
    await proc.wait()
    for _ in range(100):
        if not host_processes("sleep 7343"):
            break
        await asyncio.sleep(0.1)
    assert host_processes("sleep 7343") == []


async def test_exec_timeout_is_not_capped_by_the_client_deadline(lab, tmp_path, container):
    """The CLI's own deadline (here 2 s) bounds ordinary calls, not an exec that asked for more."""
    config = tmp_path / "cli.yaml"
    config.write_text(lab.cli_config.read_text().rstrip("\n") + "\ntimeout: 2\n")
    argv = [sys.executable, "-m", "controller.cli.main", "--config", str(config),
            "ct", "exec", container, "--timeout", "10", "--", "sh", "-c", "sleep 4; echo slept"]  # fmt: skip
    proc = await start_cli(argv)
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert (proc.returncode, out) == (0, b"slept\n"), err


async def test_nul_bytes_and_bad_env_names_are_refused(lab, fleet, container):
    bad = [(["echo", "a\0b"], {}), (["echo"], {"A": "x\0y"}), (["echo"], {"A=B": "x"}), (["echo"], {"": "x"})]
    for argv, env in bad:
        with pytest.raises(InvalidArgument) as refused:
            async for _ in fleet.exec_stream(container, argv, env=env):
                pass
        assert refused.value.exit_code == 2
    with pytest.raises(InvalidArgument, match="NUL"):
        async for _ in fleet.exec_stream(container, ["echo", "a\0b"]):
            pass
    # The agent refuses them too (not gRPC UNKNOWN), should a caller other than the controller try.
    pki = lab.pki_dir
    tls = TlsFiles(pki / "ca.crt", pki / "controller-controller.crt", pki / "controller-controller.key")
    agent = AgentClient(lab.hosts[0].node, lab.hosts[0].agent_address, tls)
    try:
        for argv, env in bad:
            with pytest.raises(InvalidArgument):
                async for _ in agent.exec(container, argv, env, b"", 0):
                    pass
        events = [e async for e in agent.exec(container, ["echo", "fine"], {}, b"", 0)]
        assert events == [Output(1, b"fine\n"), Exited(0)]
    finally:
        await agent.channel.close()


async def test_stdin_streams_any_amount(corral, container):
    """`-i` streams standard input as it is read: more than one gRPC message may carry (64 MiB)."""
    data = os.urandom(5 << 20)
    counted = await corral("ct", "exec", "-i", container, "--", "wc", "-c", stdin=data)
    assert counted.stdout.split() == [str(len(data))]
    big = await corral("ct", "exec", "-i", container, "--", "wc", "-c", stdin=b"\0" * (80 << 20))
    assert big.stdout.split() == [str(80 << 20)]


async def test_a_stalled_reader_holds_the_command_up_not_the_helpers_memory(lab, container, helper_env):
    """Through the warm helper, output is written from a thread of the command's own, one piece
    at a time: a reader that stops reading for a while costs the helper no memory."""
    await warm_up(lab, helper_env)
    lock = next(Path(helper_env["CORRAL_RUNTIME_DIR"]).glob("helper-*.lock"))
    helper = int(lock.read_text().strip())
    Path(f"/proc/{helper}/clear_refs").write_text("5")
    before = memory_kib(helper)["VmRSS"]
    size = 200_000_000
    proc = await start_cli(cli_argv(lab, True, "ct", "exec", container, "--", "head", "-c", str(size), "/dev/zero"),
                           helper_env)  # fmt: skip
    await asyncio.sleep(3)  # not reading: the pipe to us fills, then everything behind it waits
    received = 0
    async with asyncio.timeout(120):
        while chunk := await proc.stdout.read(1 << 20):
            received += len(chunk)
        await proc.wait()
    growth_mib = (memory_kib(helper)["VmHWM"] - before) / 1024
    assert (proc.returncode, received) == (0, size)
    assert growth_mib < 64, f"the helper grew by {growth_mib:.0f} MiB"
