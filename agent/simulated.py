"""Simulated hosts, for scale tests only: many agents in one process, containers in memory.

Nothing else uses this module; a real agent (agent/main.py) never does. Each simulated host
has its own node name, its own client certificate (`agent-NAME.crt` in the fleet's PKI
directory) and its own gRPC channel to the controller, and runs the real agent's
membership code (agent/membership.py: register, heartbeat every interval, jittered retries)
with two in-memory stand-ins: `MemoryContainers` for the ContainerManager (what the host
holds: Container records in a dict; create/start/stop/destroy change only them) and
`SimulatedFacts` for HostFacts (plausible CPUs, memory, storage drivers, labels). The agent
gRPC API is not served: the controller cannot reach a simulated host (its address is a
placeholder), so what needs an agent call (create, migrate, exec) is out of scope.

    python -m agent.simulated --controller HOST:PORT --pki DIR --first 0 --count 250 \
        [--prefix sim] [--containers 5] [--interval 1] [--ramp SECONDS] [--status FILE]

`host_name(prefix, i)` and `host_containers(...)` are deterministic, so a benchmark can give
the controller's store the records of the containers the hosts will report. With --status,
the process writes {"hosts", "registered", "calls"} there every second; SIGUSR1 starts a
measurement window (round-trip samples cleared), SIGUSR2 ends it (the samples written to
the status file as "round_trips": {method: [seconds, ...]}); SIGTERM/SIGINT stop it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import time
from dataclasses import replace
from pathlib import Path

from agent import membership as membership_module
from agent.membership import Membership
from corral import log as corral_log
from corral.config import TlsFiles
from corral.errors import FailedPrecondition, NotFound
from corral.model import Container, ContainerState, DesiredState, Limits, NetworkAttachment, NodeFacts

GB, MB = 1 << 30, 1 << 20
SUBNET_BASE = (10, 200)  # containers' addresses: 10.200.0.0/16 (benchmark configs use it)


def host_name(prefix: str, index: int) -> str:
    return f"{prefix}{index:04d}"


def container_ip(index: int, per_host: int, i: int) -> str:
    n = 10 + index * per_host + i  # .0-.9 left out (gateway)
    return f"{SUBNET_BASE[0]}.{SUBNET_BASE[1]}.{n // 256}.{n % 256}"


def host_containers(node: str, index: int, per_host: int) -> list[Container]:
    """The containers simulated host `index` starts with: running, small, each its own address."""
    return [
        Container(
            name=f"{node}-c{i}", node=node, template="busybox", state=ContainerState.RUNNING,
            limits=Limits(memory_bytes=256 * MB, cpu_millis=500), storage="dir", init_pid=10_000 + i,
            network=NetworkAttachment(f"{container_ip(index, per_host, i)}/16", f"{SUBNET_BASE[0]}.{SUBNET_BASE[1]}.0.1",
                                      f"02:00:{index >> 8:02x}:{index & 255:02x}:00:{i:02x}"),
            desired_state=DesiredState.RUNNING,
        )
        for i in range(per_host)
    ]  # fmt: skip


class MemoryContainers:
    """The ContainerManager stand-in: the host's containers held in memory. What
    Membership and LocalRestarts call, plus create/start/stop/destroy on the records."""

    def __init__(self, node: str, containers: list[Container] = ()) -> None:
        self.node = node
        self._containers = {c.name: c for c in containers}
        self._next_pid = 20_000

    async def list(self) -> list[Container]:
        return list(self._containers.values())

    async def get(self, name: str, wait_idle: bool = False) -> Container:
        try:
            return self._containers[name]
        except KeyError:
            raise NotFound(f"container {name!r} is not on node {self.node}") from None

    async def create(self, name: str, template: str, limits: Limits, network: NetworkAttachment = NetworkAttachment(),
                     storage: str = "dir") -> Container:  # fmt: skip
        ct = Container(name=name, node=self.node, template=template, state=ContainerState.STOPPED, limits=limits,
                       network=network, storage=storage, created_at=time.time())  # fmt: skip
        self._containers[name] = ct
        return ct

    async def start(self, name: str) -> Container:
        self._next_pid += 1
        return self._set(name, ContainerState.RUNNING, self._next_pid)

    async def stop(self, name: str, *, force: bool = False, timeout: int = 0) -> Container:
        return self._set(name, ContainerState.STOPPED, 0)

    async def destroy(self, name: str, *, force: bool = False) -> None:
        ct = await self.get(name)
        if ct.state == ContainerState.RUNNING and not force:
            raise FailedPrecondition(f"container {name!r} is running")
        del self._containers[name]

    def _set(self, name: str, state: ContainerState, pid: int) -> Container:
        if name not in self._containers:
            raise NotFound(f"container {name!r} is not on node {self.node}")
        ct = self._containers[name] = replace(self._containers[name], state=state, init_pid=pid)
        return ct

    # What LocalRestarts asks (agent/ha_restart.py): nothing here stops unasked or is fenced.
    def self_fenced(self, name: str) -> bool:
        return False

    async def stopped_unasked(self, name: str) -> bool:
        return False

    async def restart_after_fence(self, name: str) -> bool:
        return False


class SimulatedFacts:
    """The HostFacts stand-in: fixed facts, memory and disk use moving a little at each call."""

    def __init__(self, facts: NodeFacts, rng: random.Random) -> None:
        self._facts = facts
        self._rng = rng

    def current(self) -> NodeFacts:
        f = self._facts
        return replace(f, memory_available_bytes=int(f.memory_bytes * self._rng.uniform(0.4, 0.6)),
                       disk_free_bytes=int(f.disk_bytes * self._rng.uniform(0.5, 0.7)))  # fmt: skip


def host_facts(node: str, index: int, rng: random.Random) -> NodeFacts:
    from agent import __version__

    memory = rng.choice([32, 64, 128, 256]) * GB
    return NodeFacts(
        name=node, address=f"127.0.0.1:{20000 + index}", cpus=rng.choice([8, 16, 32, 64]), memory_bytes=memory,
        memory_available_bytes=memory // 2, disk_bytes=2000 * GB, disk_free_bytes=1200 * GB, kernel="6.1.0-sim",
        lxc_version="5.0.2", criu_version="4.2.1", criu_ok=True, agent_version=__version__,
        storage_drivers=("dir", "image"), live_strategies=("stop-and-copy", "pre-copy"),
        labels={"zone": "abc"[index % 3], "simulated": "yes"},
    )  # fmt: skip


class RoundTrips:
    """Client-side round trips of the membership calls, by method (between SIGUSR1 and SIGUSR2)."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {}
        self.calls = 0

    def wrap(self, call):
        async def timed(rpc, request, *args, **kwargs):
            started = time.perf_counter()
            try:
                return await call(rpc, request, *args, **kwargs)
            finally:
                self.calls += 1
                self.samples.setdefault(type(request).__name__.removesuffix("Request"), []).append(
                    time.perf_counter() - started)

        return timed


