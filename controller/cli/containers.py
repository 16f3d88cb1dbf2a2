"""`corral ct ...`: containers, fleet-wide."""

from __future__ import annotations

import json
import sys

import click

from controller.cli import output
from controller.cli.command import PassThroughCommand, group
from controller.cli.completion import complete_containers, complete_nodes, complete_operations
from controller.cli.context import run
from controller.vocabulary import DEFAULT_STORAGE, STORAGE_NAMES, TEMPLATES


def _limits(memory, cpus, cpu_shares, pids, disk):
    from corral.model import Limits
    from corral.units import parse_cpus, parse_size

    return Limits(
        memory_bytes=parse_size(memory, "memory size") if memory is not None else 0,
        cpu_millis=parse_cpus(cpus) if cpus is not None else 0,
        cpu_shares=cpu_shares or 0,
        pids_max=pids or 0,
        disk_bytes=parse_size(disk, "disk size") if disk is not None else 0,
    )


def ha_options(fn):
    for option in reversed([
        click.option("--ha/--no-ha", default=None, help="highly available: its host kills it when it loses its "
                     "lease, so that it can run elsewhere (needs --storage shared)  [default: no]"),
        click.option("--ha-priority", type=click.IntRange(0, 1000), help="failover order, higher first  [default: 0]"),
        click.option("--ha-group", help="containers of one group are kept on different nodes  [default: none]"),
    ]):  # fmt: skip
        fn = option(fn)
    return fn


def limit_options(fn):
    for option in reversed([
        click.option("--memory", help="memory limit, e.g. 256M, 1G  [default: no limit]"),
        click.option("--cpus", help="CPU quota, e.g. 1, 0.5, 250m  [default: no limit]"),
        click.option("--cpu-shares", type=click.IntRange(2, 262144), help="relative CPU weight  [default: the runtime's]"),
        click.option("--pids", type=click.IntRange(1, 4194304), help="maximum number of processes  [default: no limit]"),
        click.option("--disk", help="root filesystem size, e.g. 1G  [default: no limit]"),
    ]):  # fmt: skip
        fn = option(fn)
    return fn


def _show(obj, ct) -> None:
    import time

    from corral.units import format_cpus, format_size

    if obj.machine:
        output.emit(obj, ct)
        return
    observed = ct.state.value + (" (stateful)" if ct.stateful_stopped else "")
    if ct.observed_at:
        observed += f" (reported {max(0.0, time.time() - ct.observed_at):.0f}s ago)"
    wanted = [] if ct.desired_state.value == ct.state.value else [("desired", ct.desired_state.value)]
    doubt = [("in doubt", ct.in_doubt), ("may run on", ", ".join(ct.doubt_nodes) or ct.node)] if ct.in_doubt else []
    failed = [("failed", ct.ha_failed)] if ct.ha_failed else []
    ha = "no"
    if ct.ha:
        ha = f"yes, priority {ct.ha_priority}" + (f", group {ct.ha_group}" if ct.ha_group else "")
        ha += f"; restarted {ct.ha_restarts}x here lately" if ct.ha_restarts else ""
        ha += f"; relocated {ct.ha_relocations}x" if ct.ha_relocations else ""
    output.print_fields([
        ("name", ct.name), ("state", observed), *wanted, *doubt, *failed, ("node", ct.node),
        ("template", ct.template), ("ipv4", ct.network.ipv4 or "-"), ("mac", ct.network.mac or "-"),
        ("storage", ct.storage), ("ha", ha),
        ("init pid", ct.init_pid or "-"), ("memory", format_size(ct.limits.memory_bytes)),
        ("cpus", format_cpus(ct.limits.cpu_millis)), ("cpu shares", ct.limits.cpu_shares or "-"),
        ("pids", ct.limits.pids_max or "-"), ("disk", format_size(ct.limits.disk_bytes)),
    ] + ([("note", ct.message)] if ct.message else []))  # fmt: skip


@group(examples=["corral ct ls", "corral ct create web1 -t busybox --memory 256M --start",
                  "corral ct exec web1 -- ps", "corral ct migrate web1 --to n2 --live"])
