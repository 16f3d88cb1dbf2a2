"""A scenario: hosts and containers, a timed script of faults, and the story that must follow.

    Scenario("power cut", hosts="n1 n2 n3", containers="db@n1",
             script='''
                 at 2: power_off n1
             ''',
             expect='''
                 n1 powered off by the script
                 n1 suspect
                 n1 dead
                 n1 fenced                      by 9.5
                 d1: failover db n1 -> n2
                 db started on n2               by 11
             ''')

The expected lines must be the whole log of the run (after setup), in order.
A line may hold `*` wildcards, and end with `by T` (it happened at or before
T seconds) or `after T`. `run` returns the log; it raises Violation the moment
rule 1 breaks, and AssertionError with the whole log when the story differs.

Script commands (times in seconds from the scenario's start):
  power_off N | power_on N | partition N | heal N | hang N (the agent hangs) |
  kill_agent N (it dies, its containers keep running) | start_agent N |
  fence N works|fails|hangs | restart|stop|start controller | operator failover CT |
  operator fenced N | start_daemon D [heedless] | stop_daemon D |
  flap N down S up S times K
"""

from __future__ import annotations

import asyncio
import fnmatch
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from corral.errors import CorralError

from sim.clock import SimulatedLoop, run_simulated
from sim.world import RESTART_DOWN, Settings, World, temporary_state_dir

# Seconds for every host to register and hold its lease, and a daemon to lead. The half second
# puts the heartbeats between the script's whole seconds: a fault at t=2 follows the beat at 1.5.
SETUP = 2.5


@dataclass(frozen=True)
class Step:
    at: float
    command: tuple[str, ...]


@dataclass
class Scenario:
    title: str
    script: str = ""
    expect: str = ""
    hosts: str = "n1 n2 n3"  # names, each `name:GB` for its memory (default 8)
    containers: str = ""  # `name@node[:GB][,pPRIORITY][,gGROUP][,local][,noha][,doubt]`, space separated
    daemons: str = "d1"
    running: str = ""  # at the end: `ct@node` (runs there, and only there) or `ct@-` (runs nowhere)
    settings: Settings = field(default_factory=Settings)
    end: float | None = None  # default: the last step + 30 s

    def steps(self) -> list[Step]:
        steps = []
        for line in filter(None, (line.strip() for line in self.script.splitlines())):
            match = re.fullmatch(r"at\s+([\d.]+)\s*:\s*(.+)", line)
            if match is None:
                raise ValueError(f"{self.title}: not a step: {line!r} (at T: command ...)")
            words = tuple(match.group(2).split())
            if words[0] == "flap":  # flap N down S up S times K: a link that goes down and up again
                node, down, up, times = words[1], float(words[3]), float(words[5]), int(words[7])
                at = float(match.group(1))
                for _ in range(times):
                    steps += [Step(at, ("partition", node)), Step(at + down, ("heal", node))]
                    at += down + up
                continue
            steps.append(Step(float(match.group(1)), words))
        return sorted(steps, key=lambda s: s.at)

    def run(self) -> list[str]:
        with temporary_state_dir() as state_dir:
            return run_simulated(lambda loop: self._play(loop, state_dir))

    async def _play(self, loop: SimulatedLoop, state_dir: str) -> list[str]:
        world = World(loop, self.settings, Path(state_dir))
        await world.open()
        try:
            self._set_up(world)
            await _sleep_until(loop, SETUP)
            world.t0 = loop.time()
            steps = self.steps()
            end = self.end if self.end is not None else (steps[-1].at if steps else 0.0) + 30.0
            for step in steps:
                await _sleep_until(loop, world.t0 + step.at)
                await _do(world, step.command)
            await _sleep_until(loop, world.t0 + end)
            world.check_rule_1()
            running = {name: world.running_on(name) for name in world.records}
        finally:
            await world.close()
        log = [f"{e.at:7.2f}  {e.text}" for e in world.entries]
        _check(self, world, log)
        for spec in self.running.split():
            name, _, node = spec.partition("@")
            assert running[name] == ([] if node == "-" else [node]), \
                f"{self.title}: {name} runs on {running[name] or 'no host'}, expected {node}\n" + "\n".join(log)
        return log

    def _set_up(self, world: World) -> None:
        for spec in self.hosts.split():
            name, _, gb = spec.partition(":")
            world.add_host(name, int(gb or 8))
        for spec in self.containers.split():
            name, _, rest = spec.partition("@")
            node, *options = rest.split(",")
            node, _, gb = node.partition(":")
            opts = {o[0]: o[1:] for o in options if o[0] in "pg"}
            world.add_container(name, node, int(gb or 1), priority=int(opts.get("p", 0)), group=opts.get("g", ""),
                                ha="noha" not in options, storage="dir" if "local" in options else "image")  # fmt: skip
            if "doubt" in options:
                world.records[name] = replace(world.records[name], in_doubt="the operator's test: not settled",
                                              doubt_nodes=(node,))  # fmt: skip
        for host in world.hosts.values():
            host.powered = True
            host.start_agent()
        for holder in self.daemons.split():
            world.start_daemon(holder)


