"""Installing on real hosts (deploy/): the sd_notify protocol on a real datagram socket, the
daemons' readiness, `--check-config`, the example configs (loaded by the real loaders, and every
key a loader accepts documented in them) and the systemd units. No systemd needed."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agent import main as agent_main
from agent.config import AgentConfig
from controller import main as controller_main
from controller.cli.settings import CliSettings
from controller.config import ControllerConfig
from corral import pki, systemd
from corral.config import Section

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
EXAMPLES = DEPLOY / "examples"
UNITS = DEPLOY / "systemd"
EX_CONFIG = 78


# -- sd_notify -------------------------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path, monkeypatch, request):
    """A datagram socket standing in for systemd's; NOTIFY_SOCKET names it (a path, or with
    `abstract` an @name)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if getattr(request, "param", "path") == "abstract":
        name = f"@corral-test-{os.getpid()}-{id(sock)}"
        sock.bind("\0" + name[1:])
    else:
        name = str(tmp_path / "notify")
        sock.bind(name)
    sock.settimeout(10)
    monkeypatch.setenv("NOTIFY_SOCKET", name)
    yield sock
    sock.close()


@pytest.mark.parametrize("notify_socket", ["path", "abstract"], indirect=True)
def test_ready_status_and_stopping_reach_the_notify_socket(notify_socket):
    assert systemd.ready("serving on 127.0.0.1:7700")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=serving on 127.0.0.1:7700"
    assert systemd.status("leading")
    assert notify_socket.recv(4096) == b"STATUS=leading"
    assert systemd.stopping()
    assert notify_socket.recv(4096) == b"STOPPING=1"