def ct() -> None:
    """Containers of the fleet."""


@ct.command("create", examples=[
    "corral ct create web1 -t busybox --start",
    "corral ct create db1 -t debian --node n2 --memory 1G --cpus 2 --disk 4G",
    "corral ct create vol1 -t busybox --storage shared   # migrations hand the volume over, no copy",
    "corral -o json ct create web2 -t busybox | jq -r .network.ipv4_cidr",
])
@click.argument("name")
@click.option("--template", "-t", type=click.Choice(TEMPLATES), required=True, help="what to build the root filesystem from")
@click.option("--node", "-n", default="", show_default=False, shell_complete=complete_nodes,
              help="place on this node  [default: the scheduler chooses]")
@click.option("--storage", type=click.Choice(STORAGE_NAMES), default=DEFAULT_STORAGE,
              help="root filesystem: local (a directory on the host, copied by rsync when migrated) or shared "
                   "(a volume on the fleet's shared storage, handed over without a copy); or a driver: "
                   "dir, image, lvm")  # fmt: skip
@click.option("--start", is_flag=True, help="start it once created")
@click.option("--constraint", "constraints", multiple=True, metavar="LABEL=VALUE",
              help="place only on nodes whose label matches (LABEL!=VALUE: does not); repeatable")
@click.option("--group", default="", help="keep apart from other members of this group where possible")
@click.option("--dry-run", is_flag=True, help="say where it would go and why, and why not elsewhere; create nothing")
@limit_options
@ha_options
@click.pass_obj
def ct_create(obj, name, template, node, storage, start, constraints, group, dry_run, memory, cpus, cpu_shares, pids,
              disk, ha, ha_priority, ha_group) -> None:  # fmt: skip
    """Create a container on a node that fits it.

    The first debian container on a host builds its template first (minutes); on a terminal a
    spinner shows the time it has waited.
    """
    from controller.cli.progress import waiting

    @run
    async def go():
        limits = _limits(memory, cpus, cpu_shares, pids, disk)
        async with obj.client() as fleet:
            if dry_run:
                plan = await fleet.plan_placement(name, node=node, limits=limits, storage=storage,
                                                  constraints=constraints, group=group)  # fmt: skip
                _print_plan(obj, name, plan)
                return
            what = f"the controller to create {name} ({template})"
            hint = "a host's first debian container builds the template: minutes" if template == "debian" else ""
            async with waiting(obj, what, hint=hint):
                created = await fleet.create_container(name, template, node=node, limits=limits, storage=storage,
                                                       start=start, ha=bool(ha), ha_priority=ha_priority or 0,
                                                       ha_group=ha_group or "", constraints=constraints,
                                                       group=group)  # fmt: skip
        if obj.machine:
            output.emit(obj, created)
        else:
            click.echo(f"created {created.name} on {created.node} ({created.network.ipv4}), {created.state.value}")
            if created.message:
                click.echo(f"note: {created.message}")

    go()


def _print_plan(obj, name: str, plan) -> None:
    if obj.machine:
        output.emit(obj, {"container": name, "node": plan.node, "reason": plan.reason, "rejected": dict(plan.rejected)})
        return
    click.echo(f"{name} would go to {plan.node}: {plan.reason}")
    for node, why in sorted(plan.rejected.items()):
        click.echo(f"  not {node}: {why}")


def _simple(verb: str, help_text: str):
    @ct.command(verb, help=help_text, examples=[f"corral ct {verb} web1", f"corral ct {verb} web1 -o json"])
    @click.argument("name", shell_complete=complete_containers)
    @click.pass_obj
    def command(obj, name: str) -> None:

        @run
        async def go():
            async with obj.client() as fleet:
                result = await fleet.get_container(name)
            if obj.machine or verb == "show":
                _show(obj, result)
            else:
                click.echo(f"{result.name} {result.state.value} on {result.node}")

        go()

    return command


_simple("show", "Show one container.")


@ct.command("start", examples=["corral ct start web1", "corral ct start web1 --stateless   # drop processes "
                               "saved by stop --stateful, boot afresh", "corral ct start web1 -o json"])
