"""Daemon logs in a file (`log_file`, `log_max_bytes`, `log_backups`; corral/log.py): rotated at
the size given with the backups kept, every line JSON, written by a thread of its own; the real
controller writing its lines there; bad values refused with FILE:LINE (or the flag) and exit 78."""

from __future__ import annotations

import asyncio
import json
import logging.handlers
import os
import signal
import socket
import sys
import threading
from pathlib import Path

import pytest
import structlog

from agent import main as agent_main
from controller import failoverd
from controller import main as controller_main
from corral import log as corral_log
from corral import pki
from corral.errors import ConfigError

EX_CONFIG = 78


@pytest.fixture
def restore_logging():
    saved = structlog.get_config()
    yield
    corral_log._stop_listener()
    structlog.configure(**saved)


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_tiny_max_bytes_rotates_and_keeps_the_backups_asked_for(tmp_path, restore_logging, monkeypatch):
    writers: set[str] = set()
    emit = logging.handlers.RotatingFileHandler.emit

    def recording(self, record):
        writers.add(threading.current_thread().name)
        return emit(self, record)

    monkeypatch.setattr(logging.handlers.RotatingFileHandler, "emit", recording)
    path = tmp_path / "agent.log"
    corral_log.configure(json_output=True, level="info", file=corral_log.LogFile(path, max_bytes=2048, backups=3))
    log = structlog.get_logger("test")
    for i in range(400):
        log.info("a line to fill the file", i=i, padding="x" * 40)
    log.debug("filtered out by the level")
    corral_log._stop_listener()  # what exit does: the queue written out, the file closed

    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["agent.log", "agent.log.1", "agent.log.2", "agent.log.3"]
    numbers = []
    for name in files:
        assert (tmp_path / name).stat().st_size <= 2048
        for line in lines_of(tmp_path / name):
            assert line["event"] == "a line to fill the file" and line["level"] == "info" and "timestamp" in line
            numbers.append(line["i"])
    # The newest lines are the ones kept, none twice; the oldest were dropped with the 4th backup.
    assert max(numbers) == 399 and len(numbers) == len(set(numbers)) and min(numbers) > 0
    assert threading.current_thread().name not in writers and writers  # the event loop's thread never writes


def test_max_bytes_0_leaves_rotation_to_logrotate(tmp_path, restore_logging):
    path = tmp_path / "controller.log"
    corral_log.configure(json_output=True, file=corral_log.LogFile(path, max_bytes=0))
    log = structlog.get_logger("test")
    log.info("before")
    _drain(path, "before")
    path.rename(tmp_path / "controller.log.1")  # what logrotate does, without copytruncate
    log.info("after")
    corral_log._stop_listener()
    assert [line["event"] for line in lines_of(tmp_path / "controller.log.1")] == ["before"]
    assert [line["event"] for line in lines_of(path)] == ["after"]


def _drain(path: Path, text: str) -> None:
    """Wait until the writer thread has written `text` to `path`."""
    for _ in range(1000):
        if path.exists() and text in path.read_text():
            return
        threading.Event().wait(0.01)
    raise AssertionError(f"{text!r} never reached {path}")


def test_a_file_that_cannot_be_opened_is_a_config_error(tmp_path, restore_logging):
    with pytest.raises(ConfigError, match=f"cannot open the log file {tmp_path}"):
        corral_log.configure(json_output=True, file=corral_log.LogFile(tmp_path))


# -- the daemons -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet_pki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    pki.init_ca(d)
    pki.issue(d, "controller", "controller", ["127.0.0.1"])
    pki.issue(d, "agent", "n1", ["127.0.0.1"])
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def controller_yaml(tmp_path: Path, pki_dir: Path, extra: str, port: int = 7700) -> Path:
    path = tmp_path / "controller.yaml"
    path.write_text(
        f'listen: ["127.0.0.1:{port}"]\n'
        f"store: {{path: {tmp_path / 'store.db'}}}\n"
        f"tls: {{ca: {pki_dir}/ca.crt, cert: {pki_dir}/controller-controller.crt, "
        f"key: {pki_dir}/controller-controller.key}}\n"
        "network: {subnet: 10.0.0.0/24, gateway: 10.0.0.1, range_start: 10.0.0.100, range_end: 10.0.0.250}\n"
        + extra
    )
    return path


def agent_yaml(tmp_path: Path, pki_dir: Path, extra: str) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(
        "node: n1\nlisten: 127.0.0.1:7701\ncontroller: 127.0.0.1:7700\n"
        f"tls: {{ca: {pki_dir}/ca.crt, cert: {pki_dir}/agent-n1.crt, key: {pki_dir}/agent-n1.key}}\n"
        f"state_dir: {tmp_path / 'state'}\n" + extra
    )
    return path


