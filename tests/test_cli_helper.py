"""The `corral` launcher and its warm helper (controller/cli/launcher.py, warm.py).

Most tests need no lab: they run the launcher against a fake controller (a real
mTLS gRPC server in this process) with a runtime directory of their own, and
stop the helpers they started. The last one runs `ct exec` in the lab.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from corral import pki
from corral.api.convert import container_to_pb
from corral.api.tls import SERVER_OPTIONS, server_credentials
from corral.config import TlsFiles
from corral.model import Container, ContainerState
from corral.v1 import controller_pb2_grpc

LAUNCHER = [sys.executable, "-m", "controller.cli.launcher"]


class FakeController(controller_pb2_grpc.ControllerServiceServicer):
    """GetContainer answers with the name asked for; names starting with `slow` take 0.6 s,
    `hang` ten seconds (to be interrupted), `big` come with a 300 kB note."""

    def __init__(self) -> None:
        self.calls = 0
        self.cancelled = 0

    async def GetContainer(self, request, context):
        self.calls += 1
        try:
            if request.name.startswith("slow"):
                await asyncio.sleep(0.6)
            elif request.name.startswith("hang"):
                await asyncio.sleep(10)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        message = "x" * 300_000 if request.name.startswith("big") else ""
        return container_to_pb(Container(name=request.name, node="n1", template="busybox", state=ContainerState.STOPPED,
                                         message=message))  # fmt: skip


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    pki.init_ca(d, common_name="helper test CA")
    pki.issue(d, "controller", "controller", hosts=["127.0.0.1"])
    pki.issue(d, "user", "admin")
    return d


@pytest.fixture
async def controller(tls_dir, tmp_path):
    servicer = FakeController()
    server = grpc.aio.server(options=SERVER_OPTIONS)
    controller_pb2_grpc.add_ControllerServiceServicer_to_server(servicer, server)
    tls = TlsFiles(tls_dir / "ca.crt", tls_dir / "controller-controller.crt", tls_dir / "controller-controller.key")
    port = server.add_secure_port("127.0.0.1:0", server_credentials(tls))
    await server.start()
    config = tmp_path / "cli.yaml"
    config.write_text(
        f"controller: 127.0.0.1:{port}\n"
        f"tls: {{ca: {tls_dir / 'ca.crt'}, cert: {tls_dir / 'user-admin.crt'}, key: {tls_dir / 'user-admin.key'}}}\n"
    )
    servicer.config = config
    yield servicer
    await server.stop(0)


@pytest.fixture
def runtime(tmp_path):
    """A runtime directory of this test's own; every helper started in it is stopped after."""
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    yield d
    for pid in helper_pids(d):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        for _ in range(100):
            if not _alive(pid):
                break
            time.sleep(0.02)


def helper_pids(runtime: Path) -> list[int]:
    pids = []
    for lock in runtime.glob("helper-*.lock"):
        text = lock.read_text().strip()
        if text.isdigit() and _alive(int(text)):
            pids.append(int(text))
    return pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def env_for(runtime: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env.update(CORRAL_RUNTIME_DIR=str(runtime), CORRAL_HELPER_VERBOSE="1", CORRAL_HELPER_IDLE="60", **extra)
    return env


def launch(runtime: Path, *args: str, env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*LAUNCHER, *args], env=env or env_for(runtime), capture_output=True, text=True,
                          timeout=60, cwd=kw.pop("cwd", None), **kw)  # fmt: skip