@click.argument("name", shell_complete=complete_containers)
@click.option("--stateless", is_flag=True, help="boot afresh, dropping processes saved by `ct stop --stateful`")
@click.pass_obj
def ct_start(obj, name, stateless) -> None:
    """Start a container: one stopped with --stateful resumes its processes where they were."""

    @run
    async def go():
        async with obj.client() as fleet:
            result = await fleet.start_container(name, stateless=stateless)
        if obj.machine:
            _show(obj, result)
        else:
            click.echo(f"{result.name} {result.state.value} on {result.node}")

    go()


@ct.command("stop", examples=["corral ct stop web1", "corral ct stop web1 --timeout 30", "corral ct stop web1 --force",
                              "corral ct stop web1 --stateful   # `ct start web1` resumes its processes"])
@click.argument("name", shell_complete=complete_containers)
@click.option("--force", "-f", is_flag=True, help="kill at once instead of a clean shutdown")
@click.option("--timeout", type=click.IntRange(0, 3600), default=0,
              help="seconds to wait for a clean shutdown before killing; 0 = the agent's default")
@click.option("--stateful", is_flag=True,
              help="save its processes on its node (CRIU) instead; the next start resumes them")
@click.pass_obj
def ct_stop(obj, name, force, timeout, stateful) -> None:
    """Stop a container (with --stateful, its processes are saved to resume later)."""
    if stateful and force:
        raise click.UsageError("--stateful saves the processes; it cannot be combined with --force")

    @run
    async def go():
        async with obj.client() as fleet:
            result = await fleet.stop_container(name, force=force, timeout=timeout, stateful=stateful)
        if obj.machine:
            _show(obj, result)
        else:
            how = " (stateful: `corral ct start` resumes its processes)" if result.stateful_stopped else ""
            click.echo(f"{result.name} {result.state.value} on {result.node}{how}")

    go()


@ct.command("destroy", examples=["corral ct destroy web1", "corral ct destroy web1 --force   # stop it first"])
@click.argument("name", shell_complete=complete_containers)
@click.option("--force", "-f", is_flag=True, help="stop it first if it runs")
@click.pass_obj
def ct_destroy(obj, name, force) -> None:
    """Destroy a container and its root filesystem."""

    @run
    async def go():
        async with obj.client() as fleet:
            await fleet.destroy_container(name, force=force)
        if obj.machine:
            output.emit(obj, {"name": name, "state": "destroyed"})
        else:
            click.echo(f"destroyed {name}")

    go()


@ct.command("resolve", examples=[
    "corral ct resolve web1 --on n2          # says what it will stop where, then asks",
    "corral ct resolve web1 --on n2 --yes",
    "corral ct resolve web1 --on n2 --dry-run -o json",
])  # fmt: skip
@click.argument("name", shell_complete=complete_containers)
@click.option("--on", "node", required=True, shell_complete=complete_nodes,
              help="the node whose copy is the container from now on")
@click.option("--yes", "-y", is_flag=True, help="do it without asking")
@click.option("--dry-run", is_flag=True, help="only say what would be stopped where")
@click.pass_obj
def ct_resolve(obj, name, node, yes, dry_run) -> None:
    """Settle a container that is in doubt (the controller cannot tell whether a copy runs).

    The copy on --on NODE becomes the container; every other copy is stopped and
    removed first, and each node holding one must answer. Without --yes it shows
    what it will do and asks (a terminal is needed to ask).
    """

    @run
    async def go():
        async with obj.client() as fleet:
            plan = await fleet.resolve_container(name, node, dry_run=True)
            if not dry_run and not yes:
                _say_resolution(plan, "will")
                if not sys.stdin.isatty():
                    raise click.UsageError("not a terminal to ask on: add --yes to do it, --dry-run to see it")
                if not click.confirm("Go ahead?", default=False):
                    raise click.Abort()
            if not dry_run:
                plan = await fleet.resolve_container(name, node, dry_run=False)
        if obj.machine:
            output.emit(obj, plan)
        else:
            _say_resolution(plan, "would" if dry_run else "did")

    go()


