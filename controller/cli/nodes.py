"""`corral node ...`"""

from __future__ import annotations

import click

from controller.cli.context import run

from controller.cli import output
from corral.units import format_size


@click.group()
def node() -> None:
    """Hosts of the fleet."""


@node.command("ls")
@click.pass_obj
def node_ls(obj) -> None:
    """List the nodes and their state."""

    @run
    async def go():
        async with obj.client() as fleet:
            nodes = await fleet.list_nodes()
        if obj.json:
            output.print_json([output.node_dict(n) for n in nodes])
        else:
            output.nodes_table(nodes)

    go()


@node.command("show")
@click.argument("name")
@click.pass_obj
def node_show(obj, name: str) -> None:
    """Show one node's facts."""

    @run
    async def go():
        async with obj.client() as fleet:
            n = await fleet.get_node(name)
        if obj.json:
            output.print_json(output.node_dict(n))
            return
        f = n.facts
        output.print_fields([
            ("name", f.name), ("state", n.state.value), ("address", f.address), ("cpus", f.cpus),
            ("memory", f"{format_size(f.memory_bytes)} ({format_size(f.memory_available_bytes)} available)"),
            ("allocated memory", format_size(n.allocated.memory_bytes)),
            ("disk", f"{format_size(f.disk_bytes)} ({format_size(f.disk_free_bytes)} free)"),
            ("containers", n.container_count), ("kernel", f.kernel), ("lxc", f.lxc_version),
            ("criu", f"{f.criu_version} ok" if f.criu_ok else f"unusable: {f.criu_detail}"),
            ("storage", ", ".join(f.storage_drivers)), ("agent", f.agent_version),
        ])  # fmt: skip

    go()
