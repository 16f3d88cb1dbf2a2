"""An operator live-migrates a container CRIU cannot dump: the pre-flight refuses it before
anything stops or moves, says why, and never pauses it. Each case the pre-flight claims
to catch is made for real in a lab container, and CRIU itself is asked to agree."""

import asyncio
import contextlib
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

import lab as corral_lab
from conftest import running_copies
from corral.proc import descendants
from test_migration import read_int, start_counter

NAME = "pfl"
# Started inside the container by lxc-attach; `setsid` makes each its own session leader
# there, so that only the case itself is wrong with it (no session led from outside).
QUIET = "</dev/null >/dev/null 2>&1"
CASES = {
    "session led from outside": (f"sleep 1000 {QUIET} &", "session is led from outside the container"),
    "nested namespace": (f"setsid unshare -u sleep 1000 {QUIET} &", "own uts namespace"),
    "deleted file over the ghost limit": (
        "setsid sh -c 'dd if=/dev/urandom of=/tmp/ghost bs=1M count=2 2>/dev/null; exec 3</tmp/ghost; "
        f"rm /tmp/ghost; exec sleep 1000' {QUIET} &",
        "over CRIU's ghost limit",
    ),
    "character device": (
        f"mknod /tmp/fuse c 10 229; setsid sh -c 'exec 4<>/tmp/fuse; exec sleep 1000' {QUIET} &",
        "character device 10:229",
    ),
    # fd 5 is a host file lxc-attach passes on (see host_file below).
    "file from outside": (f"setsid sleep 1000 {QUIET} &", "on a mount the container does not have"),
}

# Made from the host: a tracer, and a process given a userfaultfd and put into the container.
TRACER = """
import ctypes, sys, time
libc = ctypes.CDLL(None, use_errno=True)
if libc.ptrace(0x4206, int(sys.argv[1]), 0, 0) != 0:  # PTRACE_SEIZE
    sys.exit(f"ptrace: errno {ctypes.get_errno()}")
print("tracing", flush=True)
time.sleep(1000)
"""
USERFAULTFD = """
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
if os.fork():
    os._exit(0)  # the child is orphaned: the container's init adopts it, CRIU's tree has it
os.setsid()
fd = libc.syscall(323, os.O_CLOEXEC)  # userfaultfd(2), x86_64
assert fd >= 0, ctypes.get_errno()
os.closerange(0, fd)  # nothing of the host's left open but the case itself
time.sleep(1000)
"""


async def on_host(lab, node: str, *argv: str, stdin=None, check: bool = True) -> str:
    proc = await asyncio.create_subprocess_exec(
        *corral_lab.host_command(lab.name, node, list(argv)), stdin=stdin or asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}: {err.decode()}")
    return out.decode()


async def attach(lab, script: str, host_file: bool = False) -> None:
    lxc = str(lab.host("n1").lxc_path)
    argv = ["lxc-attach", "-P", lxc, "-n", NAME, "--", "sh", "-c", script]
    if host_file:  # lxc-attach hands its open descriptors on: fd 5, a host file, stays open in the sleep
        argv = ["sh", "-c", 'exec 5</etc/hostname; exec "$@"', "sh", *argv]
    await on_host(lab, "n1", *argv)


async def container_init(lab) -> int:
    out = await on_host(lab, "n1", "lxc-info", "-P", str(lab.host("n1").lxc_path), "-n", NAME, "-p", "-H")
    return int(out.strip())


async def cases_running(lab) -> set[int]:
    """The container's processes a case made: each sleeps 1000 s (the workload's own come and go)."""
    found = set()
    for pid in descendants(await container_init(lab)):
        try:
            if b"1000" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.add(pid)
        except OSError:
            continue
    return found


async def criu_refuses(lab) -> str:
    """CRIU's own verdict: a trial dump with the raw tool (the container keeps running)."""
    images = lab.host("n1").state_dir / "preflight-trial"
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir(parents=True)
    try:
        out = await on_host(lab, "n1", "sh", "-c", f'lxc-checkpoint -P "$2" -n {NAME} -D "$1" >/dev/null 2>&1; '
                            'echo "exit $?"; grep "^Error" "$1/dump.log" | tail -3',
                            "sh", str(images), str(lab.host("n1").lxc_path))  # fmt: skip
    finally:
        shutil.rmtree(images, ignore_errors=True)
    assert not out.startswith("exit 0"), f"CRIU dumped it: the pre-flight refused what CRIU can do ({out})"
    return out


@pytest.fixture(scope="module")
async def workload(corral, lab):
    await corral("ct", "destroy", "--force", NAME, check=False)
    await corral("ct", "create", NAME, "-t", "busybox", "--node", "n1", "--start")
    await start_counter(corral, NAME)
    yield await read_int(corral, NAME, "/tmp/workload.pid")
    await corral("ct", "destroy", "--force", NAME, check=False)


async def refused_before_anything_moves(corral, lab, workload_pid: int, expected: str) -> None:
    before = await read_int(corral, NAME, "/tmp/counter")
    r = await corral("ct", "migrate", NAME, "--to", "n2", "--live", check=False)
    said = r.stdout + r.stderr
    assert r.returncode != 0 and "CRIU would refuse to dump" in said and expected in said, said
    op = (await corral.json("ops", "ls", "--container", NAME))[-1]
    assert op["state"] == "failed" and not op["timings_ms"].get("preflight_pause")
    # Nothing stopped, nothing moved: the same workload counts on n1 only.
    assert await read_int(corral, NAME, "/tmp/workload.pid") == workload_pid
    assert await read_int(corral, NAME, "/tmp/counter") > before
    assert await running_copies(lab, NAME) == ["n1"]
    assert not (lab.host("n2").lxc_path / NAME).exists()


