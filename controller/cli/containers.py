"""`corral ct ...`: containers, fleet-wide."""

from __future__ import annotations

import sys

import click

from controller.cli.context import run

from controller.cli import output
from controller.cli.operations import operation_dict, watch_with_progress
from corral.model import Limits
from corral.units import format_cpus, format_size, parse_cpus, parse_size


def _limits(memory, cpus, cpu_shares, pids, disk) -> Limits:
    return Limits(
        memory_bytes=parse_size(memory, "memory size") if memory is not None else 0,
        cpu_millis=parse_cpus(cpus) if cpus is not None else 0,
        cpu_shares=cpu_shares or 0,
        pids_max=pids or 0,
        disk_bytes=parse_size(disk, "disk size") if disk is not None else 0,
    )


def limit_options(fn):
    for option in reversed([
        click.option("--memory", help="memory limit, e.g. 256M, 1G"),
        click.option("--cpus", help="CPU quota, e.g. 1, 0.5, 250m"),
        click.option("--cpu-shares", type=click.IntRange(2, 262144), help="relative CPU weight"),
        click.option("--pids", type=click.IntRange(1, 4194304), help="maximum number of processes"),
        click.option("--disk", help="root filesystem size, e.g. 1G"),
    ]):  # fmt: skip
        fn = option(fn)
    return fn


def _show(obj, ct) -> None:
    if obj.json:
        output.print_json(output.container_dict(ct))
        return
    output.print_fields([
        ("name", ct.name), ("state", ct.state.value), ("node", ct.node), ("template", ct.template),
        ("ipv4", ct.network.ipv4 or "-"), ("mac", ct.network.mac or "-"), ("storage", ct.storage),
        ("init pid", ct.init_pid or "-"), ("memory", format_size(ct.limits.memory_bytes)),
        ("cpus", format_cpus(ct.limits.cpu_millis)), ("cpu shares", ct.limits.cpu_shares or "-"),
        ("pids", ct.limits.pids_max or "-"), ("disk", format_size(ct.limits.disk_bytes)),
    ] + ([("note", ct.message)] if ct.message else []))  # fmt: skip


@click.group()
def ct() -> None:
    """Containers of the fleet."""


@ct.command("create")
@click.argument("name")
@click.option("--template", "-t", required=True, help="busybox or debian")
@click.option("--node", "-n", default="", help="place on this node (default: the scheduler chooses)")
@click.option("--storage", default="", help="storage driver for the root filesystem (default: dir)")
@click.option("--start", is_flag=True, help="start it once created")
@limit_options
@click.pass_obj
def ct_create(obj, name, template, node, storage, start, memory, cpus, cpu_shares, pids, disk) -> None:
    """Create a container on a node that fits it."""

    @run
    async def go():
        limits = _limits(memory, cpus, cpu_shares, pids, disk)
        async with obj.client() as fleet:
            created = await fleet.create_container(name, template, node=node, limits=limits, storage=storage, start=start)
        if obj.json:
            output.print_json(output.container_dict(created))
        else:
            click.echo(f"created {created.name} on {created.node} ({created.network.ipv4}), {created.state.value}")
            if created.message:
                click.echo(f"note: {created.message}")

    go()


def _simple(verb: str, help_text: str):
    @ct.command(verb, help=help_text)
    @click.argument("name")
    @click.pass_obj
    def command(obj, name: str) -> None:

        @run
        async def go():
            async with obj.client() as fleet:
                if verb == "start":
                    result = await fleet.start_container(name)
                else:
                    result = await fleet.get_container(name)
            if obj.json or verb == "show":
                _show(obj, result)
            else:
                click.echo(f"{result.name} {result.state.value} on {result.node}")

        go()

    return command


_simple("start", "Start a container.")
_simple("show", "Show one container.")


@ct.command("stop")
@click.argument("name")
@click.option("--force", "-f", is_flag=True, help="kill at once instead of a clean shutdown")
@click.option("--timeout", type=click.IntRange(0, 3600), default=0, help="seconds to wait for a clean shutdown")
@click.pass_obj
def ct_stop(obj, name, force, timeout) -> None:
    """Stop a container."""

    @run
    async def go():
        async with obj.client() as fleet:
            result = await fleet.stop_container(name, force=force, timeout=timeout)
        if obj.json:
            _show(obj, result)
        else:
            click.echo(f"{result.name} {result.state.value} on {result.node}")

    go()


