"""The lab every integration test runs in: real hosts (network namespaces), real
agents, a real controller and real LXC containers, brought up once per session
by the same code as `corral lab up` and torn down afterwards."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import lab as corral_lab

LAB_NAME = os.environ.get("CORRAL_TEST_LAB", "tst")
LAB_NODES = 3


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    def json(self):
        return json.loads(self.stdout)


class Corral:
    """Runs the `corral` CLI against the test lab, as an operator would."""

    def __init__(self, config: Path) -> None:
        self.config = config

    async def __call__(self, *args: str, check: bool = True, stdin: bytes | None = None) -> CliResult:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "controller.cli.main", "--config", str(self.config), *args,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(300):
            out, err = await proc.communicate(stdin)
        result = CliResult(proc.returncode, out.decode(), err.decode())
        if check and result.returncode != 0:
            raise AssertionError(f"corral {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
        return result

    async def json(self, *args: str):
        return (await self("--output", "json", *args)).json()


@pytest.fixture(scope="session")
async def lab():
    await corral_lab.lab_down(LAB_NAME)  # leftovers of an interrupted run
    info = await corral_lab.lab_up(name=LAB_NAME, nodes=LAB_NODES)
    try:
        yield info
    finally:
        await corral_lab.lab_down(LAB_NAME)


@pytest.fixture(scope="session")
async def corral(lab) -> Corral:
    return Corral(lab.cli_config)


@pytest.fixture
async def fleet(lab):
    from controller.cli.settings import CliSettings
    from controller.client import ControllerClient

    settings = CliSettings.load(lab.cli_config)
    async with ControllerClient(settings.controller, settings.tls, timeout=120) as client:
        yield client


async def events_of(corral: Corral, since: int = 0) -> list[dict]:
    """The controller's kept events after `since`, as `corral events -o json` prints them."""
    out = (await corral("events", "--no-follow", "--since", str(since), "-o", "json")).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


async def until(check, timeout: float = 30.0, interval: float = 0.1):
    """Poll the coroutine function `check` until it returns something true; returns that."""
    async with asyncio.timeout(timeout):
        while not (result := await check()):
            await asyncio.sleep(interval)
    return result


@pytest.fixture
async def store(tmp_path):
    """A controller's SQLite store in a temporary directory (no lab)."""
    from controller.store.sqlite import SqliteStore

    s = SqliteStore(tmp_path / "state.db")
    await s.open()
    yield s
    await s.close()


@pytest.fixture
async def cleanup(corral):
    """Names registered here are destroyed after the test, whatever happened."""
    names: list[str] = []
    yield names
    for name in names:
        await corral("ct", "destroy", "--force", name, check=False)


async def running_copies(lab, name: str) -> list[str]:
    """The lab hosts on which LXC really runs `name` (asked on each host itself)."""
    hosts = []
    for host in lab.hosts:
        argv = corral_lab.host_command(lab.name, host.node, ["lxc-ls", "-P", str(host.lxc_path), "--running", "-1"])
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        out, _ = await proc.communicate()
        if name in out.decode().split():
            hosts.append(host.node)
    return hosts
