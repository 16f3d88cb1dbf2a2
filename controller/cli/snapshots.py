"""`corral ct snapshot ...`: a container's snapshots, kept on its node (agent/snapshots.py).

A snapshot holds the container's disk, and with --stateful its running processes too.
Restoring one needs the container stopped; a stateful one comes back running.
"""

from __future__ import annotations

import time

import click

from controller.cli import output
from controller.cli.completion import complete_containers
from controller.cli.containers import ct
from controller.cli.context import run


@ct.group("snapshot", examples=["corral ct snapshot create web1 before-upgrade",
                                "corral ct snapshot ls web1", "corral ct snapshot restore web1 before-upgrade"])
def snapshot() -> None:
    """Snapshots of a container's disk (and processes, with --stateful), kept on its node.

    They stay on that node: a container with snapshots is not migrated (remove them
    first), and destroying the container removes them.
    """


@snapshot.command("create", examples=["corral ct snapshot create web1 before-upgrade",
                                      "corral ct snapshot create web1 warm --stateful   # its processes too"])
@click.argument("name", shell_complete=complete_containers)
@click.argument("snapshot_name", metavar="SNAPSHOT")
@click.option("--stateful", is_flag=True,
              help="save its running processes too (it pauses for the dump and the disk copy, then runs on)")
@click.pass_obj
def snapshot_create(obj, name, snapshot_name, stateful) -> None:
    """Take a snapshot of a container."""

    @run
    async def go():
        async with obj.client() as fleet:
            snap = await fleet.create_snapshot(name, snapshot_name, stateful=stateful)
        if obj.machine:
            output.emit(obj, snap)
        else:
            from corral.units import format_size

            kind = "stateful snapshot" if snap.stateful else "snapshot"
            click.echo(f"{kind} {snap.name} of {name} taken ({format_size(snap.size_bytes)})")

    go()


@snapshot.command("ls", examples=["corral ct snapshot ls web1", "corral ct snapshot ls web1 -o json"])
@click.argument("name", shell_complete=complete_containers)
@click.pass_obj
def snapshot_ls(obj, name) -> None:
    """List a container's snapshots, oldest first."""

    @run
    async def go():
        async with obj.client() as fleet:
            snaps = await fleet.list_snapshots(name)
        if obj.machine:
            output.emit(obj, snaps)
            return
        from corral.units import format_size

        output.print_table(
            ["NAME", "CREATED", "STATEFUL", "SIZE"],
            [[s.name, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.created_at)),
              "yes" if s.stateful else "no", format_size(s.size_bytes)] for s in snaps],
            no_headers=obj.no_headers,
        )  # fmt: skip

    go()


@snapshot.command("restore", examples=["corral ct stop web1 && corral ct snapshot restore web1 before-upgrade"])
@click.argument("name", shell_complete=complete_containers)
@click.argument("snapshot_name", metavar="SNAPSHOT")
@click.pass_obj
def snapshot_restore(obj, name, snapshot_name) -> None:
    """Put a stopped container back as the snapshot was (a stateful one runs again)."""

    @run
    async def go():
        async with obj.client() as fleet:
            result = await fleet.restore_snapshot(name, snapshot_name)
        if obj.machine:
            output.emit(obj, result)
        else:
            click.echo(f"{result.name} restored from {snapshot_name}: {result.state.value} on {result.node}")

    go()


@snapshot.command("rm", examples=["corral ct snapshot rm web1 before-upgrade"])
@click.argument("name", shell_complete=complete_containers)
@click.argument("snapshot_name", metavar="SNAPSHOT")
@click.pass_obj
def snapshot_rm(obj, name, snapshot_name) -> None:
    """Remove a snapshot."""

    @run
    async def go():
        async with obj.client() as fleet:
            await fleet.delete_snapshot(name, snapshot_name)
        if obj.machine:
            output.emit(obj, {"name": snapshot_name, "container": name, "state": "removed"})
        else:
            click.echo(f"removed snapshot {snapshot_name} of {name}")

    go()