@ct.command("destroy")
@click.argument("name")
@click.option("--force", "-f", is_flag=True, help="stop it first if it runs")
@click.pass_obj
def ct_destroy(obj, name, force) -> None:
    """Destroy a container and its root filesystem."""

    @run
    async def go():
        async with obj.client() as fleet:
            await fleet.destroy_container(name, force=force)
        if obj.json:
            output.print_json({"name": name, "state": "destroyed"})
        else:
            click.echo(f"destroyed {name}")

    go()


@ct.command("ls")
@click.option("--node", "-n", default="", help="only the containers on this node")
@click.pass_obj
def ct_ls(obj, node) -> None:
    """List containers and where they run."""

    @run
    async def go():
        async with obj.client() as fleet:
            containers = await fleet.list_containers(node)
        if obj.json:
            output.print_json([output.container_dict(c) for c in containers])
        else:
            output.containers_table(containers)

    go()


@ct.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--env", "-e", multiple=True, help="KEY=VALUE for the command's environment")
@click.option("--timeout", type=click.IntRange(0, 86400), default=0, help="kill the command after this many seconds")
@click.option("--interactive", "-i", is_flag=True, help="pass standard input to the command")
@click.pass_obj
def ct_exec(obj, name, command, env, timeout, interactive) -> None:
    """Run a command in a running container: corral ct exec NAME -- CMD ARGS...

    Exits with the command's exit code.
    """
    from corral.errors import InvalidArgument

    @run
    async def go():
        variables = {}
        for item in env:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise InvalidArgument(f"--env {item!r}: expected KEY=VALUE")
            variables[key] = value
        stdin = sys.stdin.buffer.read() if interactive else b""
        async with obj.client() as fleet:
            result = await fleet.exec(name, list(command), env=variables, stdin=stdin, timeout=timeout)
        if obj.json:
            output.print_json({
                "name": name, "exit_code": result.exit_code,
                "stdout": result.stdout.decode(errors="replace"), "stderr": result.stderr.decode(errors="replace"),
            })  # fmt: skip
        else:
            sys.stdout.buffer.write(result.stdout)
            sys.stdout.flush()
            sys.stderr.buffer.write(result.stderr)
            sys.stderr.flush()
        return result.exit_code

    sys.exit(go())


@ct.command("set")
@click.argument("name")
@limit_options
@click.pass_obj
def ct_set(obj, name, memory, cpus, cpu_shares, pids, disk) -> None:
    """Change a container's limits (applied live if it runs)."""

    @run
    async def go():
        async with obj.client() as fleet:
            result = await fleet.set_limits(name, _limits(memory, cpus, cpu_shares, pids, disk))
        _show(obj, result)

    go()


@ct.command("migrate")
@click.argument("name")
@click.option("--to", "target", required=True, help="the node to move it to")
@click.option("--live", is_flag=True, help="keep processes, memory, PIDs and address (CRIU)")
@click.option("--postcopy", is_flag=True, help="live: resume on the target at once, pull memory on demand")
@click.option("--fallback", type=click.Choice(["cold"]), help="live: migrate cold if CRIU's pre-flight fails")
@click.option("--from-checkpoint", "from_checkpoint", metavar="OP",
              help="after post-copy OP failed: back to its source, from the checkpoint kept there")
@click.option("--detach", "-d", is_flag=True, help="print the operation id and return at once")
@click.pass_obj
def ct_migrate(obj, name, target, live, postcopy, fallback, from_checkpoint, detach) -> None:
    """Move a container to another node, cold (stop, move, start) or --live."""

    @run
    async def go():
        if postcopy and live:
            # Said before anything starts: the risk is the operator's to take.
            click.echo(POSTCOPY_WARNING.format(name=name, target=target), err=True)
        async with obj.client() as fleet:
            op = await fleet.migrate(name, target, live=live or bool(from_checkpoint), postcopy=postcopy,
                                     fallback_cold=fallback == "cold", from_checkpoint=from_checkpoint or "")  # fmt: skip
            if detach:
                output.print_json(operation_dict(op)) if obj.json else click.echo(op.id)
                return 0
            if not obj.json:
                mode = "from its kept checkpoint" if from_checkpoint else "live" if live else "cold"
                click.echo(f"operation {op.id}: migrating {name} to {target} ({mode})", err=True)
            return await watch_with_progress(fleet, op.id, obj.json)

    sys.exit(go())


POSTCOPY_WARNING = (
    "warning: post-copy: {name} resumes on {target} at once and pulls its memory from its current node until "
    "every page has arrived. Until then, if the current node fails the container is lost (its disk on {target} "
    "stays); if {target} fails it can only be restarted from the state kept at the switch, losing what it did "
    "on {target} since."
)