def _say_resolution(plan, tense: str) -> None:
    verbs = {"will": ("will stop and remove", "will keep"), "would": ("would stop and remove", "would keep"),
             "did": ("stopped and removed", "kept")}[tense]  # fmt: skip
    click.echo(f"{plan.name} was in doubt: {plan.reason}")
    for node in plan.remove:
        click.echo(f"  {verbs[0]} the copy on {node}")
    click.echo(f"  {verbs[1]} the copy on {plan.keep}: {plan.name} lives there from now on")


@ct.command("ls", examples=["corral ct ls", "corral ct ls --node n1", "corral ct ls -o json | jq -r '.[].name'",
                            "corral ct ls --no-headers | awk '{print $1, $3}'"])
@click.option("--node", "-n", default="", show_default=False, shell_complete=complete_nodes,
              help="only the containers on this node  [default: all]")
@click.pass_obj
def ct_ls(obj, node) -> None:
    """List containers and where they run."""

    @run
    async def go():
        async with obj.client() as fleet:
            containers = await fleet.list_containers(node)
        if obj.machine:
            output.emit(obj, containers)
        else:
            output.containers_table(containers, no_headers=obj.no_headers)

    go()


@ct.command("exec", cls=PassThroughCommand, context_settings={"ignore_unknown_options": True}, examples=[
    "corral ct exec web1 -- ps",
    "corral ct exec web1 ps -o pid,comm         # -o is ps's: it comes after the command's first word",
    "corral ct exec web1 -e LANG=C -- sh -c 'echo $LANG'",
    "echo hello | corral ct exec web1 -i -- cat",
    "corral ct exec -it web1 -- top              # on a terminal: keys, resizes",
    "corral ct exec web1 --timeout 10 -- sleep 60   # killed after 10 s",
    "corral ct exec web1 -- tar -C /srv -c . > srv.tar   # output streams, any size",
])
@click.argument("name", shell_complete=complete_containers)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--env", "-e", multiple=True, help="KEY=VALUE for the command's environment (repeatable)")
@click.option("--timeout", type=click.IntRange(0, 86400), default=0,
              help="kill the command after this many seconds; 0 = the agent's limit, 300 s (none with -i or -t)")
@click.option("--interactive", "-i", is_flag=True,
              help="pass standard input to the command as it is read (and corral's SIGINT, SIGTERM, SIGHUP)")
@click.option("--tty", "-t", is_flag=True,
              help="run it on a terminal (this one must be a terminal: with -i, every key goes to the command)")
@click.pass_context
def ct_exec(ctx, name, command, env, timeout, interactive, tty) -> None:
    """Run a command in a running container: corral ct exec NAME -- CMD ARGS...

    Exits with the command's exit code. Its stdout and stderr arrive here as it writes them,
    any amount (the command waits while they are not read). A command still running after
    --timeout is killed, with what it started in the container: corral then exits 7.
    With -o json or yaml the output is collected instead and printed once the command has
    ended, as one object: name, exit_code, timed_out, stdout, stderr.

    corral's options go before the command: from the command's first word on, everything is
    the command's (`--` before it is optional).
    """
    obj = ctx.obj
    from corral.errors import InvalidArgument

    @run
    async def go():
        import contextlib

        from corral.errors import DeadlineExceeded, Unavailable
        from corral.proc import EXEC_DEFAULT_TIMEOUT, STDERR, STDOUT, Exited

        variables = parse_env(env)
        if interactive or tty:
            from controller.cli.interactive import attach, exit_code_of, interactive_start

            if obj.machine:
                raise InvalidArgument("-i and -t stream the command's input and output: they take no -o json/yaml")
            start = interactive_start(name, command, variables, timeout, tty)
            async with obj.client() as fleet:
                return exit_code_of(await attach(fleet, start, send_stdin=interactive), start)
        exited = None
        async with obj.client() as fleet, contextlib.aclosing(
            fleet.exec_stream(name, list(command), env=variables, timeout=timeout)
        ) as events:
            if obj.machine:
                collected = {STDOUT: bytearray(), STDERR: bytearray()}
                async for event in events:
                    if isinstance(event, Exited):
                        exited = event
                    else:
                        collected[event.fd].extend(event.data)
            else:
                exited = await _write_as_it_comes(events)
        if exited is None:
            raise Unavailable("the exec stream ended without the command's exit status")
        if obj.machine:
            output.emit(obj, {
                "name": name, "exit_code": exited.returncode, "timed_out": exited.timed_out,
                "stdout": collected[STDOUT].decode(errors="replace"),
                "stderr": collected[STDERR].decode(errors="replace"),
            })  # fmt: skip
        if exited.timed_out:
            raise DeadlineExceeded(
                f"`{command[0]}` in {name} did not finish within {timeout or EXEC_DEFAULT_TIMEOUT} s: "
                "it was killed, with what it started"
            )
        return exited.returncode

    ctx.exit(go())