def test_without_notify_socket_nothing_is_sent(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.ready() is False and systemd.stopping() is False


def test_a_notify_socket_nobody_listens_on_is_not_fatal(tmp_path, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert systemd.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")  # not a Unix socket: not ours to speak
    assert systemd.ready() is False


# -- certificates and configs ------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet_pki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    pki.init_ca(d)
    pki.issue(d, "controller", "controller", ["127.0.0.1"])
    pki.issue(d, "agent", "n1", ["127.0.0.1"])
    pki.issue(d, "user", "failoverd")
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def controller_yaml(tmp_path: Path, pki_dir: Path, extra: str = "", port: int = 7700,
                    cert: str = "controller-controller") -> Path:  # fmt: skip
    path = tmp_path / "controller.yaml"
    path.write_text(
        f'listen: ["127.0.0.1:{port}"]\n'
        f"store: {{path: {tmp_path / 'store.db'}}}\n"
        f"tls: {{ca: {pki_dir}/ca.crt, cert: {pki_dir}/{cert}.crt, key: {pki_dir}/{cert}.key}}\n"
        "network: {subnet: 10.0.0.0/24, gateway: 10.0.0.1, range_start: 10.0.0.100, range_end: 10.0.0.250}\n"
        + extra
    )
    return path


def agent_yaml(tmp_path: Path, pki_dir: Path, listen: str = "127.0.0.1:7701", node: str = "n1",
               cert: str = "agent-n1") -> Path:  # fmt: skip
    path = tmp_path / "agent.yaml"
    path.write_text(
        f"node: {node}\nlisten: {listen}\ncontroller: 127.0.0.1:7700\n"
        f"tls: {{ca: {pki_dir}/ca.crt, cert: {pki_dir}/{cert}.crt, key: {pki_dir}/{cert}.key}}\n"
        f"state_dir: {tmp_path / 'state'}\n"
    )
    return path


def check(main, path: Path, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(["--check-config", "--config", str(path)])
    out, err = capsys.readouterr()
    return exited.value.code, out, err


def test_check_config_of_sound_configs_says_ok_and_starts_nothing(tmp_path, fleet_pki, capsys):
    code, out, _ = check(controller_main.main, controller_yaml(tmp_path, fleet_pki), capsys)
    assert code == 0
    assert out.startswith("config OK: listen 127.0.0.1:7700, store ") and "fence_command none" in out
    assert "certificate controller 'controller' valid until 20" in out
    code, out, _ = check(agent_main.main, agent_yaml(tmp_path, fleet_pki), capsys)
    assert code == 0 and out.startswith("config OK: node n1, listen 127.0.0.1:7701") and "agent 'n1'" in out
    assert not (tmp_path / "store.db").exists() and not (tmp_path / "state").exists()


def test_check_config_error_with_file_and_line_exits_78(tmp_path, fleet_pki, capsys):
    path = controller_yaml(tmp_path, fleet_pki, "lease: -1\n")
    code, out, err = check(controller_main.main, path, capsys)
    assert code == EX_CONFIG and not out
    assert err.strip() == f"corral-controller: {path}:5: lease: must be longer than heartbeat_interval " \
                          "(each heartbeat renews it)"  # fmt: skip
    path = agent_yaml(tmp_path, fleet_pki)
    path.write_text(path.read_text() + "heartbeat_intervall: 1\n")
    code, _, err = check(agent_main.main, path, capsys)
    assert code == EX_CONFIG and f"{path}:6: heartbeat_intervall: unknown key" in err
    code, _, err = check(agent_main.main, tmp_path / "absent.yaml", capsys)
    assert code == EX_CONFIG and "configuration file not found" in err


def test_check_config_refuses_certificates_that_would_fail_the_handshake(tmp_path, fleet_pki, capsys):
    # Another role's certificate (the agent's, on the controller).
    code, _, err = check(controller_main.main, controller_yaml(tmp_path, fleet_pki, cert="agent-n1"), capsys)
    assert code == EX_CONFIG and "issued to agent 'n1', not to controller 'controller'" in err
    # An agent certificate of another node.
    code, _, err = check(agent_main.main, agent_yaml(tmp_path, fleet_pki, node="n2"), capsys)
    assert code == EX_CONFIG and "issued to agent 'n1', not to agent 'n2'" in err
    # A key that is not the certificate's.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(fleet_pki / "ca.crt", mixed / "ca.crt")
    shutil.copy(fleet_pki / "agent-n1.crt", mixed / "agent-n1.crt")
    shutil.copy(fleet_pki / "user-failoverd.key", mixed / "agent-n1.key")
    code, _, err = check(agent_main.main, agent_yaml(tmp_path, mixed), capsys)
    assert code == EX_CONFIG and "tls.key" in err and "is not the key of the certificate" in err
    # A certificate of another fleet's CA.
    other = tmp_path / "other"
    pki.init_ca(other)
    shutil.copy(other / "ca.crt", mixed / "ca.crt")
    shutil.copy(fleet_pki / "agent-n1.key", mixed / "agent-n1.key")
    code, _, err = check(agent_main.main, agent_yaml(tmp_path, mixed), capsys)
    assert code == EX_CONFIG and "not signed by the CA" in err
    # Not PEM at all.
    (mixed / "agent-n1.crt").write_text("not a certificate\n")
    code, _, err = check(agent_main.main, agent_yaml(tmp_path, mixed), capsys)
    assert code == EX_CONFIG and "tls.cert" in err and "not a PEM certificate" in err


def test_check_config_refuses_a_listen_address_this_host_does_not_have(tmp_path, fleet_pki, capsys):
    code, _, err = check(agent_main.main, agent_yaml(tmp_path, fleet_pki, listen="192.0.2.1:7701"), capsys)
    assert code == EX_CONFIG and "listen 192.0.2.1:7701: 192.0.2.1 is not an address of this host" in err
    code, _, err = check(agent_main.main, agent_yaml(tmp_path, fleet_pki, listen="no-such-host.invalid:7701"),
                         capsys)  # fmt: skip
    assert code == EX_CONFIG and "cannot resolve 'no-such-host.invalid'" in err


def test_check_config_through_the_installed_command(tmp_path, fleet_pki):
    command = Path(sys.executable).parent / "corral-controller"
    done = subprocess.run([str(command), "--check-config", "--config", str(controller_yaml(tmp_path, fleet_pki))],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0 and done.stdout.startswith("config OK: "), done.stderr


async def test_the_controller_says_ready_once_it_serves_and_stopping_when_asked(tmp_path, fleet_pki):
    """The real daemon under a stand-in for systemd: READY=1 comes once its port answers."""
    port = free_port()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controller.main", "--config", str(controller_yaml(tmp_path, fleet_pki, port=port)),
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)  # fmt: skip
    try:
        message = await asyncio.wait_for(loop.sock_recv(sock, 4096), 60)
        assert message.startswith(b"READY=1\nSTATUS=serving on 127.0.0.1:")
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # it does serve
        proc.send_signal(signal.SIGTERM)
        assert (await asyncio.wait_for(loop.sock_recv(sock, 4096), 30)) == b"STOPPING=1"
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        sock.close()


# -- the example configs -------------------------------------------------------------------------

# `#key: value`: a documented setting left off; `# text`: prose.
_DISABLED = re.compile(r"^(\s*)#(?=[a-z_-]+:)", re.MULTILINE)


def example(name: str, pki_dir: Path, tmp_path: Path, *, enable_all: bool) -> Path:
    """The example with its certificates pointed at `pki_dir` (and, with `enable_all`, its
    disabled settings switched on), written under tmp_path."""
    text = (EXAMPLES / name).read_text()
    if enable_all:
        text = _DISABLED.sub(r"\1", text).replace("/dev/watchdog", "/dev/null")  # a writable char device
    text = text.replace("/etc/corral/pki/", f"{pki_dir}/")
    text = text.replace("/var/lib/corral/controller/", f"{tmp_path}/")
    text = text.replace("/var/log/corral/", f"{tmp_path}/")  # made by the units (LogsDirectory=)
    path = tmp_path / name
    path.write_text(text)
    return path


LOADERS = {
    "agent.yaml": AgentConfig.load,
    "controller.yaml": ControllerConfig.load,
    "cli.yaml": lambda path: CliSettings.load(path, None),
}


@pytest.mark.parametrize("name", sorted(LOADERS))
@pytest.mark.parametrize("enable_all", [False, True], ids=["as-shipped", "all-enabled"])
def test_each_example_loads_and_documents_every_key_its_loader_accepts(name, enable_all, fleet_pki, tmp_path,
                                                                       monkeypatch):  # fmt: skip
    accepted: list[tuple[str, set[str]]] = []  # (section, keys) of every check_keys the loader makes
    check_keys = Section.check_keys

    def recording(self, allowed):
        accepted.append((self.where, set(allowed)))
        return check_keys(self, allowed)

    monkeypatch.setattr(Section, "check_keys", recording)
    monkeypatch.delenv("CORRAL_CONTEXT", raising=False)
    path = example(name, fleet_pki, tmp_path, enable_all=enable_all)
    LOADERS[name](path)
    if not enable_all:
        return
    # Every key the loader accepts, in every section it reads, is in the example (set or
    # disabled with `#key:`); each top-level one with a comment above it (a section's comment
    # covers its keys).
    doc = yaml.safe_load(path.read_text())
    assert accepted
    for where, keys in accepted:
        mapping = doc
        for part in filter(None, where.split(".")):
            mapping = mapping[part]
        missing = keys - set(mapping)
        assert not missing, f"{name}: {where or 'top level'}: not in the example: {sorted(missing)}"
    lines = (EXAMPLES / name).read_text().splitlines()
    for i, line in enumerate(lines):
        setting = re.match(r"^#?([a-z_-]+):", line)
        if setting and i and not lines[i - 1].lstrip().startswith("#") and "#" not in line.partition(":")[2]:
            pytest.fail(f"{name}:{i + 1}: {setting.group(1)} has no comment")


def test_examples_say_what_they_are_checked_with():
    for name in ("agent.yaml", "controller.yaml"):
        assert f"corral-{name.split('.')[0]} --check-config" in (EXAMPLES / name).read_text()


# -- the units -----------------------------------------------------------------------------------


def unit(name: str) -> dict[str, dict[str, str]]:
    """A unit file's sections; a key given more than once (After=) has its values joined by spaces."""
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in (UNITS / name).read_text().splitlines():
        if not line.strip() or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current[key] = f"{current[key]} {value}" if key in current else value
    return sections


@pytest.mark.parametrize("name", ["corral-agent.service", "corral-controller.service", "corral-failoverd.service"])
def test_units_notify_readiness_restart_on_failure_and_run_our_commands(name):
    u = unit(name)
    service = u["Service"]
    assert service["Type"] == "notify" and service["Restart"] == "on-failure"
    assert "network-online.target" in u["Unit"]["After"] and "network-online.target" in u["Unit"]["Wants"]
    assert int(service["LimitNOFILE"]) >= 65536
    assert u["Install"]["WantedBy"] == "multi-user.target"
    scripts = (ROOT / "pyproject.toml").read_text()
    command = service["ExecStart"].split()[0]
    assert command == f"/opt/corral/bin/{name.removesuffix('.service')}" and f"\n{Path(command).name} = " in scripts


def test_the_agent_unit_never_kills_containers_nor_hides_its_mounts():
    service = unit("corral-agent.service")["Service"]
    assert service["KillMode"] == "process"
    assert service.get("User", "root") == "root"
    # Each of these gives the service a mount namespace of its own: the image and LVM volumes the
    # agent mounts would be invisible to the host and to LXC.
    for option in ("PrivateTmp", "ProtectSystem", "ProtectHome", "PrivateDevices", "ReadOnlyPaths",
                   "InaccessiblePaths", "ProtectKernelTunables", "ProtectControlGroups", "NoNewPrivileges",
                   "CapabilityBoundingSet", "SystemCallFilter", "PrivateNetwork", "MountFlags"):  # fmt: skip
        assert option not in service, option


def test_the_controller_unit_keeps_its_state_in_its_state_directory():
    service = unit("corral-controller.service")["Service"]
    assert service["StateDirectory"] == "corral/controller" and service["ProtectSystem"] == "strict"
    store = yaml.safe_load((EXAMPLES / "controller.yaml").read_text())["store"]["path"]
    assert store.startswith("/var/lib/corral/controller/")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verifies_the_units(tmp_path):
    bindir = Path(sys.executable).parent  # the commands as installed here
    for path in UNITS.glob("*.service"):
        (tmp_path / path.name).write_text(path.read_text().replace("/opt/corral/bin/", f"{bindir}/"))
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", *sorted(map(str, tmp_path.glob("*.service")))],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