def check(main, path: Path, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(["--check-config", "--config", str(path)])
    out, err = capsys.readouterr()
    return exited.value.code, out, err


def test_check_config_names_the_log_file(tmp_path, fleet_pki, capsys):
    log = tmp_path / "logs" / "controller.log"
    log.parent.mkdir()
    settings = f"log_file: {log}\nlog_max_bytes: 10M\nlog_backups: 3\n"
    code, out, _ = check(controller_main.main, controller_yaml(tmp_path, fleet_pki, settings), capsys)
    assert code == 0 and f", log {log} (rotated at 10M, 3 kept)" in out, out
    code, out, _ = check(agent_main.main, agent_yaml(tmp_path, fleet_pki, f"log_file: {log}\nlog_max_bytes: 0\n"),
                         capsys)  # fmt: skip
    assert code == 0 and f", log {log} (logrotate)" in out, out


@pytest.mark.parametrize("extra,line,message", [
    ("log_file: {tmp}/no/such/dir/c.log\n", 5, "log_file: directory {tmp}/no/such/dir does not exist"),
    ("log_file: {tmp}\n", 5, "log_file: {tmp} is a directory; name a file in it"),
    ("log_file: logs/c.log\n", 5, "log_file: 'logs/c.log' is not an absolute path"),
    ("log_file: {tmp}/c.log\nlog_max_bytes: -1\n", 6, "log_max_bytes: must not be negative, got -1"),
    ("log_file: {tmp}/c.log\nlog_max_bytes: 100\n", 6, "log_max_bytes: 100 is less than 1K"),
    ("log_file: {tmp}/c.log\nlog_max_bytes: lots\n", 6, "log_max_bytes: invalid size 'lots'"),
    ("log_file: {tmp}/c.log\nlog_backups: 0\n", 6, "log_backups: must be between 1 and 100, got 0"),
    ("log_max_bytes: 1M\n", 5, "log_max_bytes: has no effect without log_file"),
])  # fmt: skip
def test_bad_log_settings_are_refused_with_file_and_line(tmp_path, fleet_pki, capsys, extra, line, message,
                                                         restore_logging):
    tmp = str(tmp_path)
    for main, yaml_of, prog, first in ((controller_main.main, controller_yaml, "corral-controller", 5),
                                       (agent_main.main, agent_yaml, "corral-agent", 6)):  # fmt: skip
        path = yaml_of(tmp_path, fleet_pki, extra.format(tmp=tmp))
        code, out, err = check(main, path, capsys)
        expected = f"{prog}: {path}:{line - 5 + first}: {message.format(tmp=tmp)}"
        assert code == EX_CONFIG and not out and err.startswith(expected), (err, expected)
        # Started without --check-config: the same message, nothing started.
        with pytest.raises(SystemExit) as exited:
            main(["--config", str(path)])
        assert exited.value.code == EX_CONFIG and capsys.readouterr().err.startswith(expected)


@pytest.mark.parametrize("flags,message", [
    (["--log-file", "relative.log"], "--log-file: 'relative.log' is not an absolute path"),
    (["--log-file", "/no/such/dir/f.log"], "--log-file: directory /no/such/dir does not exist"),
    (["--log-max-bytes", "-1"], "--log-max-bytes: must not be negative, got -1"),
    (["--log-backups", "0"], "--log-backups: must be between 1 and 100, got 0"),
    (["--log-level", "loud"], "--log-level: unknown log level 'loud'"),
])  # fmt: skip
def test_failoverd_refuses_bad_log_flags_before_it_starts(flags, message, capsys, restore_logging):
    with pytest.raises(SystemExit) as exited:
        failoverd.main([*flags, "--config", "/nonexistent/cli.yaml"])
    assert exited.value.code == EX_CONFIG
    assert capsys.readouterr().err.startswith(f"corral-failoverd: error: {message}")


async def test_the_controller_writes_its_lines_to_its_log_file(tmp_path, fleet_pki):
    log = tmp_path / "controller.log"
    port = free_port()
    config = controller_yaml(tmp_path, fleet_pki, f"log_file: {log}\nlog_max_bytes: 1K\nlog_backups: 2\n", port)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controller.main", "--config", str(config),
        env={k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)  # fmt: skip
    try:
        async with asyncio.timeout(60):
            while not (log.exists() and "controller serving" in log.read_text()):
                await asyncio.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            _, err = await proc.communicate()
        assert proc.returncode == 0, err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    events = [line["event"] for p in sorted(tmp_path.glob("controller.log*"), reverse=True) for line in lines_of(p)]
    assert "controller serving" in events and events[-1] == "controller stopping"
    assert not err.strip()  # nothing on stderr: the file has it all