def parse_env(items) -> dict[str, str]:
    """--env KEY=VALUE options as a mapping (InvalidArgument for one without `=` or a key)."""
    from corral.errors import InvalidArgument

    variables = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"--env {item!r}: expected KEY=VALUE")
        variables[key] = value
    return variables


async def _write_as_it_comes(events):
    """Write an exec's output to our stdout and stderr as it arrives; returns its `Exited`.
    Written from a thread of its own, one piece at a time: a reader that does not keep up (a
    pipe, a pager, a terminal stopped with ^S) holds up the stream, and with it the command,
    never the event loop (in the warm helper, other invocations run on it too) and nothing
    piles up in memory."""
    import asyncio
    import concurrent.futures
    import contextvars

    from corral.proc import STDERR, STDOUT, Exited

    loop = asyncio.get_running_loop()
    # The invocation's own sys.stdout/stderr in the warm helper (they dispatch on a context variable).
    context = contextvars.copy_context()
    streams = {STDOUT: sys.stdout.buffer, STDERR: sys.stderr.buffer}
    writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="corral-exec-output")

    def write(stream, data: bytes) -> None:
        stream.write(data)
        stream.flush()

    try:
        async for event in events:
            if isinstance(event, Exited):
                return event
            await loop.run_in_executor(writer, context.run, write, streams[event.fd], event.data)
        return None
    finally:
        writer.shutdown(wait=False)  # never wait here on a write that is stuck


@ct.command("set", examples=["corral ct set web1 --memory 512M", "corral ct set web1 --cpus 0.5 --pids 200",
                             "corral ct set db1 --ha --ha-priority 10"])  # fmt: skip
@click.argument("name", shell_complete=complete_containers)
@limit_options
@ha_options
@click.pass_obj
def ct_set(obj, name, memory, cpus, cpu_shares, pids, disk, ha, ha_priority, ha_group) -> None:
    """Change a container's limits (applied live if it runs) or its HA settings."""
    from corral.errors import InvalidArgument
    from corral.model import Limits

    @run
    async def go():
        limits = _limits(memory, cpus, cpu_shares, pids, disk)
        if limits == Limits() and ha is None and ha_priority is None and ha_group is None:
            raise InvalidArgument("nothing to change: give a limit or an HA setting")
        async with obj.client() as fleet:
            result = None
            if limits != Limits():
                result = await fleet.set_limits(name, limits)
            if ha is not None or ha_priority is not None or ha_group is not None:
                now = result or await fleet.get_container(name)  # what is not given stays as it is
                result = await fleet.set_ha(name, now.ha if ha is None else ha,
                                            now.ha_priority if ha_priority is None else ha_priority,
                                            now.ha_group if ha_group is None else ha_group)  # fmt: skip
        _show(obj, result)

    go()


@ct.command("migrate", examples=[
    "corral ct migrate web1 --to n2            # cold: stop, move, start",
    "corral ct migrate web1 --to n2 --live     # processes, memory and address kept",
    "corral ct migrate web1 --to n2 --live --fallback cold",
    "corral ct migrate web1 --to n2 --live --postcopy",
    "corral ct migrate web1 --to n2 --detach   # prints the operation id; follow with `corral ops watch ID`",
    "corral ct migrate web1 --live --dry-run   # where the scheduler would move it, and why",
])
@click.argument("name", shell_complete=complete_containers)
@click.option("--to", "target", default="", shell_complete=complete_nodes,
              help="the node to move it to  [default: the scheduler chooses]")
