"""Benchmark: failover time, from a fault injected on the host of an HA container to that
container running on another host, with the default settings and corral-failoverd running.

Two faults, --trials each (default 20), alternating:
- partition: the host's link to the lab bridge down (`corral lab partition`): its agent
  loses its lease and kills the container itself; the controller counts it suspect, then
  dead, runs the lab's fence command (the host powered off), and failoverd asks for the
  failover;
- power: a power cut (`corral lab kill`: every process of the host SIGKILLed): nothing
  there can self-fence; dead, fenced by the lab's fence command, failed over.

Each trial is measured from the fault to the controller showing the container running on
another node (`ct show`, polled every 0.1 s), and also to LXC on that node running it (the
sampler). Phases come from the controller's events (wall clock): detection (suspect, then
dead), fenced, failover operation started, failover operation done. A sampler asks every
lab host, several times a second and all along the run, which hosts run the container:
the number of samples with two copies must be 0 (rule 1).

Between trials the host is brought back (healed and powered on, waiting until it is ready),
its stale stopped copy is cleaned up by the controller, and things settle for --settle s.

    python bench/failover.py                      # 20 trials of each fault in lab "bfo"
    python bench/failover.py --trials 3 --json    # quick; JSON on stdout after the table
    python bench/failover.py --lab bfo --keep     # leave the lab up afterwards
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import lab as corral_lab  # noqa: E402  (after the path is set)
from controller.cli.settings import CliSettings  # noqa: E402
from controller.client import ControllerClient  # noqa: E402
from corral.model import ContainerState  # noqa: E402
from lab.copies import CopySampler, failover_daemon  # noqa: E402

CONTAINER = "bench-ha"
FAULTS = ("partition", "power")
TARGET_P50_S = 8.0
TARGET_MAX_S = 15.0
TRIAL_TIMEOUT_S = 60.0
PHASES = ("suspect", "dead", "fenced", "op_started", "op_done", "running", "running_lxc")


@dataclass
class Trial:
    fault: str
    victim: str
    target: str = ""
    # Seconds after the fault; None where not seen.
    suspect: float | None = None
    dead: float | None = None
    fenced: float | None = None
    op_started: float | None = None
    op_done: float | None = None
    running: float | None = None  # the controller shows it running on another node
    running_lxc: float | None = None  # LXC runs it on another host (the sampler)
    error: str = ""


@dataclass
class Run:
    trials: list[Trial] = field(default_factory=list)
    samples: int = 0
    double_samples: int = 0


async def _events_after(client: ControllerClient, since: int) -> list:
    return [e async for e in client.watch_events(since, follow=False)]


async def _last_seq(client: ControllerClient) -> int:
    return max([e.seq for e in await _events_after(client, 0)] or [0])


async def _events_until_done(client: ControllerClient, since: int, wait: float = 2.0) -> list:
    """The events after `since`, once the failover's end is among them (the container can be
    seen running a moment before the operation's last event), or after `wait` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        events = await _events_after(client, since)
        done = any(e.kind == "operation" and e.container == CONTAINER and e.message.startswith("failover of")
                   and " succeeded" in e.message for e in events)  # fmt: skip
        if done or loop.time() >= deadline:
            return events
        await asyncio.sleep(0.1)


async def _inject(fault: str, lab: str, node: str) -> None:
    if fault == "partition":
        await corral_lab.partition(lab, node)
    else:
        await corral_lab.power_off(lab, node)


async def _bring_back(fault: str, lab: str, node: str) -> None:
    if fault == "partition":
        await corral_lab.heal(lab, node)
    # Fenced by the lab (powered off) in either case; if not, power it off first: a trial
    # that timed out leaves nothing running behind.
    if (await corral_lab.lab_status(lab)).host(node).agent_running:
        await corral_lab.stop_agent(lab, node)
    await corral_lab.power_on(lab, node, wait_ready=True)


async def _trial(client: ControllerClient, lab, fault: str, sampler: CopySampler) -> Trial:
    victim = (await client.get_container(CONTAINER)).node
    trial = Trial(fault, victim)
    since = await _last_seq(client)
    t0 = time.time()
    await _inject(fault, lab.name, victim)
    try:
        async with asyncio.timeout(TRIAL_TIMEOUT_S):
            while True:
                ct = await client.get_container(CONTAINER)
                if ct.node != victim and ct.state == ContainerState.RUNNING:
                    trial.running, trial.target = time.time() - t0, ct.node
                    break
                await asyncio.sleep(0.1)
    except TimeoutError:
        trial.error = f"not running elsewhere after {TRIAL_TIMEOUT_S:g} s"
    for e in await _events_until_done(client, since):
        at = e.at - t0
        if e.kind == "node-state" and e.node == victim:
            state = e.fields.get("state")
            if state in ("suspect", "dead", "fenced") and getattr(trial, state) is None:
                setattr(trial, state, at)
        elif e.kind == "operation" and e.container == CONTAINER and e.message.startswith("failover of"):
            if e.message.endswith("started"):
                trial.op_started = trial.op_started or at
            elif " succeeded" in e.message:
                trial.op_done = trial.op_done or at
    trial.running_lxc = await _first_seen_elsewhere(sampler, victim, t0)
    return trial


