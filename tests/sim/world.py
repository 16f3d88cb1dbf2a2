"""Simulated hosts around the real HA decision code, on simulated time (tests/sim/clock.py).

Real: the controller's NodeRegistry and HealthPolicy, the Fencer (its action
is the simulated fence agent), the failover guard (controller/health/guard.py)
and planner (plan_failover), the failover daemon (FailoverDaemon over a client
of the simulated controller, its lease in the real SqliteStore), and on each
host the agent's Lease (its fence kills the host's simulated copies) and
Watchdog (its device is the host's simulated hardware timer).

Simulated: power, the network link, the agent process (up, hung, dead), the
copies of containers each host holds (running or not), the fence agent (works,
fails, hangs), the controller's records and failover operations (take the
volume over, then start on the target; resumed after a controller restart),
and what a returning host reports.

Rule 1 is checked at every start of a copy and every tick: no container runs on
two powered hosts at once (a copy runs until its host's self-fence killed it or
the host lost power). A break raises Violation at once.
"""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from agent.lease import Lease
from agent.watchdog import Watchdog
from controller.events import EventBus
from controller.failoverd import FailoverDaemon
from controller.health.fencing import Fencer
from controller.health.guard import CopyVerdict, failover_refusal, stale_copy
from controller.health.liveness import HealthPolicy
from controller.health.registry import NodeRegistry
from controller.scheduler.failover import plan_failover
from controller.scheduler.placement import PlacementPolicy
from controller.store.sqlite import SqliteStore
from corral.errors import CorralError, FailedPrecondition, NoCapacity, NotFound, Unavailable
from corral.model import Container, ContainerState, Limits, NodeFacts, NodeState

from sim.clock import RealWorkStore, SimulatedLoop

GB = 1 << 30
HEARTBEAT = 1.0  # the agents' default heartbeat interval
TICK = 0.1  # how often rule 1 and the watchdogs' timers are checked (also at every start)
FENCE_TAKES = 1.0  # an IPMI power-off
BOOT_TAKES = 3.0  # from power on (or a watchdog reset) to the agent's first heartbeat
TAKEOVER_TAKES = 0.5  # a failover's volume takeover at the next generation
START_TAKES = 0.5  # and the start on its target
RESTART_DOWN = 1.0  # a controller restart: seconds no request is answered


class Violation(AssertionError):
    """Rule 1 broken: a container ran on two hosts at once."""


@dataclass
class Settings:
    policy: HealthPolicy = field(default_factory=HealthPolicy)
    fence: bool = True  # a fence command is configured
    fence_timeout: float = 60.0  # the controller config's default
    watchdog: float | None = None  # every host's watchdog_timeout; None: none configured
    daemon_ttl: float = 10.0


@dataclass
class Copy:
    running: bool