async def _sleep_until(loop: SimulatedLoop, when: float) -> None:
    await asyncio.sleep(max(0.0, when - loop.time()))


async def _do(world: World, command: tuple[str, ...]) -> None:
    verb, args = command[0], command[1:]
    host = world.hosts.get(args[0]) if args else None
    if verb == "power_off":
        host.power_off("by the script")
    elif verb == "power_on":
        host.power_on()
    elif verb == "partition":
        host.link = False
    elif verb == "heal":
        host.link = True
    elif verb == "hang":
        host.hang()
        world.log(f"{host.name}'s agent hangs")
    elif verb == "kill_agent":
        host.kill_agent()
        world.log(f"{host.name}'s agent died; its containers keep running")
    elif verb == "start_agent":
        host.start_agent()
    elif verb == "fence":
        host.fence_agent = args[1]
    elif verb == "restart" and args == ("controller",):
        await _do(world, ("stop", "controller"))
        await asyncio.sleep(RESTART_DOWN)
        await _do(world, ("start", "controller"))
    elif verb == "stop" and args == ("controller",):
        world.stop_controller()
        world.log("controller stopped")
    elif verb == "start" and args == ("controller",):
        await world.start_controller()
        world.log("controller started")
    elif verb == "operator" and args[0] == "failover":
        controller = world.controller
        try:
            op = controller.failover(args[1])
            world.log(f"operator: failover {args[1]} {op.source} -> {op.target}")
        except CorralError as exc:
            world.log(f"operator: failover of {args[1]} refused: {exc.message}")
    elif verb == "operator" and args[0] == "fenced":
        try:
            world.controller.nodes.mark_fenced(args[1], "the operator says it is off")
        except CorralError as exc:
            world.log(f"operator: fenced {args[1]} refused: {exc.message}")
    elif verb == "start_daemon":
        world.start_daemon(args[0], heedless=args[1:] == ("heedless",))
    elif verb == "stop_daemon":
        world.stop_daemon(args[0])
    else:
        raise ValueError(f"unknown command: {' '.join(command)}")


def _check(scenario: Scenario, world: World, log: list[str]) -> None:
    expected = [line.strip() for line in scenario.expect.splitlines() if line.strip()]
    got = world.entries
    problems = []
    for i in range(max(len(expected), len(got))):
        want = expected[i] if i < len(expected) else None
        entry = got[i] if i < len(got) else None
        if want is None or entry is None:
            problems.append(f"line {i + 1}: expected {want!r}, got {entry.text if entry else None!r}")
            break
        pattern, by, after = want, None, None
        if (m := re.fullmatch(r"(.*?)\s+(by|after)\s+([\d.]+)", want)) is not None:
            pattern = m.group(1)
            by, after = (float(m.group(3)), None) if m.group(2) == "by" else (None, float(m.group(3)))
        if not fnmatch.fnmatchcase(entry.text, pattern):
            problems.append(f"line {i + 1}: expected {pattern!r}, got {entry.text!r}")
            break
        if by is not None and entry.at > by + 1e-9:
            problems.append(f"line {i + 1}: {entry.text!r} at {entry.at:.2f}, expected by {by:g}")
        if after is not None and entry.at < after - 1e-9:
            problems.append(f"line {i + 1}: {entry.text!r} at {entry.at:.2f}, expected after {after:g}")
    if problems:
        raise AssertionError(f"{scenario.title}:\n  " + "\n  ".join(problems) + "\nthe whole story:\n" + "\n".join(log))