async def _first_seen_elsewhere(sampler: CopySampler, victim: str, t0: float, wait: float = 2.0) -> float | None:
    """Seconds from t0 to the first sample with the container running off `victim` (the
    sampler may not have asked since the controller saw it: wait for it a little)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        first = [s.at for s in sampler.samples if s.at >= t0 and any(h != victim for h in s.hosts[CONTAINER])]
        if first or loop.time() >= deadline:
            return (first[0] - t0) if first else None
        await asyncio.sleep(0.1)


async def _stale_copy_gone(lab, node: str, timeout: float = 30.0) -> None:
    path = lab.host(node).lxc_path / CONTAINER
    async with asyncio.timeout(timeout):
        while path.exists():
            await asyncio.sleep(0.2)


async def bench(args) -> Run:
    if not args.reuse:
        await corral_lab.lab_down(args.lab)
        await corral_lab.lab_up(name=args.lab, nodes=3)
    lab = await corral_lab.lab_status(args.lab)
    settings = CliSettings.load(lab.cli_config)
    run = Run()
    try:
        async with ControllerClient(settings.controller, settings.tls, timeout=120) as client:
            await client.create_container(CONTAINER, "busybox", node="n3", storage="image", start=True, ha=True)
            await asyncio.sleep(2)  # heartbeats tell the host it is HA
            log_file = lab.base_dir / "failoverd.log" if args.keep else None
            async with failover_daemon(lab, log_file=log_file), CopySampler(lab, [CONTAINER], 0.1) as sampler:
                for i in range(args.trials * len(FAULTS)):
                    fault = FAULTS[i % len(FAULTS)]
                    trial = await _trial(client, lab, fault, sampler)
                    run.trials.append(trial)
                    print(_trial_line(len(run.trials), trial), file=sys.stderr, flush=True)
                    await _bring_back(fault, lab.name, trial.victim)
                    await _stale_copy_gone(lab, trial.victim)
                    await asyncio.sleep(args.settle)
            run.samples, run.double_samples = len(sampler.samples), len(sampler.doubles())
            await client.destroy_container(CONTAINER, force=True)
    finally:
        if not args.keep:
            await corral_lab.lab_down(args.lab)
    return run


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _trial_line(n: int, t: Trial) -> str:
    phases = " ".join(f"{p}={_fmt(getattr(t, p))}" for p in PHASES)
    return f"trial {n:3d} {t.fault:9s} {t.victim}->{t.target or '?'} {phases} {t.error}"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summarize(run: Run) -> dict:
    out: dict = {"samples": run.samples, "double_running_samples": run.double_samples, "faults": {}}
    for fault in FAULTS:
        trials = [t for t in run.trials if t.fault == fault]
        done = [t for t in trials if t.running is not None]
        row: dict = {"trials": len(trials), "failed": len(trials) - len(done)}
        for phase in PHASES:
            values = [getattr(t, phase) for t in done if getattr(t, phase) is not None]
            if values:
                row[phase] = {"p50": statistics.median(values), "p90": _percentile(values, 0.9), "max": max(values)}
        out["faults"][fault] = row
    return out


def print_table(summary: dict) -> None:
    print(f"{'fault':10s} {'phase (s after the fault)':28s} {'p50':>7s} {'p90':>7s} {'max':>7s}")
    labels = {"suspect": "detected (suspect)", "dead": "dead (lease + margin)", "fenced": "fenced",
              "op_started": "failover op started", "op_done": "failover op done",
              "running": "running elsewhere (ctl)", "running_lxc": "running elsewhere (LXC)"}  # fmt: skip
    for fault, row in summary["faults"].items():
        for phase in PHASES:
            if phase in row:
                s = row[phase]
                print(f"{fault:10s} {labels[phase]:28s} {s['p50']:7.2f} {s['p90']:7.2f} {s['max']:7.2f}")
        ok = "running" in row and row["running"]["p50"] <= TARGET_P50_S and row["running"]["max"] <= TARGET_MAX_S
        print(f"{fault:10s} {'trials ' + str(row['trials']) + ', failed ' + str(row['failed']):28s} "
              f"target p50 <= {TARGET_P50_S:g} s, max <= {TARGET_MAX_S:g} s: {'met' if ok and not row['failed'] else 'MISSED'}")
    print(f"double-running samples: {summary['double_running_samples']} of {summary['samples']} (must be 0)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="trials of each fault (default 20)")
    parser.add_argument("--lab", default="bfo", help="lab name (default bfo; not one a test run uses)")
    parser.add_argument("--keep", action="store_true", help="leave the lab up afterwards (failoverd's log in it)")
    parser.add_argument("--reuse", action="store_true", help="use the lab --lab, already up, as it is")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds between trials (default 3)")
    parser.add_argument("--json", action="store_true", help="also print the summary and every trial as JSON")
    args = parser.parse_args()
    if args.trials < 1:
        parser.error("--trials must be at least 1")
    run = asyncio.run(bench(args))
    summary = summarize(run)
    print_table(summary)
    if args.json:
        print(json.dumps({**summary, "trials": [asdict(t) for t in run.trials]}, indent=1))
    failed = any(r["failed"] for r in summary["faults"].values())
    return 1 if summary["double_running_samples"] or failed else 0


if __name__ == "__main__":
    sys.exit(main())
