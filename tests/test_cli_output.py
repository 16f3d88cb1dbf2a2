"""The CLI's output, options and help, driven in-process with a fake controller client (no lab)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import yaml
from click.testing import CliRunner

from controller.cli.context import Ctx
from controller.cli.main import cli
from corral.model import Container, ContainerState, DesiredState, Limits, NetworkAttachment, Node, NodeFacts, NodeState
from corral.v1 import types_pb2 as pb

NOW = 1796166208.25

NODE = Node(
    facts=NodeFacts(
        name="n1", address="10.9.0.2:7701", cpus=2, memory_bytes=8 << 30, memory_available_bytes=6 << 30,
        disk_bytes=100 << 30, disk_free_bytes=50 << 30, kernel="6.18", lxc_version="5.0.2", criu_version="4.2.1",
        criu_ok=True, agent_version="0.1.0", storage_drivers=("dir", "image"),
        live_strategies=("stop-and-copy", "post-copy"), live_unavailable={"pre-copy": "no memory dirty tracking"},
    ),
    state=NodeState.READY, last_heartbeat=NOW, allocated=Limits(memory_bytes=256 << 20), container_count=1,
)  # fmt: skip
CONTAINER = Container(
    name="web1", node="n1", template="busybox", state=ContainerState.RUNNING, limits=Limits(memory_bytes=256 << 20),
    network=NetworkAttachment("10.9.0.10/24", "10.9.0.1", "02:00:00:00:00:01"), storage="image", init_pid=4242,
    created_at=NOW, volume_generation=3, desired_state=DesiredState.RUNNING, observed_at=NOW, revision=4,
)  # fmt: skip
OPERATION = pb.Operation(
    id="op-1", kind="migrate", container="web1", state="succeeded",
    params={"target": '"n2"', "live": "true", "strategy": '"stop-and-copy"'},
    steps=[pb.OperationStep(name="dump", state="done", started_at=NOW, finished_at=NOW + 0.3)],
    progress=pb.OperationProgress(phase="done", bytes_done=10, bytes_total=10, eta_s=-1),
    timings_ms={"downtime": 412.5}, result={"bytes_sent": "0"}, created_at=NOW, updated_at=NOW + 1,
)  # fmt: skip


class FakeFleet:
    """The ControllerClient calls the CLI makes, answered from memory."""

    def __init__(self) -> None:
        self.created: list[dict] = []

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return None

    async def list_nodes(self):
        return [NODE]

    async def get_node(self, name):
        return NODE

    async def list_containers(self, node=""):
        return [CONTAINER]

    async def get_container(self, name):
        return CONTAINER

    async def list_operations(self, container="", active_only=False):
        return [OPERATION]

    async def get_operation(self, op_id):
        return OPERATION

    async def create_container(self, name, template, **kwargs):
        self.created.append({"name": name, "template": template, **kwargs})
        return CONTAINER


@pytest.fixture
def fleet(monkeypatch) -> FakeFleet:
    fake = FakeFleet()
    monkeypatch.setattr(Ctx, "client", lambda self, timeout=None: fake)
    return fake


def corral(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), prog_name="corral")
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def fields(message_type) -> set[str]:
    return {f.name for f in message_type.DESCRIPTOR.fields}


READS = [
    (("node", "ls"), pb.Node, True),
    (("node", "show", "n1"), pb.Node, False),
    (("ct", "ls"), pb.Container, True),
    (("ct", "show", "web1"), pb.Container, False),
    (("ops", "ls"), pb.Operation, True),
    (("ops", "show", "op-1"), pb.Operation, False),
]


@pytest.mark.parametrize("fmt", ["json", "yaml"])
@pytest.mark.parametrize("where", ["before", "after"])
@pytest.mark.parametrize("command,message,is_list", READS, ids=[" ".join(r[0]) for r in READS])
def test_machine_output_is_the_api_object_wherever_the_option_is(fleet, fmt, where, command, message, is_list):
    args = ["-o", fmt, *command] if where == "before" else [*command, "--output", fmt]
    code, out = corral(*args)
    assert code == 0, out
    data = json.loads(out) if fmt == "json" else yaml.safe_load(out)
    objects = data if is_list else [data]
    assert isinstance(data, list) == is_list and objects
    expected = fields(message) | ({"name"} if message is pb.Node else set())  # a node's name: its facts.name
    for obj in objects:
        assert set(obj) == expected


def test_json_renders_times_enums_and_numbers(fleet):
    node = json.loads(corral("node", "show", "n1", "-o", "json")[1])
    assert node["name"] == "n1" and node["state"] == "ready"
    assert node["last_heartbeat"] == "2026-12-01T23:03:28.250Z"
    assert node["facts"]["agent_version"] == "0.1.0"
    assert node["facts"]["live_strategies"] == ["stop-and-copy", "post-copy"]
    assert node["facts"]["live_unavailable"] == {"pre-copy": "no memory dirty tracking"}
    assert node["facts"]["memory_bytes"] == 8 << 30  # a number, not protobuf JSON's string

    ct = json.loads(corral("ct", "show", "web1", "-o", "json")[1])
    assert (ct["name"], ct["state"], ct["node"]) == ("web1", "running", "n1")
    assert ct["network"]["ipv4_cidr"] == "10.9.0.10/24" and ct["init_pid"] == 4242
    assert ct["created_at"] == "2026-12-01T23:03:28.250Z" and ct["volume_generation"] == 3

    op = json.loads(corral("ops", "show", "op-1", "-o", "json")[1])
    assert "name" not in op and op["id"] == "op-1"
    assert op["params"] == {"target": "n2", "live": True, "strategy": "stop-and-copy"}
    assert op["result"] == {"bytes_sent": 0}
    assert op["steps"][0]["finished_at"] == "2026-12-01T23:03:28.550Z"
    assert op["progress"]["phase"] == "done" and op["timings_ms"] == {"downtime": 412.5}


def test_unset_times_are_null(fleet, monkeypatch):
    monkeypatch.setattr(FakeFleet, "get_container", lambda self, name: _const(Container("c", "n1", "busybox", ContainerState.STOPPED)))
    ct = json.loads(corral("ct", "show", "c", "-o", "json")[1])
    assert ct["created_at"] is None and ct["init_pid"] == 0 and ct["state"] == "stopped"


async def _const(value):
    return value


def test_tables_and_no_headers(fleet):
    code, out = corral("ct", "ls")
    assert code == 0 and out.splitlines()[0].split()[:3] == ["NAME", "STATE", "NODE"]
    code, out = corral("ct", "ls", "--no-headers")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 1 and lines[0].split()[:3] == ["web1", "running", "n1"]
    code, out = corral("--no-headers", "node", "ls")
    assert [line.split()[0] for line in out.splitlines()] == ["n1"]
    code, out = corral("ops", "ls", "--no-headers")
    assert out.split()[0] == "op-1"


def test_node_show_table_has_live_strategies_and_reasons(fleet):
    code, out = corral("node", "show", "n1")
    assert code == 0
    assert "stop-and-copy, post-copy" in out
    assert "no pre-copy" in out and "no memory dirty tracking" in out
    assert "0.1.0" in out


def test_create_storage_and_template_choices(fleet):
    code, out = corral("ct", "create", "web1", "-t", "busybox", "--storage", "shared", "-o", "json")
    assert code == 0 and json.loads(out)["name"] == "web1"
    assert fleet.created[-1]["storage"] == "shared"
    code, out = corral("ct", "create", "web1", "-t", "busybox")
    assert fleet.created[-1]["storage"] == "local"
    code, out = corral("ct", "create", "web1", "-t", "alpine")
    assert code == 2 and "'alpine' is not one of 'busybox', 'debian'" in out
    code, out = corral("ct", "create", "web1", "-t", "busybox", "--storage", "nfs")
    assert code == 2 and "local" in out and "shared" in out


def test_storage_names_map_to_drivers():
    from controller.vocabulary import storage_driver

    assert storage_driver("local") == storage_driver("") == "dir"
    assert storage_driver("shared", [("dir", "image"), ("dir",)]) == "image"
    assert storage_driver("shared", [("dir", "lvm")]) == "lvm"
    assert storage_driver("shared", [("dir", "lvm"), ("dir", "image")]) == "image"
    assert storage_driver("dir") == "dir" and storage_driver("lvm") == "lvm"
    assert storage_driver("nfs") is None


def test_group_without_subcommand_prints_help_and_exits_0():
    for group in ("ct", "node", "ops", "context", "lab", "pki"):
        code, out = corral(group)
        assert code == 0 and "Commands:" in out, group


def test_help_has_examples_defaults_and_exit_codes():
    code, out = corral("--help")
    assert code == 0 and "Exit codes:" in out and "78" in out and "Examples:" in out
    code, out = corral("ct", "exec", "--help")
    assert "Examples:" in out and "300 s" in out
    code, out = corral("ct", "create", "--help")
    assert "[default: local]" in out and "[busybox|debian]" in out
    from controller.cli.main import cli as root

    def leaves(command, path=()):
        subcommands = getattr(command, "commands", None)
        if subcommands is None:
            yield path, command
            return
        for name, sub in subcommands.items():
            yield from leaves(sub, (*path, name))

    for path, command in leaves(root):
        assert command.examples, f"corral {' '.join(path)} has no examples"


def test_version():
    code, out = corral("--version")
    from importlib.metadata import version

    assert code == 0 and out.strip() == f"corral {version('corral')}"


@pytest.mark.parametrize("program,prog", [("agent.main", "corral-agent"), ("controller.main", "corral-controller")])
def test_daemon_version(program, prog):
    from importlib.metadata import version

    out = subprocess.run([sys.executable, "-m", program, "--version"], capture_output=True, text=True, check=True)
    assert out.stdout == f"{prog} {version('corral')}\n"


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_script(shell):
    code, out = corral("completion", shell)
    assert code == 0 and "_CORRAL_COMPLETE" in out


def complete(args: str, monkeypatch) -> list[str]:
    from click.shell_completion import ShellComplete

    words = args.split(" ")
    comp = ShellComplete(cli, {}, "corral", "_CORRAL_COMPLETE")
    return [item.value for item in comp.get_completions(words[:-1], words[-1])]


def test_completion_of_names_and_choices(fleet, monkeypatch):
    assert complete("ct show w", monkeypatch) == ["web1"]
    assert complete("ct show x", monkeypatch) == []
    assert complete("node show ", monkeypatch) == ["n1"]
    assert complete("ct migrate web1 --to ", monkeypatch) == ["n1"]
    assert complete("ops watch ", monkeypatch) == ["op-1"]
    assert complete("ct create x --template ", monkeypatch) == ["busybox", "debian"]
    assert complete("ct create x --storage sh", monkeypatch) == ["shared"]
    assert complete("ct ls -o ", monkeypatch) == ["table", "json", "yaml"]


def test_completion_is_silent_and_quick_when_the_controller_fails(monkeypatch):
    class Broken(FakeFleet):
        async def list_containers(self, node=""):
            raise RuntimeError("boom")

    monkeypatch.setattr(Ctx, "client", lambda self, timeout=None: Broken())
    assert complete("ct show ", monkeypatch) == []

    class Hanging(FakeFleet):
        async def list_containers(self, node=""):
            import asyncio

            await asyncio.sleep(60)

    monkeypatch.setattr("controller.cli.completion.DEADLINE", 0.2)
    monkeypatch.setattr(Ctx, "client", lambda self, timeout=None: Hanging())
    started = time.monotonic()
    assert complete("ct show ", monkeypatch) == []
    assert time.monotonic() - started < 2


def test_create_prints_no_spinner_when_not_a_terminal(fleet):
    code, out = corral("ct", "create", "web1", "-t", "debian")
    assert code == 0 and out.startswith("created web1 on n1")
    code, out = corral("ct", "create", "web1", "-t", "debian", "-o", "json")
    assert json.loads(out)["name"] == "web1"


def test_waiting_spinner_on_a_terminal(monkeypatch):
    import asyncio
    import io

    from controller.cli import progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    async def wait(obj, seconds):
        async with progress.waiting(obj, "the controller to create d1", hint="building the debian template"):
            await asyncio.sleep(seconds)

    err = Tty()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(progress, "HINT_AFTER", 0.1)
    asyncio.run(wait(Ctx(), 0.4))
    shown = err.getvalue()
    assert "waiting for the controller to create d1" in shown and "building the debian template" in shown
    assert "0:00:00" in shown  # the elapsed time
    err = Tty()
    monkeypatch.setattr(sys, "stderr", err)
    asyncio.run(wait(Ctx(fmt="json"), 0))
    assert err.getvalue() == ""


def test_help_is_quick():
    """`corral --help` imports neither grpc's channel code, protobuf, rich nor yaml."""
    code = ("import sys, runpy; sys.argv = ['corral', '--help']\n"
            "try: runpy.run_module('controller.cli.main', run_name='__main__')\n"
            "except SystemExit: pass\n"
            "heavy = [m for m in ('rich', 'yaml', 'google.protobuf', 'corral.v1.types_pb2', 'controller.client') "
            "if m in sys.modules]\n"
            "print('HEAVY', heavy)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out


class ExecFleet(FakeFleet):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    async def exec_stream(self, name, argv, *, env=None, stdin=b"", timeout=0):
        from corral.proc import Exited, Output

        self.calls.append((name, list(argv), dict(env or {}), timeout))
        yield Output(1, b"out")
        yield Exited(3)


@pytest.mark.parametrize("args,argv,env,timeout,fmt", [
    (["ct", "exec", "web1", "--", "ps", "-o", "pid"], ["ps", "-o", "pid"], {}, 0, "table"),
    (["ct", "exec", "web1", "ps", "-o", "pid"], ["ps", "-o", "pid"], {}, 0, "table"),
    (["ct", "exec", "-e", "A=1", "web1", "--timeout", "5", "sh", "-c", "x --timeout 9"], ["sh", "-c", "x --timeout 9"],
     {"A": "1"}, 5, "table"),
    (["ct", "exec", "web1", "-o", "json", "--", "true"], ["true"], {}, 0, "json"),
    (["ct", "exec", "web1", "-o", "json", "ls", "-o"], ["ls", "-o"], {}, 0, "json"),
])  # fmt: skip
def test_exec_hands_the_command_its_own_options(monkeypatch, args, argv, env, timeout, fmt):
    fake = ExecFleet()
    monkeypatch.setattr(Ctx, "client", lambda self, timeout=None: fake)
    code, out = corral(*args)
    assert fake.calls == [("web1", argv, env, timeout)]
    assert code == 3
    if fmt == "json":
        assert json.loads(out) == {"name": "web1", "exit_code": 3, "timed_out": False, "stdout": "out", "stderr": ""}
    else:
        assert out == "out"


def test_interrupted_watch_says_the_operation_continues(monkeypatch):
    import asyncio
    import signal

    class Watching(FakeFleet):
        async def watch_operation(self, op_id):
            yield OPERATION
            signal.raise_signal(signal.SIGINT)  # ^C: asyncio.run cancels the command's task
            await asyncio.sleep(10)

    monkeypatch.setattr(Ctx, "client", lambda self, timeout=None: Watching())
    # As a terminal's ^C finds it, whatever this process inherited (a shell's background job
    # starts with SIGINT ignored).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result = CliRunner().invoke(cli, ["ops", "watch", "op-1"], prog_name="corral")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert result.exit_code == 130
    assert "operation op-1 continues: `corral ops watch op-1`" in result.output


def test_watch_progress_bar_on_a_terminal(monkeypatch):
    """The bar is drawn by the command's own event loop (no rich thread), then the operation."""
    import io
    import threading

    class Tty(io.StringIO):
        def isatty(self):
            return True

        def write(self, s):
            assert threading.current_thread() is threading.main_thread(), "written from another thread"
            return super().write(s)

    class Watching(FakeFleet):
        async def watch_operation(self, op_id):
            import asyncio

            for done in (0, 5, 10):
                op = pb.Operation()
                op.CopyFrom(OPERATION)
                op.progress.phase, op.progress.bytes_done = "transfer", done
                yield op
                await asyncio.sleep(0.15)

    import asyncio

    from controller.cli.operations import watch_with_progress

    err, out = Tty(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(sys, "stdout", out)
    assert asyncio.run(watch_with_progress(Watching(), "op-1", Ctx())) == 0
    assert "transfer" in err.getvalue() and "10 bytes" in err.getvalue()
    assert "state:     succeeded" in out.getvalue()


def test_ops_show_times_each_phase_in_the_order_a_migration_runs_them(capsys):
    """`vzmigrate -t`'s table: the wait for the target's page cache (before the freeze) comes
    before the dump; byte counts are not times; unknown keys follow, by name."""
    from types import SimpleNamespace

    from controller.cli.operations import print_timings

    print_timings(SimpleNamespace(timings_ms={"downtime": 1850.0, "landing": 1609.0, "dump": 1146.0,
                                              "images_bytes": 2.8e6, "zz_new": 1.0}))  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["timings:", "target's", "checkpoint", "total", "zz_new"]
    assert "1609.0 ms" in lines[1]