class Host:
    """One simulated host: power, link, its agent's tasks, the copies it holds, its fence agent."""

    def __init__(self, world: "World", name: str, memory_gb: int, phase: float) -> None:
        self.world = world
        self.name = name
        self.phase = phase  # its heartbeats' offset: hosts never beat at the same instant (a stable story)
        self.memory_gb = memory_gb
        self.powered = False
        self.link = True
        self.agent = "down"  # up | hung | dead | down (no power)
        self.copies: dict[str, Copy] = {}
        self.fence_agent = "works"  # works | fails | hangs
        self.boots = 0
        self.watchdog_deadline: float | None = None  # the hardware timer, while armed
        self.lease: Lease | None = None
        self._tasks: list[asyncio.Task] = []

    @property
    def facts(self) -> NodeFacts:
        return NodeFacts(self.name, f"{self.name}:7701", cpus=8, memory_bytes=self.memory_gb * GB,
                         storage_drivers=("dir", "image"))  # fmt: skip

    # -- power and the agent -----------------------------------------------------------------

    def power_on(self) -> None:
        if self.powered:
            return
        self.powered, self.boots = True, self.boots + 1
        self.world.later(BOOT_TAKES, self._boot, self.boots)

    def _boot(self, boot: int) -> None:
        if self.powered and self.boots == boot and self.agent == "down":
            self.start_agent()

    def power_off(self, why: str) -> None:
        if not self.powered:
            return
        self.powered = False
        self._stop_agent("down")
        for copy in self.copies.values():
            copy.running = False  # the files stay; nothing of it runs
        self.watchdog_deadline = None
        self.world.log(f"{self.name} powered off {why}")

    def start_agent(self) -> None:
        """The agent starts: its lease (kept in its state dir, refused after a reboot), its watchdog,
        its heartbeats. Nothing it holds restarts by itself."""
        self.agent = "up"
        self.lease = Lease(self.world.state_dir / f"{self.name}-lease.json", self._self_fence, clock=self.world.loop.time,
                           boot=f"{self.name}-boot-{self.boots}")  # fmt: skip
        # The guard first: a lease that ran out while the agent was away is fenced before any beat.
        self._tasks = [asyncio.create_task(self.lease.guard()), asyncio.create_task(self._heartbeats())]
        if self.world.settings.watchdog is not None:
            timeout = self.world.settings.watchdog
            watchdog = Watchdog(_HardwareTimer(self, timeout), self.lease.valid, timeout)
            self._tasks.append(asyncio.create_task(watchdog.run()))

    def _stop_agent(self, state: str) -> None:
        """Hung or killed: none of its tasks runs again (a watchdog it armed keeps counting)."""
        self.agent = state
        for task in self._tasks:
            task.cancel()
        self._tasks = []

    def hang(self) -> None:
        self._stop_agent("hung")

    def kill_agent(self) -> None:
        """SIGKILL: its containers are not its children, they keep running."""
        self._stop_agent("dead")

    async def _self_fence(self, names: list[str]) -> None:
        for name in names:
            copy = self.copies.get(name)
            if copy is not None and copy.running:
                copy.running = False
                self.world.log(f"{name} self-fenced on {self.name}")

    async def _heartbeats(self) -> None:
        assert self.lease is not None
        await asyncio.sleep(self.phase)
        while True:
            sent = self.world.loop.time()
            if self.link and (controller := self.world.controller) is not None:
                reply = await controller.heartbeat(self)
                await self.lease.renewed(sent, *reply)
            await asyncio.sleep(HEARTBEAT)

    def check_watchdog(self) -> None:
        if self.powered and self.watchdog_deadline is not None and self.world.loop.time() >= self.watchdog_deadline:
            self.power_off("by its watchdog (nothing petted it)")
            self.power_on()

    # -- the fence agent (IPMI) ----------------------------------------------------------------

    async def fenced_by_controller(self) -> tuple[bool, str]:
        if self.fence_agent == "hangs":
            await asyncio.Event().wait()
        await asyncio.sleep(FENCE_TAKES)
        if self.fence_agent == "fails":
            return False, f"no answer from the power switch of {self.name}"
        self.power_off("by its fence agent")
        return True, f"{self.name} powered off"

    def report(self) -> list[tuple[str, ContainerState]]:
        return [(n, ContainerState.RUNNING if c.running else ContainerState.STOPPED) for n, c in self.copies.items()]


class _HardwareTimer:
    """The host's watchdog hardware, as agent/watchdog.py sees a device."""

    def __init__(self, host: Host, timeout: float) -> None:
        self.host, self.timeout = host, timeout

    def arm(self) -> None:
        self.pet()

    def pet(self) -> None:
        self.host.watchdog_deadline = self.host.world.loop.time() + self.timeout

    def disarm(self) -> None:
        self.host.watchdog_deadline = None


@dataclass
class FailoverOp:
    """A failover operation as the store keeps it: resumed at its step after a controller restart."""

    container: str
    source: str
    target: str
    step: str = "takeover"  # takeover -> start -> done | failed


