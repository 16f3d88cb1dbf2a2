"""`corral node ...`"""

from __future__ import annotations

import sys

import click

from controller.cli import output
from controller.cli.command import group
from controller.cli.completion import complete_nodes
from controller.cli.context import run


@group(examples=["corral node ls", "corral node show n1", "corral node show n1 -o yaml"])
def node() -> None:
    """Hosts of the fleet."""


@node.command("ls", examples=["corral node ls", "corral node ls -o json", "corral node ls --no-headers | awk '{print $1}'"])
@click.pass_obj
def node_ls(obj) -> None:
    """List the nodes and their state."""

    @run
    async def go():
        async with obj.client() as fleet:
            nodes = await fleet.list_nodes()
        if obj.machine:
            output.emit(obj, nodes)
        else:
            output.nodes_table(nodes, no_headers=obj.no_headers)

    go()


@node.command("show", examples=["corral node show n1", "corral node show n1 -o json"])
@click.argument("name", shell_complete=complete_nodes)
@click.pass_obj
def node_show(obj, name: str) -> None:
    """Show one node's facts, with the live-migration strategies it supports (and why not the others)."""

    @run
    async def go():
        async with obj.client() as fleet:
            n = await fleet.get_node(name)
        if obj.machine:
            output.emit(obj, n)
        else:
            print_node(n)

    go()


def print_node(n) -> None:
    from corral.units import format_size

    f = n.facts
    output.print_fields([
        ("name", f.name), ("state", n.state.value + (", cordoned" if getattr(n, "cordoned", False) else "")),
        *([("health", n.health)] if n.health else []),
        *([("labels", ", ".join(f"{k}={v}" for k, v in sorted(f.labels.items())))] if getattr(f, "labels", None) else []),
        ("address", f.address), ("cpus", f.cpus),
        ("memory", f"{format_size(f.memory_bytes)} ({format_size(f.memory_available_bytes)} available)"),
        ("allocated memory", format_size(n.allocated.memory_bytes)),
        ("disk", f"{format_size(f.disk_bytes)} ({format_size(f.disk_free_bytes)} free)"),
        ("containers", n.container_count), ("kernel", f.kernel), ("lxc", f.lxc_version),
        ("criu", f"{f.criu_version} ok" if f.criu_ok else f"unusable: {f.criu_detail}"),
        ("storage", ", ".join(f.storage_drivers)), ("agent", f.agent_version),
        ("live migration", ", ".join(f.live_strategies) or "none"),
    ] + ([("unmanaged", ", ".join(n.unmanaged_containers) + " (no record here; their addresses stay taken)")]
         if n.unmanaged_containers else []) + [(f"  no {strategy}", reason) for strategy, reason in sorted(f.live_unavailable.items())]
      + [(f"no {capability}", reason) for capability, reason in sorted(getattr(f, "unavailable", {}).items())]
      + [("history" if i == 0 else "", line) for i, line in enumerate(getattr(n, "history", ()))])  # fmt: skip


def _cordon_command(verb: str, cordoned: bool, help_text: str):
    @node.command(verb, help=help_text, examples=[f"corral node {verb} n2"])
    @click.argument("name", shell_complete=complete_nodes)
    @click.pass_obj
    def command(obj, name: str) -> None:
        @run
        async def go():
            async with obj.client() as fleet:
                n = await fleet.set_node_cordon(name, cordoned)
            if obj.machine:
                output.emit(obj, n)
            else:
                click.echo(f"node {n.name} {'cordoned: no new placements' if n.cordoned else 'takes placements again'}"
                           f" ({n.container_count} container(s) stay where they are)")  # fmt: skip

        go()

    return command


node_cordon = _cordon_command("cordon", True, "Place nothing new on a node (what runs there stays): before maintenance.")
node_uncordon = _cordon_command("uncordon", False, "Let the scheduler place containers on a node again.")


@node.command("evacuate", examples=[
    "corral node evacuate n2 --dry-run   # what would move where, live or cold, and what stays",
    "corral node evacuate n2             # cordon it, move everything live (an operation)",
    "corral node evacuate n2 --allow-cold --detach",
])  # fmt: skip
@click.argument("name", shell_complete=complete_nodes)
@click.option("--allow-cold", is_flag=True, help="move running containers cold (stopped for the move) where live cannot")
@click.option("--dry-run", is_flag=True, help="the plan only: nothing moves, the node is not cordoned")
@click.option("--detach", "-d", is_flag=True, help="print the operation id and return at once")
@click.pass_obj
def node_evacuate(obj, name, allow_cold, dry_run, detach) -> None:
    """Move every container off a node before maintenance; the node is cordoned first and stays so.

    Exits 0 when everything moved, 1 when a move failed, 6 when something had to stay.
    """
    from controller.cli.fleet import follow_moves

    @run
    async def go():
        async with obj.client() as fleet:
            reply = await fleet.evacuate_node(name, allow_cold=allow_cold, dry_run=dry_run)
            code = await follow_moves(obj, fleet, reply, detach, nothing=f"node {name} holds no containers")
            return code if code or not reply.stuck else 6

    sys.exit(go())


@node.command("fenced", examples=[
    "corral node fenced n3 --yes --how 'powered off at the PDU'",
])  # fmt: skip
@click.argument("name", shell_complete=complete_nodes)
@click.option("--how", default="", help="how it was fenced (for the event log)")
@click.option("--yes", "-y", is_flag=True, help="it is off: do not ask")
@click.pass_obj
def node_fenced(obj, name: str, how: str, yes: bool) -> None:
    """Say that a lost node is off: its HA containers may then run elsewhere.

    Only once it is really off (powered down, or cut from its storage): a host whose agent
    died may still run its containers, and a second copy on shared storage corrupts it.
    Refused for a node that heartbeats. Without --yes it asks (a terminal is needed).
    """

    @run
    async def go():
        if not yes:
            if not sys.stdin.isatty():
                raise click.UsageError("not a terminal to ask on: add --yes once the node is off")
            if not click.confirm(f"Is {name} powered off or cut from its storage?", default=False):
                raise click.Abort()
        async with obj.client() as fleet:
            n = await fleet.mark_fenced(name, how)
        output.emit(obj, n) if obj.machine else click.echo(f"{n.name} {n.state.value}: {n.health}")

    go()
