"""`corral events`: what happens in the fleet, as it happens."""

from __future__ import annotations

import click

from controller.cli import output
from controller.cli.command import command
from controller.cli.context import run


@command("events", examples=[
    "corral events                      # the kept events, then new ones until ^C",
    "corral events --no-follow          # only what happened so far",
    "corral events --since 120 -o json  # one JSON object per line, after event 120",
])  # fmt: skip
@click.option("--since", type=click.IntRange(0), default=0, help="only events numbered after this one (0: all kept)")
@click.option("--follow/--no-follow", default=True, help="keep watching for new events")
@click.pass_obj
def events(obj, since, follow) -> None:
    """Node health changes, operations starting and ending, containers in doubt and settled.

    Events are numbered from the controller's start; after a reconnect, resume with
    --since LAST. With -o json each event is one line (NDJSON).
    """

    @run
    async def go():
        async with obj.client() as fleet:
            async for event in fleet.watch_events(since, follow):
                if obj.machine:
                    output.emit_line(obj, event)
                else:
                    click.echo(output.event_line(event))

    go()