def wait_for_helper(runtime: Path, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = helper_pids(runtime)
        if pids and list(runtime.glob("helper-*.sock")):
            return pids[0]
        time.sleep(0.05)
    logs = "\n".join(p.read_text() for p in runtime.glob("helper-*.log"))
    raise AssertionError(f"no helper came up in {runtime}; its log:\n{logs}")


def served(runtime: Path) -> list[str]:
    """The invocations the helper ran (its verbose log)."""
    return [line for p in runtime.glob("helper-*.log") for line in p.read_text().splitlines() if " ran for pid " in line]


def warm(runtime: Path, env=None) -> int:
    launch(runtime, "--help", env=env)
    return wait_for_helper(runtime)


# --- quick tests (no lab) -------------------------------------------------------------


def test_launcher_imports_only_the_standard_library():
    code = "import sys, controller.cli.launcher; print(' '.join(sorted(sys.modules)))"
    modules = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    heavy = {"grpc", "click", "asyncio", "yaml", "rich", "corral", "structlog", "google.protobuf"}
    assert not heavy & set(modules), heavy & set(modules)


@pytest.mark.parametrize("args,local", [
    (["ct", "exec", "-i", "web1", "--", "cat"], True),
    (["--config", "c.yaml", "ct", "exec", "--interactive", "web1", "cat"], True),
    (["ct", "exec", "web1", "--", "cat", "-i"], False),  # the command's own -i
    (["lab", "up"], True),
    (["-o", "json", "pki", "init", "--dir", "d"], True),
    (["--context", "lab", "ct", "ls"], False),
    (["ct", "ls"], False),
])  # fmt: skip
def test_which_commands_the_launcher_runs_itself(args, local):
    from controller.cli import warm

    assert warm._runs_locally(args) is local


async def test_the_borrowed_client_has_what_a_client_has(tls_dir):
    """The helper's client on a shared channel sets the attributes ControllerClient.__init__ sets
    (a new one there must be given here too)."""
    from controller.cli import warm
    from controller.client import ControllerClient

    tls = TlsFiles(tls_dir / "ca.crt", tls_dir / "user-admin.crt", tls_dir / "user-admin.key")
    async with ControllerClient("127.0.0.1:1", tls, 5.0) as normal:
        borrowed = warm._borrowed_client_class()("127.0.0.1:1", 5.0, normal.channel, normal.stub)
        assert set(vars(borrowed)) == set(vars(normal))
        await borrowed.__aexit__(None, None, None)
        assert normal.channel.get_state() is not grpc.ChannelConnectivity.SHUTDOWN  # left open


def test_threads_a_command_starts_write_to_its_streams():
    import threading

    from controller.cli import invocation

    invocation.inherit_invocation_in_threads()
    seen = []
    token = invocation._current.set("an invocation")
    try:
        thread = threading.Thread(target=lambda: seen.append(invocation._current.get()))
        thread.start()
        thread.join()
    finally:
        invocation._current.reset(token)
    outside = threading.Thread(target=lambda: seen.append(invocation._current.get()))
    outside.start()
    outside.join()
    assert seen == ["an invocation", None]


def test_first_call_starts_a_helper_and_the_second_uses_it(runtime):
    first = launch(runtime, "--help")
    assert first.returncode == 0 and "Usage: corral" in first.stdout
    pid = wait_for_helper(runtime)
    assert served(runtime) == []  # the first ran in-process
    second = launch(runtime, "--help")
    assert second.returncode == 0 and second.stdout == first.stdout
    assert len(served(runtime)) == 1 and helper_pids(runtime) == [pid]
    sock = next(runtime.glob("helper-*.sock"))
    assert sock.stat().st_mode & 0o777 == 0o600


def test_same_output_and_exit_codes_as_in_process(runtime, tmp_path, tls_dir):
    warm(runtime)
    unreachable = tmp_path / "unreachable.yaml"
    unreachable.write_text(
        "controller: 127.0.0.1:1\n"
        f"tls: {{ca: {tls_dir / 'ca.crt'}, cert: {tls_dir / 'user-admin.crt'}, key: {tls_dir / 'user-admin.key'}}}\n"
    )
    cases = [
        (["--help"], 0),
        (["ct", "--help"], 0),
        (["ct", "frobnicate"], 2),
        (["--config", str(tmp_path / "missing.yaml"), "ct", "ls"], 78),
        (["--config", str(unreachable), "ct", "show", "x"], 7),
    ]
    before = len(served(runtime))
    for args, expected in cases:
        helped = launch(runtime, *args)
        alone = launch(runtime, *args, env=env_for(runtime, CORRAL_NO_HELPER="1"))
        assert (helped.returncode, helped.stdout, helped.stderr) == (alone.returncode, alone.stdout, alone.stderr), args
        assert helped.returncode == expected, (args, helped.stderr)
    assert len(served(runtime)) == before + len(cases)  # every helped one ran in the helper


async def test_commands_talk_to_the_controller_through_the_warm_channel(runtime, controller, tmp_path):
    await asyncio.to_thread(warm, runtime)
    # A relative --config, from another working directory: read as the process would.
    rel = os.path.relpath(controller.config, tmp_path)
    for _ in range(2):
        done = await asyncio.to_thread(launch, runtime, "--config", rel, "ct", "show", "web1", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert "web1" in done.stdout
    alone = await asyncio.to_thread(launch, runtime, "--config", rel, "ct", "show", "web1", cwd=tmp_path,
                                    env=env_for(runtime, CORRAL_NO_HELPER="1"))  # fmt: skip
    assert alone.stdout == done.stdout and alone.stderr == done.stderr
    assert len(served(runtime)) == 2


async def test_concurrent_invocations_each_get_their_own_output(runtime, controller):
    await asyncio.to_thread(warm, runtime)
    names = [f"slow{i}" for i in range(4)]
    began = time.monotonic()
    results = await asyncio.gather(*(
        asyncio.to_thread(launch, runtime, "--config", str(controller.config), "ct", "show", name) for name in names
    ))  # fmt: skip
    took = time.monotonic() - began
    for name, done in zip(names, results):
        assert done.returncode == 0, done.stderr
        shown = [line.split()[-1] for line in done.stdout.splitlines() if line.startswith("name")]
        assert shown == [name], done.stdout
    assert took < 0.6 * len(names), f"not concurrent: {took:.2f} s"
    assert len(served(runtime)) == len(names)


async def test_a_client_that_does_not_read_holds_up_only_its_own_command(runtime, controller):
    """A pager that is not read from: the command's output waits, the others run."""
    await asyncio.to_thread(warm, runtime)
    stuck = await asyncio.create_subprocess_exec(
        *LAUNCHER, "--config", str(controller.config), "ct", "show", "big1", env=env_for(runtime),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while controller.calls == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)  # its output has filled the pipe by now
    other = await asyncio.wait_for(asyncio.to_thread(launch, runtime, "--config", str(controller.config), "ct", "show",
                                                     "web3"), 10)  # fmt: skip
    assert other.returncode == 0 and "web3" in other.stdout
    out, err = await asyncio.wait_for(stuck.communicate(), 10)
    assert stuck.returncode == 0, err
    assert out.decode().count("x") >= 300_000
    assert len(served(runtime)) == 2


def test_a_stale_helper_is_replaced(runtime):
    old = warm(runtime, env_for(runtime, CORRAL_BUILD_TAG="a"))
    assert launch(runtime, "--version", env=env_for(runtime, CORRAL_BUILD_TAG="a")).returncode == 0
    assert len(served(runtime)) == 1
    # Other code: the old helper makes way (exits once idle), a new one starts; this call runs in-process.
    changed = launch(runtime, "--version", env=env_for(runtime, CORRAL_BUILD_TAG="b"))
    assert changed.returncode == 0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (_alive(old) or not helper_pids(runtime)):
        time.sleep(0.05)
    assert not _alive(old)
    new = wait_for_helper(runtime)
    assert new != old
    assert launch(runtime, "--version", env=env_for(runtime, CORRAL_BUILD_TAG="b")).returncode == 0
    assert len(served(runtime)) == 2


def test_another_home_gets_a_helper_of_its_own(runtime, tmp_path):
    """HOME (like proxies and gRPC settings) is read once per process: a helper started from a
    shell with another HOME must not stand in the way of, nor serve, invocations with this one."""
    other = env_for(runtime, HOME=str(tmp_path))
    first = warm(runtime, other)
    assert launch(runtime, "--version", env=other).returncode == 0
    assert launch(runtime, "--version").returncode == 0  # starts its own helper, runs in-process
    deadline = time.monotonic() + 20
    while (len(helper_pids(runtime)) < 2 or len(list(runtime.glob("helper-*.sock"))) < 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first in helper_pids(runtime) and len(helper_pids(runtime)) == 2
    assert launch(runtime, "--version").returncode == 0
    assert len(served(runtime)) == 2  # one in each helper


@pytest.mark.parametrize("problem", ["mode", "owner", "symlink"])
def test_an_untrustworthy_runtime_dir_is_refused(tmp_path, problem):
    d = tmp_path / "run"
    if problem == "mode":
        d.mkdir(mode=0o700)
        d.chmod(0o755)
    elif problem == "owner":
        if os.getuid() != 0:
            pytest.skip("needs root to give the directory away")
        d.mkdir(mode=0o700)
        os.chown(d, 65534, 65534)
    else:
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        d.symlink_to(tmp_path / "elsewhere")
    done = launch(d, "--help")
    assert done.returncode == 0 and "Usage: corral" in done.stdout  # still runs, in-process
    assert "not using the helper" in done.stderr
    assert not list(d.glob("helper-*")) and not list((tmp_path / "elsewhere").glob("helper-*") if problem == "symlink" else [])


def test_no_helper_runs_in_process(runtime):
    env = env_for(runtime, CORRAL_NO_HELPER="1")
    for _ in range(2):
        assert launch(runtime, "--help", env=env).returncode == 0
    assert list(runtime.iterdir()) == []


async def test_ctrl_c_interrupts_the_command_and_the_helper_survives(runtime, controller):
    pid = await asyncio.to_thread(warm, runtime)
    proc = await asyncio.create_subprocess_exec(
        *LAUNCHER, "--config", str(controller.config), "ct", "show", "hang1", env=env_for(runtime),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while controller.calls == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert controller.calls == 1
    proc.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 130
    assert err.decode() == "corral: interrupted\n" and out == b""
    await asyncio.sleep(0.2)
    assert controller.cancelled == 1  # the call itself was cancelled, not left running
    assert helper_pids(runtime) == [pid]
    again = await asyncio.to_thread(launch, runtime, "--config", str(controller.config), "ct", "show", "web2")
    assert again.returncode == 0 and "web2" in again.stdout


async def test_a_killed_launcher_cancels_its_command(runtime, controller):
    pid = await asyncio.to_thread(warm, runtime)
    proc = await asyncio.create_subprocess_exec(
        *LAUNCHER, "--config", str(controller.config), "ct", "show", "hang2", env=env_for(runtime),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while controller.calls == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    proc.kill()
    await proc.wait()
    deadline = time.monotonic() + 5
    while controller.cancelled == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert controller.cancelled == 1
    assert helper_pids(runtime) == [pid]


# --- in the lab -------------------------------------------------------------------------


async def test_ct_exec_through_the_helper_passes_the_exit_code(lab, corral, cleanup, runtime):
    name = "helper-exec"
    cleanup.append(name)
    await corral("ct", "create", name, "--template", "busybox", "--node", lab.hosts[0].node)
    await corral("ct", "start", name)
    env = env_for(runtime, CORRAL_CONFIG=str(lab.cli_config))
    await asyncio.to_thread(warm, runtime, env)
    script = "echo out; echo err >&2; exit 42"
    helped = await asyncio.to_thread(launch, runtime, "ct", "exec", name, "--", "sh", "-c", script, env=env)
    alone = await asyncio.to_thread(launch, runtime, "ct", "exec", name, "--", "sh", "-c", script,
                                    env=dict(env, CORRAL_NO_HELPER="1"))  # fmt: skip
    assert (helped.returncode, helped.stdout, helped.stderr) == (42, "out\n", "err\n")
    assert (alone.returncode, alone.stdout, alone.stderr) == (42, "out\n", "err\n")
    stdin = await asyncio.to_thread(launch, runtime, "ct", "exec", "-i", name, "--", "cat", env=env, input="hello\n")
    assert stdin.returncode == 0 and stdin.stdout == "hello\n"
    assert len(served(runtime)) == 1  # `-i` reads stdin in its coroutine: in-process, not on the shared loop