class Controller:
    """One life of the controller: the real registry and Fencer; records and operations in the store."""

    def __init__(self, world: "World") -> None:
        self.world = world
        loop = world.loop
        self.events = EventBus()
        self.nodes = NodeRegistry(world.store, world.settings.policy, self.events, clock=loop.time, wall_clock=loop.time)
        self.nodes.subscribe(lambda node, state: world.log(f"{node} {state.value}"))
        command = ("fence-agent", "{node}") if world.settings.fence else ()
        self.fencer = Fencer(self.nodes, command, world.settings.fence_timeout, action=world.fence, clock=loop.time)
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        await self.nodes.load()
        self._tasks = [asyncio.create_task(self.nodes.watch()), asyncio.create_task(self._log_events())]
        if self.world.settings.fence:
            self._tasks.append(asyncio.create_task(self.fencer.run()))
        for op in self.world.ops:
            if op.step in ("takeover", "start"):
                self._run(op)  # an operation resumes where the last life left it

    def stop(self) -> None:
        self.events.emit("controller-stopping", "the controller stops")  # ends the watchers' streams
        for task in self._tasks:
            task.cancel()

    async def _log_events(self) -> None:
        async for event in self.events.watch():
            if event.kind == "fence-failed":
                self.world.log(event.message.replace("`fence-agent ", "`"))

    # -- what agents and clients ask -------------------------------------------------------

    async def heartbeat(self, host: Host) -> tuple[float, list[str]]:
        """A heartbeat (registering the host first if this controller life does not know it):
        its report is reconciled; the reply is its lease and its HA containers."""
        if not self.nodes.heartbeat(host.facts):
            await self.nodes.register(host.facts)
        for name, state in host.report():
            record = self.world.records.get(name)
            verdict = stale_copy(host.name, record, state) if record is not None else None
            if verdict is not None and verdict.verdict == CopyVerdict.REMOVE:
                del host.copies[name]
                self.world.log(f"stale {name} on {host.name} removed")
            elif verdict is not None:
                self.world.records[name] = replace(record, in_doubt=verdict.why, doubt_nodes=(host.name,))
                self.world.log(f"{name} in doubt: {verdict.why}")
        ha = sorted(c.name for c in self.world.records.values() if c.node == host.name and c.ha)
        return self.world.settings.policy.lease, ha

    def failover(self, name: str) -> FailoverOp:
        """Fleet.failover's rules: the guard, then the planner; an operation takes it from there."""
        record = self.world.records.get(name)
        if record is None:
            raise NotFound(f"container {name!r} does not exist")
        if any(op.container == name and op.step in ("takeover", "start") for op in self.world.ops):
            raise FailedPrecondition(f"{name!r} is busy: a failover of it is under way")
        why = failover_refusal(record, self.nodes.why_not_lost(record.node))
        if why is not None:
            raise FailedPrecondition(why)
        nodes = self.nodes.with_allocations(self.nodes.all(), self.world.allocations())
        others = [c for c in self.world.records.values() if c.node != record.node]
        choice = plan_failover([record], nodes, others, PlacementPolicy())[0]
        if choice.target is None:
            raise NoCapacity(f"{name!r} cannot fail over: {choice.reason}")
        op = FailoverOp(name, record.node, choice.target)
        self.world.ops.append(op)
        self._run(op)
        return op

    def _run(self, op: FailoverOp) -> None:
        self._tasks.append(asyncio.create_task(self._failover(op)))

    async def _failover(self, op: FailoverOp) -> None:
        if op.step == "takeover":
            await asyncio.sleep(TAKEOVER_TAKES)
            op.step = "start"
        await asyncio.sleep(START_TAKES)
        target = self.world.hosts[op.target]
        if not (target.powered and target.agent == "up" and target.link):
            op.step = "failed"
            self.world.log(f"failover of {op.container} to {op.target} failed: {op.target} cannot be reached")
            return
        self.world.start_copy(target, op.container)
        self.world.records[op.container] = replace(self.world.records[op.container], node=op.target)
        op.step = "done"
        self.world.log(f"{op.container} started on {op.target}")


class Client:
    """What corral-failoverd sees of the controller (controller/client.py's calls it makes)."""

    def __init__(self, world: "World", holder: str) -> None:
        self.world, self.holder = world, holder
        self._refused: dict[str, str] = {}

    def _controller(self) -> Controller:
        if self.world.controller is None:
            raise Unavailable("the controller does not answer")
        return self.world.controller

    async def acquire_lease(self, name: str, holder: str, ttl: float) -> Any:
        self._controller()
        now = self.world.loop.time()
        got, _ = await self.world.store.acquire_lease(name, holder, ttl, now)  # AcquireLease's rule, real
        if got == holder and self.world.lease_holder != holder:
            self.world.lease_holder = holder
            self.world.log(f"{holder} leads")
        return _LeaseReply(got == holder, got)

    async def watch_events(self, since: int, follow: bool = True) -> AsyncIterator[Any]:
        async for event in self._controller().events.watch(since, follow):
            if event.kind == "controller-stopping":
                raise Unavailable("the controller went away")
            yield event

    async def list_nodes(self) -> list:
        return self._controller().nodes.all()

    async def list_containers(self, node: str) -> list[Container]:
        self._controller()
        return [c for c in self.world.records.values() if c.node == node]

    async def failover(self, name: str) -> Any:
        try:
            op = self._controller().failover(name)
        except CorralError as exc:
            if self._refused.get(name) != exc.message:  # a sweep every 3 s: each new reason once
                self.world.log(f"{self.holder}: failover of {name} refused: {exc.message}")
            self._refused[name] = exc.message
            raise
        self._refused.pop(name, None)
        self.world.log(f"{self.holder}: failover {name} {op.source} -> {op.target}")
        return _OpReply(f"failover-{name}")


@dataclass(frozen=True)
class _LeaseReply:
    granted: bool
    holder: str


