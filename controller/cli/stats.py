"""`corral ct stats NAME` and `corral top`: what containers use and how often they hit their limits,
as OpenVZ's beancounters showed (usage, limit, fail counts), from their hosts' cgroup counters."""

from __future__ import annotations

import asyncio
import sys

import click

from controller.cli import output
from controller.cli.command import command
from controller.cli.completion import complete_containers, complete_nodes
from controller.cli.containers import ct
from controller.cli.context import run

_INTERVAL = click.FloatRange(0, 3600)


def _machine(stats, earlier=None) -> dict:
    """A ContainerStats as the API object, with `cpu_rate` (CPUs used on average since
    `earlier`, null without one)."""
    from corral.api.convert import stats_to_pb

    rate = stats.cpu_rate(earlier) if earlier is not None else None
    return {**output.api_dict(stats_to_pb(stats)), "cpu_rate": round(rate, 4) if rate is not None else None}


def _limit(value: int) -> str:
    return str(value) if value else "-"


def _percent(rate: float | None) -> str:
    return f"{rate * 100:.1f}%" if rate is not None else "-"


@ct.command("stats", examples=["corral ct stats web1", "corral ct stats web1 --interval 0   # counters only, at once",
                               "corral ct stats web1 -o json | jq .memory_oom_kill_events"])  # fmt: skip
@click.argument("name", shell_complete=complete_containers)
@click.option("--interval", type=_INTERVAL, default=1.0, show_default=True,
              help="seconds between the two samples the CPU rate is taken over (0: one sample, no rate)")
@click.pass_obj
def ct_stats(obj, name, interval) -> None:
    """What a container uses and how often it hit its limits.

    CPU (time used, its rate, periods held back by the CPU quota), memory and its limit, processes
    and their limit, disk; for each limit the times it was hit: memory at its limit (`max`, on
    cgroup v1 the fail count), OOM kills, forks refused at the pids limit. Counters run from the
    container's start.
    """
    from corral.units import format_cpus, format_size

    @run
    async def go():
        async with obj.client() as client:
            earlier = None
            if interval:
                earlier = (await client.container_stats(name))[0][0]
                await asyncio.sleep(interval)
            s = (await client.container_stats(name))[0][0]
        if obj.machine:
            output.emit(obj, _machine(s, earlier))
            return
        rate = s.cpu_rate(earlier) if earlier is not None else None
        output.print_fields([
            ("name", s.name), ("node", s.node), ("state", s.state.value),
            ("cpu", f"{_percent(rate)} of one CPU, {s.cpu_usage_usec / 1e6:.2f}s in all, limit "
                    f"{format_cpus(s.cpu_limit_millis) if s.cpu_limit_millis else '-'}"),
            ("throttled", f"{s.cpu_throttled_count} periods, {s.cpu_throttled_usec / 1e6:.2f}s"),
            ("memory", f"{format_size(s.memory_bytes)} of {format_size(s.memory_limit_bytes)}"),
            ("memory hits", f"max {s.memory_max_events}, high {s.memory_high_events}, oom {s.memory_oom_events}, "
                            f"oom_kill {s.memory_oom_kill_events}"),
            ("pids", f"{s.pids} of {_limit(s.pids_limit)}, limit hit {s.pids_max_events}"),
            ("disk", f"{format_size(s.disk_used_bytes)} of {format_size(s.disk_limit_bytes)}"),
            *([("note", s.message)] if s.message else []),
        ])  # fmt: skip

    go()


TOP_HEADERS = ["NAME", "NODE", "STATE", "CPU", "CPU-TIME", "THROTTLED", "MEMORY", "MEM-LIMIT", "MEM-MAX-HIT",
               "OOM-KILLS", "PIDS", "PIDS-MAX", "PIDS-MAX-HIT", "DISK"]  # fmt: skip


def top_rows(samples, earlier: dict) -> list[list]:
    """The table of `corral top`: one row a container, CPU rates against `earlier` (name -> stats)."""
    from corral.units import format_size

    rows = []
    for s in samples:
        before = earlier.get(s.name)
        rate = s.cpu_rate(before) if before is not None and before.node == s.node else None
        rows.append([s.name, s.node, s.state.value, _percent(rate), f"{s.cpu_usage_usec / 1e6:.1f}s",
                     s.cpu_throttled_count, format_size(s.memory_bytes), format_size(s.memory_limit_bytes),
                     s.memory_max_events, s.memory_oom_kill_events, s.pids, _limit(s.pids_limit),
                     s.pids_max_events, format_size(s.disk_used_bytes)])  # fmt: skip
    return rows


@command("top", examples=["corral top", "corral top --once", "corral top --node n2 --interval 5",
                          "corral top --once -o json | jq '.stats[] | {name, memory_bytes}'"])  # fmt: skip
@click.option("--node", "-n", default="", show_default=False, shell_complete=complete_nodes,
              help="only the containers of this node  [default: all]")
@click.option("--interval", type=click.FloatRange(0.2, 3600), default=2.0, show_default=True,
              help="seconds between refreshes (CPU rates are taken over it)")
@click.option("--once", is_flag=True, help="print one table (after one interval, for the CPU rates) and exit")
@click.pass_obj
def top(obj, node, interval, once) -> None:
    """What every container of the fleet uses, refreshed like top (Ctrl-C ends it).

    One row a container: CPU (rate, time, throttled periods), memory and its limit, how often it
    hit it and OOM kills, processes and their limit, forks refused at it, disk. Nodes that did not
    answer are named below the table. With -o json: one document a refresh (one line each).
    """

    @run
    async def go():
        async with obj.client() as client:
            earlier: dict = {}
            shown = False
            while True:
                samples, unanswered = await client.container_stats(node=node)
                if not (once and samples and not earlier):  # --once: a first sample only for the rates
                    _show_top(obj, samples, unanswered, earlier, once=once, clear=shown)
                    shown = True
                    if once:
                        return
                earlier = {s.name: s for s in samples}
                await asyncio.sleep(interval)

    go()


def _show_top(obj, samples, unanswered: dict, earlier: dict, *, once: bool, clear: bool) -> None:
    if obj.machine:
        doc = {"stats": [_machine(s, earlier.get(s.name)) for s in samples], "unanswered": unanswered}
        (output.emit if once else output.emit_line)(obj, doc)
        return
    if clear and sys.stdout.isatty():
        click.clear()
    output.print_table(TOP_HEADERS, top_rows(samples, earlier), no_headers=obj.no_headers)
    for node_name, why in sorted(unanswered.items()):
        click.echo(f"node {node_name} did not answer: {why}", err=True)