async def end(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    await asyncio.sleep(0.3)


@pytest.mark.parametrize("case", list(CASES))
async def test_preflight_refuses_what_criu_cannot_dump(corral, lab, workload, case):
    script, expected = CASES[case]
    before = await cases_running(lab)
    await attach(lab, script, host_file=case == "file from outside")
    made = await until_new(lab, before)
    try:
        await refused_before_anything_moves(corral, lab, workload, expected)
        await criu_refuses(lab)
    finally:
        await end(made)


async def test_preflight_refuses_a_traced_task(corral, lab, workload):
    before = await cases_running(lab)
    await attach(lab, f"setsid sleep 1000 {QUIET} &")
    (target,) = await until_new(lab, before)
    tracer = await asyncio.create_subprocess_exec(sys.executable, "-c", TRACER, str(target),
                                                  stdout=asyncio.subprocess.PIPE)  # fmt: skip
    try:
        assert (await tracer.stdout.readline()).strip() == b"tracing"
        await refused_before_anything_moves(corral, lab, workload, f"traced by pid {tracer.pid}")
        await criu_refuses(lab)
    finally:
        tracer.kill()
        await tracer.wait()
        await end({target})


async def test_preflight_refuses_an_anon_inode_criu_has_no_driver_for(corral, lab, workload):
    before = await cases_running(lab)
    init = await container_init(lab)
    # The host's python, in the container's PID, UTS, IPC, cgroup and network namespaces.
    await on_host(lab, "n1", "nsenter", "-t", str(init), "-p", "-u", "-i", "-C", "-n", "--",
                  sys.executable, "-c", USERFAULTFD)  # fmt: skip
    made = await until_new(lab, before)
    try:
        await refused_before_anything_moves(corral, lab, workload, "[userfaultfd] descriptor")
        await criu_refuses(lab)
    finally:
        await end(made)


async def test_after_the_refusals_the_same_container_moves_live(corral, lab, workload):
    """Nothing the refused attempts left behind stands in the way; the pre-flight passes."""
    op = await corral.json("ct", "migrate", NAME, "--to", "n2", "--live")
    assert op["state"] == "succeeded", op["error"]
    assert "preflight" in op["timings_ms"]
    assert await read_int(corral, NAME, "/tmp/workload.pid") == workload
    assert await running_copies(lab, NAME) == ["n2"]


async def until_new(lab, before: set[int]) -> set[int]:
    async with asyncio.timeout(10):
        while True:
            if await cases_running(lab) - before:
                await asyncio.sleep(0.3)  # let it reach its last exec
                return await cases_running(lab) - before
            await asyncio.sleep(0.1)


def _agent_config(tmp_path, extra: str):
    """An agent config with `extra` from line 5 on."""
    from agent.config import AgentConfig

    for name in ("ca.crt", "c.crt", "c.key"):
        (tmp_path / name).write_text("x")
    path = tmp_path / "agent.yaml"
    path.write_text("node: n1\nlisten: 127.0.0.1:7701\ncontroller: 127.0.0.1:7700\n"
                    "tls: {ca: ca.crt, cert: c.crt, key: c.key}\n" + extra)  # fmt: skip
    return AgentConfig.load(path)


def test_the_trial_dump_is_off_unless_the_host_asks_for_it(tmp_path):
    """`preflight_trial_max_bytes`: 0 (never) by default; a size; a bad value stops the agent's
    start with FILE:LINE (and `--check-config` with exit 78)."""
    from corral.config import ConfigError

    def load(extra: str):
        return _agent_config(tmp_path, extra)

    assert load("").preflight_trial_max_bytes == 0
    assert load("preflight_trial_max_bytes: 32M\n").preflight_trial_max_bytes == 32 << 20
    assert load("preflight_trial_max_bytes: 0\n").preflight_trial_max_bytes == 0
    for bad in ("-1", "lots", "true"):
        with pytest.raises(ConfigError, match=r"agent.yaml:5: preflight_trial_max_bytes"):
            load(f"preflight_trial_max_bytes: {bad}\n")


def test_the_images_endpoint_is_on_unless_the_host_turns_it_off(tmp_path):
    """`images_endpoint`: true by default (a live migration's memory images come over TLS,
    agent/transfer/tls_stream.py); false sends them over the SSH port (a firewall that allows
    only it); anything else stops the agent's start with FILE:LINE."""
    from corral.config import ConfigError

    assert _agent_config(tmp_path, "").images_endpoint is True
    assert _agent_config(tmp_path, "images_endpoint: false\n").images_endpoint is False
    for bad in ("maybe", "1", "[]"):
        with pytest.raises(ConfigError, match=r"agent.yaml:5: images_endpoint"):
            _agent_config(tmp_path, f"images_endpoint: {bad}\n")


def test_the_images_landing_is_on_unless_the_host_turns_it_off(tmp_path):
    """`images_landing`: true by default (an incoming live migration's memory images land on
    page cache written before the freeze, agent/transfer/landing.py); false writes them to new
    files; anything else stops the agent's start with FILE:LINE."""
    from corral.config import ConfigError

    assert _agent_config(tmp_path, "").images_landing is True
    assert _agent_config(tmp_path, "images_landing: false\n").images_landing is False
    for bad in ("maybe", "1", "[]"):
        with pytest.raises(ConfigError, match=r"agent.yaml:5: images_landing"):
            _agent_config(tmp_path, f"images_landing: {bad}\n")
