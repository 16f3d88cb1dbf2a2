"""Watching a lab from outside Corral while a fault plays out: how many copies of a container
run, asked on each host itself (LXC's own view, not the controller's), and a sampler that
keeps asking (rule 1: never two running copies); the failover daemon run for a while."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from lab.hosts import host_command
from lab.state import LabInfo


async def running_on(lab: LabInfo, node: str) -> set[str]:
    """The containers LXC runs on lab host `node` now."""
    host = lab.host(node)
    argv = host_command(lab.name, node, ["lxc-ls", "-P", str(host.lxc_path), "--running", "-1"])
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.DEVNULL)  # fmt: skip
    out, _ = await proc.communicate()
    return set(out.decode().split())


async def where_running(lab: LabInfo, names: Iterable[str]) -> dict[str, list[str]]:
    """Each of `names` -> the lab hosts on which it runs (every host asked at once)."""
    nodes = [h.node for h in lab.hosts]
    running = await asyncio.gather(*(running_on(lab, n) for n in nodes))
    return {name: [n for n, there in zip(nodes, running) if name in there] for name in names}


@dataclass
class Sample:
    at: float  # wall clock (time.time()), comparable with the controller's events and the agents' logs
    hosts: dict[str, list[str]]  # container -> the hosts running it


@dataclass
class CopySampler:
    """`async with CopySampler(lab, names) as s:` asks every host which of `names` run,
    every `interval` seconds, until the block ends; then `s.doubles()` lists the samples
    in which one of them ran on more than one host."""

    lab: LabInfo
    names: list[str]
    interval: float = 0.1
    samples: list[Sample] = field(default_factory=list)
    _task: asyncio.Task | None = None

    async def __aenter__(self) -> "CopySampler":
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            at = time.time()
            self.samples.append(Sample(at, await where_running(self.lab, self.names)))
            await asyncio.sleep(self.interval)

    def doubles(self) -> list[Sample]:
        return [s for s in self.samples if any(len(h) > 1 for h in s.hosts.values())]

    def max_copies(self) -> int:
        return max((len(h) for s in self.samples for h in s.hosts.values()), default=0)

    def last_seen_on(self, name: str, node: str) -> float | None:
        """When `name` was last seen running on `node` (None: never)."""
        return max((s.at for s in self.samples if node in s.hosts.get(name, ())), default=None)

    def first_seen_off(self, name: str, node: str) -> float | None:
        """When `name` was first seen running on a host other than `node` (None: never)."""
        return min((s.at for s in self.samples if any(h != node for h in s.hosts.get(name, ()))), default=None)


@contextlib.asynccontextmanager
async def failover_daemon(lab: LabInfo, *args: str, log_file: Path | None = None):
    """`corral-failoverd` against the lab's controller (its default settings unless `args`) for
    the block; its output goes to `log_file` (else discarded). Terminated afterwards, by its PID."""
    out = open(log_file, "ab") if log_file else None
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "controller.failoverd", "--config", str(lab.cli_config), *args,
            stdin=asyncio.subprocess.DEVNULL, stdout=out or asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            yield proc
        finally:
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 10)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
    finally:
        if out:
            out.close()