class SimulatedHosts:
    """`count` simulated hosts from `first`, each running the real Membership."""

    def __init__(self, controller: str, pki_dir: Path, first: int, count: int, *, prefix: str = "sim",
                 containers: int = 0, interval: float = 1.0, seed: int = 1) -> None:  # fmt: skip
        self.memberships: list[Membership] = []
        for index in range(first, first + count):
            node = host_name(prefix, index)
            rng = random.Random(seed * 1_000_003 + index)
            tls = TlsFiles(pki_dir / "ca.crt", pki_dir / f"agent-{node}.crt", pki_dir / f"agent-{node}.key")
            self.memberships.append(Membership(controller, tls, SimulatedFacts(host_facts(node, index, rng), rng),
                                               MemoryContainers(node, host_containers(node, index, containers)),
                                               interval))  # fmt: skip

    def registered(self) -> int:
        return sum(m.registered.is_set() for m in self.memberships)

    async def run(self, ramp: float = 0.0) -> None:
        """Start the hosts evenly over `ramp` seconds (a fleet's agents do not all start at once)."""
        async with asyncio.TaskGroup() as tg:
            for m in self.memberships:
                tg.create_task(m.run())
                await asyncio.sleep(ramp / len(self.memberships))


async def _main(args: argparse.Namespace) -> None:
    trips = RoundTrips()
    membership_module.call = trips.wrap(membership_module.call)  # this process only: a scale test's
    hosts = SimulatedHosts(args.controller, args.pki, args.first, args.count, prefix=args.prefix,
                           containers=args.containers, interval=args.interval)  # fmt: skip
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    window: dict[str, object] = {}

    def status() -> dict:
        return {"pid": os.getpid(), "hosts": len(hosts.memberships), "registered": hosts.registered(),
                "calls": trips.calls, **window}  # fmt: skip

    def write_status() -> None:
        if args.status:
            tmp = args.status.with_name(args.status.name + ".tmp")
            tmp.write_text(json.dumps(status()))
            os.replace(tmp, args.status)

    def start_window() -> None:
        trips.samples.clear()
        window.clear()

    def end_window() -> None:
        window["round_trips"] = {k: list(v) for k, v in trips.samples.items()}
        write_status()

    loop.add_signal_handler(signal.SIGUSR1, start_window)
    loop.add_signal_handler(signal.SIGUSR2, end_window)
    runner = asyncio.create_task(hosts.run(args.ramp))
    while not stop.is_set() and not runner.done():
        write_status()
        try:
            async with asyncio.timeout(1.0):
                await stop.wait()
        except TimeoutError:
            pass
    runner.cancel()
    try:
        await runner
    except BaseException:  # cancelled, or the hosts' own failure: stopping anyway
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m agent.simulated", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--controller", required=True, help="the controller's HOST:PORT")
    parser.add_argument("--pki", type=Path, required=True, help="ca.crt and agent-NAME.crt/.key for each host")
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--prefix", default="sim")
    parser.add_argument("--containers", type=int, default=0, help="containers per host")
    parser.add_argument("--interval", type=float, default=1.0, help="heartbeat interval until the controller says")
    parser.add_argument("--ramp", type=float, default=0.0, help="seconds over which the hosts are started")
    parser.add_argument("--status", type=Path)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    corral_log.configure(json_output=True, level=args.log_level)
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