@click.option("--dry-run", is_flag=True, help="say where it would go and why, and why not elsewhere; move nothing")
@click.option("--live", is_flag=True, help="keep processes, memory, PIDs and address (CRIU)")
@click.option("--postcopy", is_flag=True, help="live: resume on the target at once, pull memory on demand")
@click.option("--fallback", type=click.Choice(["cold"]), help="live: migrate cold if CRIU's pre-flight fails")
@click.option("--from-checkpoint", "from_checkpoint", metavar="OP", shell_complete=complete_operations,
              help="after post-copy OP failed: back to its source, from the checkpoint kept there")
@click.option("--detach", "-d", is_flag=True, help="print the operation id and return at once")
@click.pass_context
def ct_migrate(ctx, name, target, dry_run, live, postcopy, fallback, from_checkpoint, detach) -> None:
    """Move a container to another node, cold (stop, move, start) or --live.

    Exits 0 when the migration succeeded, 1 when it failed (rolled back), 9 when cancelled.
    """
    from controller.cli.operations import watch_with_progress

    obj = ctx.obj

    @run
    async def go():
        if dry_run:
            async with obj.client() as fleet:
                _print_plan(obj, name, await fleet.plan_placement(name, existing=True, node=target))
            return 0
        if postcopy and live:
            # Said before anything starts: the risk is the operator's to take.
            click.echo(POSTCOPY_WARNING.format(name=name, target=target or "the node the scheduler picks"), err=True)
        async with obj.client() as fleet:
            op = await fleet.migrate(name, target, live=live or bool(from_checkpoint), postcopy=postcopy,
                                     fallback_cold=fallback == "cold", from_checkpoint=from_checkpoint or "")  # fmt: skip
            if detach:
                output.emit(obj, op) if obj.machine else click.echo(op.id)
                return 0
            if not obj.machine:
                mode = "from its kept checkpoint" if from_checkpoint else "live" if live else "cold"
                chosen = json.loads(op.params["target"]) if "target" in op.params else target
                click.echo(f"operation {op.id}: migrating {name} to {chosen} ({mode})", err=True)
            return await watch_with_progress(fleet, op.id, obj)

    ctx.exit(go())


@ct.command("failover", examples=[
    "corral ct failover db1              # its node is dead: run it where the planner says (and why)",
    "corral ct failover db1 --to n2",
    "corral ct failover db1 --detach     # prints the operation id",
])  # fmt: skip
@click.argument("name", shell_complete=complete_containers)
@click.option("--to", "target", default="", shell_complete=complete_nodes,
              help="the node to run it on  [default: the failover planner's choice]")
@click.option("--detach", "-d", is_flag=True, help="print the operation id and return at once")
@click.pass_context
def ct_failover(ctx, name, target, detach) -> None:
    """Run a container whose node is lost on another node, taking its shared volume over.

    Refused unless its node is proven unable to run it: fenced, or silent past its lease and
    the margin (its agent killed it then). A suspect node (maybe only cut off) is not enough.
    Exits 0 when it runs on the new node, 1 when the failover failed.
    """
    import json

    from controller.cli.operations import watch_with_progress

    obj = ctx.obj

    @run
    async def go():
        async with obj.client() as fleet:
            op = await fleet.failover(name, target)
            if detach:
                output.emit(obj, op) if obj.machine else click.echo(op.id)
                return 0
            if not obj.machine:
                said = {k: json.loads(op.params[k]) for k in ("source", "target", "reason")}
                click.echo(f"operation {op.id}: failing {name} over from {said['source']} to {said['target']} "
                           f"({said['reason']})", err=True)
            return await watch_with_progress(fleet, op.id, obj)

    ctx.exit(go())


POSTCOPY_WARNING = (
    "warning: post-copy: {name} resumes on {target} at once and pulls its memory from its current node until "
    "every page has arrived. Until then, if the current node fails the container is lost (its disk on {target} "
    "stays); if {target} fails it can only be restarted from the state kept at the switch, losing what it did "
    "on {target} since."
)
