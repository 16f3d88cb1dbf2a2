"""`corral fleet ...`: the fleet as a whole: N+1 check, rebalance; and how move plans print."""

from __future__ import annotations

import sys

import click

from controller.cli import output
from controller.cli.command import group
from controller.cli.context import run


@group(examples=["corral fleet check", "corral fleet rebalance", "corral fleet rebalance --apply"])
def fleet() -> None:
    """The fleet as a whole: can it lose a host, is its load balanced."""


@fleet.command("check", examples=["corral fleet check", "corral fleet check -o json"])
@click.pass_obj
def fleet_check(obj) -> None:
    """N+1: for each node, would its HA containers fit on the others if it died now.

    Exits 0 when every node could be lost, 6 (no capacity) when one could not.
    """

    @run
    async def go():
        async with obj.client() as client:
            checks = await client.check_fleet()
        if obj.machine:
            output.emit(obj, {"nodes": [{"node": c.node, "ok": c.ok, "detail": c.detail} for c in checks]})
        else:
            output.print_table(["NODE", "N+1", "DETAIL"], [[c.node, "ok" if c.ok else "NO", c.detail] for c in checks])
        return 0 if all(c.ok for c in checks) else 6

    sys.exit(go())


@fleet.command("rebalance", examples=["corral fleet rebalance            # the plan only",
                                      "corral fleet rebalance --apply    # carry it out (an operation)"])  # fmt: skip
@click.option("--apply", is_flag=True, help="carry the moves out (live migrations, an operation)")
@click.option("--band", type=click.FloatRange(0.01, 1.0), default=0.15, show_default=True,
              help="how far above the mean a node's load may be (fraction of its capacity)")
@click.option("--detach", "-d", is_flag=True, help="with --apply: print the operation id and return at once")
@click.pass_obj
def fleet_rebalance(obj, apply, band, detach) -> None:
    """The fewest live moves that bring node loads within a band of the mean.

    A fleet within the band (plus some hysteresis) is left alone; running containers only move live.
    """

    @run
    async def go():
        async with obj.client() as client:
            reply = await client.rebalance_fleet(apply=apply, band=band)
            return await follow_moves(obj, client, reply, detach, nothing="the fleet is balanced: nothing to move")

    sys.exit(go())


async def follow_moves(obj, client, reply, detach: bool, nothing: str) -> int:
    """Print a move plan; follow its operation if one started."""
    from controller.cli.operations import watch_with_progress

    started = reply.HasField("operation")
    if obj.machine and (not started or detach):
        output.emit(obj, reply)
        return 0
    if not obj.machine:
        print_moves(reply, nothing)
    if not started:
        return 0 if not reply.stuck else 6
    if detach:
        click.echo(reply.operation.id)
        return 0
    click.echo(f"operation {reply.operation.id}: {len(reply.moves)} move(s)", err=True)
    return await watch_with_progress(client, reply.operation.id, obj)


def print_moves(reply, nothing: str) -> None:
    if not reply.moves and not reply.stuck:
        click.echo(nothing)
        return
    rows = [[m.container, m.source, m.target, "live" if m.live else "cold", m.reason] for m in reply.moves]
    rows += [[s.container, "", "", "stays", s.reason] for s in reply.stuck]
    output.print_table(["CONTAINER", "FROM", "TO", "HOW", "WHY"], rows)
