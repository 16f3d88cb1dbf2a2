"""`corral ops ...` and the progress display shared with `corral ct migrate`."""

from __future__ import annotations

import asyncio
import json
import sys
import time

import click

from controller.cli import output
from controller.cli.command import group
from controller.cli.completion import complete_containers, complete_operations
from controller.cli.context import run
from corral.errors import Cancelled, CorralError

# Exit codes of a watched operation that did not succeed.
_FAILED_EXIT = {"failed": CorralError.exit_code, "cancelled": Cancelled.exit_code}


def print_operation(op) -> None:
    params = {k: json.loads(v) for k, v in op.params.items()}
    fields = [
        ("id", op.id), ("kind", op.kind), ("container", op.container), ("state", op.state),
        ("from", params.get("source", "-")), ("to", params.get("target", "-")),
        ("mode", ("live, " + params.get("strategy", "")) if params.get("live") else "cold"),
        ("phase", op.progress.phase or "-"),
    ]  # fmt: skip
    if op.error:
        fields.append(("error", op.error))
    if params.get("fell_back_to_cold"):
        fields.append(("note", f"fell back to cold: {params['fell_back_to_cold']}"))
    output.print_fields(fields)
    if op.steps:
        output.print_table(
            ["STEP", "STATE", "MS", "DETAIL"],
            [[s.name, s.state, f"{(s.finished_at - s.started_at) * 1000:.0f}" if s.finished_at else "-", s.detail[:80]]
             for s in op.steps],  # fmt: skip
        )
    print_timings(op)


def print_timings(op) -> None:
    """Per-phase timings, as `vzmigrate -t` printed them."""
    t = dict(op.timings_ms)
    if not t:
        return
    order = ["preflight_pause", "precopy", "landing", "dump", "freeze", "criu_frozen", "criu_memdump", "transfer",
             "restore", "criu_restore", "pages_done", "downtime"]  # fmt: skip
    labels = {
        "preflight_pause": "pre-flight pause", "precopy": "rootfs pre-copy", "landing": "target's page cache",
        "dump": "checkpoint call",
        "freeze": "  frozen in dump", "criu_frozen": "  CRIU frozen", "criu_memdump": "  CRIU memory dump",
        "transfer": "final transfer", "restore": "restore", "criu_restore": "  CRIU restore",
        "pages_done": "all pages moved", "downtime": "total downtime",
    }  # fmt: skip
    click.echo("timings:")
    for key in order + sorted(k for k in t if k not in order):
        if key in t and not key.endswith("_bytes"):
            click.echo(f"  {labels.get(key, key):<20} {t[key]:>9.1f} ms")


async def watch_with_progress(fleet, op_id: str, obj) -> int:
    """Follow an operation to its end; a progress bar on a terminal, phase lines otherwise;
    the final operation as the API object with -o json|yaml."""
    try:
        last = await _follow(fleet, op_id, obj.machine)
    except (asyncio.CancelledError, KeyboardInterrupt):
        # Nomad's wording: stopping the watch does not stop the operation.
        click.echo(f"operation {op_id} continues: `corral ops watch {op_id}` to follow it, "
                   f"`corral ops cancel {op_id}` to stop it", err=True)  # fmt: skip
        raise
    if obj.machine:
        output.emit(obj, last)
    else:
        print_operation(last)
    return _FAILED_EXIT.get(last.state, 0)


async def _follow(fleet, op_id: str, as_json: bool):
    """The operation at its end; progress on stderr meanwhile (none with `as_json`)."""
    last = None
    if as_json or not sys.stderr.isatty():
        phase = None
        async for op in fleet.watch_operation(op_id):
            last = op
            if not as_json and op.progress.phase != phase:
                phase = op.progress.phase
                click.echo(f"[{time.strftime('%H:%M:%S')}] {op.id}: {phase} {op.progress.message}".rstrip(), err=True)
    else:
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                                   TimeRemainingColumn, TransferSpeedColumn)  # fmt: skip

        from rich.console import Console

        from controller.cli.progress import redrawn

        with Progress(TextColumn("{task.description:<28}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      TimeRemainingColumn(), console=Console(file=sys.stderr), transient=False,
                      auto_refresh=False) as bar:  # fmt: skip
            task = bar.add_task("starting", total=None)
            async with redrawn(bar):
                async for op in fleet.watch_operation(op_id):
                    last = op
                    p = op.progress
                    bar.update(task, description=p.phase or op.state, completed=p.bytes_done,
                               total=p.bytes_total or None)  # fmt: skip
    assert last is not None
    return last


@group(examples=["corral ops ls --active", "corral ops watch OP", "corral ops cancel OP"])
def ops() -> None:
    """Long actions (migrations...): list, show, watch, cancel."""


@ops.command("ls", examples=["corral ops ls", "corral ops ls --container web1", "corral ops ls --active -o json"])
@click.option("--container", "-c", default="", show_default=False, shell_complete=complete_containers,
              help="only this container's operations  [default: all]")
@click.option("--active", is_flag=True, help="only those not finished")
@click.pass_obj
def ops_ls(obj, container, active) -> None:
    """List operations."""

    @run
    async def go():
        async with obj.client() as fleet:
            operations = await fleet.list_operations(container, active)
        if obj.machine:
            output.emit(obj, operations)
            return
        from corral.units import format_size

        output.print_table(
            ["ID", "KIND", "CONTAINER", "STATE", "PHASE", "PROGRESS", "DOWNTIME"],
            [[op.id, op.kind, op.container, op.state, op.progress.phase,
              f"{format_size(op.progress.bytes_done)}/{format_size(op.progress.bytes_total)}" if op.progress.bytes_total else "-",
              f"{op.timings_ms['downtime']:.0f} ms" if "downtime" in op.timings_ms else "-"]
             for op in operations],
            no_headers=obj.no_headers,
        )  # fmt: skip

    go()


@ops.command("show", examples=["corral ops show OP", "corral ops show OP -o json | jq .timings_ms"])
@click.argument("op_id", shell_complete=complete_operations)
@click.pass_obj
def ops_show(obj, op_id) -> None:
    """Show one operation with its steps and timings."""

    @run
    async def go():
        async with obj.client() as fleet:
            op = await fleet.get_operation(op_id)
        output.emit(obj, op) if obj.machine else print_operation(op)

    go()


@ops.command("watch", examples=["corral ops watch OP", "corral ops watch OP -o json   # only the final operation"])
@click.argument("op_id", shell_complete=complete_operations)
@click.pass_context
def ops_watch(ctx, op_id) -> None:
    """Follow an operation with a progress bar until it ends.

    Exits 0 if it succeeded, 1 if it failed, 9 if it was cancelled.
    """
    obj = ctx.obj

    @run
    async def go():
        async with obj.client() as fleet:
            return await watch_with_progress(fleet, op_id, obj)

    ctx.exit(go())


@ops.command("cancel", examples=["corral ops cancel OP"])
@click.argument("op_id", shell_complete=complete_operations)
@click.pass_obj
def ops_cancel(obj, op_id) -> None:
    """Ask an operation to stop where it is safe; it rolls back."""

    @run
    async def go():
        async with obj.client() as fleet:
            op = await fleet.cancel_operation(op_id)
        output.emit(obj, op) if obj.machine else click.echo(f"cancel requested for {op.id} ({op.progress.phase})")

    go()