@dataclass(frozen=True)
class _OpReply:
    id: str


class HeedlessDaemon(FailoverDaemon):
    """A buggy daemon that acts whether or not it holds the lease: the controller must still refuse."""

    @property
    def leading(self) -> bool:
        return True


@dataclass(frozen=True)
class Entry:
    at: float
    text: str


class World:
    def __init__(self, loop: SimulatedLoop, settings: Settings, state_dir: Path) -> None:
        self.loop = loop
        self.settings = settings
        self.state_dir = state_dir
        self.store: Any = RealWorkStore(SqliteStore(state_dir / "state.db"), loop)
        self.hosts: dict[str, Host] = {}
        self.records: dict[str, Container] = {}  # the store's container records (they survive restarts)
        self.ops: list[FailoverOp] = []
        self.controller: Controller | None = None
        self.daemons: dict[str, asyncio.Task] = {}
        self.lease_holder = ""
        self.entries: list[Entry] = []
        self.t0: float | None = None  # the scenario's time 0; nothing is logged before it
        self._timers: list[asyncio.TimerHandle] = []

    # -- the story -----------------------------------------------------------------------------

    def now(self) -> float:
        return self.loop.time() - (self.t0 or 0.0)

    def log(self, text: str) -> None:
        if self.t0 is not None:
            self.entries.append(Entry(round(self.now(), 3), text))

    def later(self, delay: float, call: Callable[..., None], *args: Any) -> None:
        self._timers.append(self.loop.call_later(delay, call, *args))

    # -- rule 1 -----------------------------------------------------------------------------------

    def running_on(self, name: str) -> list[str]:
        return [h.name for h in self.hosts.values() if h.powered and (c := h.copies.get(name)) and c.running]

    def check_rule_1(self) -> None:
        for name in self.records:
            if len(where := self.running_on(name)) > 1:
                raise Violation(f"t={self.now():.1f}: {name} runs on {', '.join(where)} at once")

    def start_copy(self, host: Host, name: str) -> None:
        host.copies[name] = Copy(running=True)
        self.check_rule_1()

    async def _ticks(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            self.check_rule_1()
            for host in self.hosts.values():
                host.check_watchdog()

    # -- the parts -------------------------------------------------------------------------------

    async def fence(self, node: str) -> tuple[bool, str]:
        return await self.hosts[node].fenced_by_controller()

    def allocations(self) -> dict[str, tuple[Limits, int]]:
        """What each host holds, counting failovers under way on their targets (as the fleet does)."""
        out: dict[str, tuple[Limits, int]] = {}
        moving = {op.container: op.target for op in self.ops if op.step in ("takeover", "start")}
        for ct in self.records.values():
            node = moving.get(ct.name, ct.node)
            limits, count = out.get(node, (Limits(), 0))
            out[node] = (limits + ct.limits, count + 1)
        return out

    def add_host(self, name: str, memory_gb: int = 8) -> Host:
        host = self.hosts[name] = Host(self, name, memory_gb, phase=0.01 * len(self.hosts))
        return host

    def add_container(self, name: str, node: str, gb: int = 1, priority: int = 0, group: str = "", ha: bool = True,
                      storage: str = "image") -> None:  # fmt: skip
        self.records[name] = Container(name, node, "busybox", ContainerState.RUNNING, limits=Limits(memory_bytes=gb * GB),
                                       storage=storage, ha=ha, ha_priority=priority, ha_group=group)  # fmt: skip
        self.start_copy(self.hosts[node], name)

    async def start_controller(self) -> None:
        controller = Controller(self)
        await controller.start()
        self.controller = controller

    def stop_controller(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    def start_daemon(self, holder: str, heedless: bool = False) -> None:
        kind = HeedlessDaemon if heedless else FailoverDaemon
        daemon = kind(Client(self, holder), holder, ttl=self.settings.daemon_ttl, clock=self.loop.time)
        self.daemons[holder] = asyncio.create_task(daemon.run())

    def stop_daemon(self, holder: str) -> None:
        self.daemons.pop(holder).cancel()

    async def open(self) -> None:
        await self.store.open()
        await self.start_controller()
        self._ticker = asyncio.create_task(self._ticks())

    async def close(self) -> None:
        for timer in self._timers:
            timer.cancel()
        tasks = [self._ticker, *self.daemons.values(), *(t for h in self.hosts.values() for t in h._tasks)]
        if self.controller is not None:
            tasks += self.controller._tasks
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await self.store.close()
        for result in results:  # a part that crashed is a failure of the scenario, not a quiet end
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                raise result


def temporary_state_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="corral-sim-")
