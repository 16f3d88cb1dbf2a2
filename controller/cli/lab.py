"""`corral lab ...`: a local multi-host lab on this machine (network namespaces)."""

from __future__ import annotations

from pathlib import Path

import click

from controller.cli import output
from controller.cli.command import group
from controller.cli.context import run


def context_name(lab_name: str) -> str:
    return f"lab-{lab_name}"


@group(examples=["corral lab up", "corral lab up --nodes 2 --name mine", "corral lab status",
                 "corral lab partition n3", "corral lab heal n3", "corral lab kill n3", "corral lab start n3",
                 "corral lab down"])  # fmt: skip
def lab() -> None:
    """A local lab of several hosts on this machine, for trying Corral and for its tests.

    Faults to inject: partition/heal a host's network, kill (a power cut) and start a host,
    fence a host (what a controller's fence command runs).
    """


@lab.command("up", examples=["corral lab up", "corral lab up --nodes 2 --name mine   # adds context lab-mine"])
@click.option("--nodes", type=click.IntRange(1, 20), default=3, help="how many lab hosts")
@click.option("--name", default="demo", help="lab name (a-z, 0-9, at most 6 characters)")
@click.pass_obj
def lab_up(obj, nodes: int, name: str) -> None:
    """Bring up NODES lab hosts, each with its own agent, and a controller.

    Adds the context lab-NAME to the CLI config and makes it current; the other contexts stay,
    and `corral lab down` returns to the one current before.
    """
    import lab as corral_lab

    @run
    async def go():
        info = await corral_lab.lab_up(name=name, nodes=nodes)
        path, previous = add_lab_context(obj, name, info.cli_config)
        if obj.machine:
            output.emit(obj, _info_dict(info))
            return
        click.echo(f"lab {info.name!r} is up: {len(info.hosts)} hosts, controller at {info.controller_address}")
        for host in info.hosts:
            click.echo(f"  {host.node}: {host.address} (namespace {host.namespace}, agent pid {host.agent_pid})")
        was = f"; it was {previous}" if previous else ""
        click.echo(f"`corral` now talks to this lab: context {context_name(name)} is current in {path}{was}; "
                   "try `corral node ls`.")  # fmt: skip
        click.echo(f"Take it down with `corral lab down --name {info.name}`.")

    go()


def add_lab_context(obj, name: str, lab_cli_config: Path) -> tuple[Path, str | None]:
    """Add (or refresh) context lab-NAME from the lab's own CLI config and make it current.
    Returns the config file and the context current before."""
    from controller.cli.contexts import ContextsFile, editing

    lab_file = ContextsFile.load(Path(lab_cli_config))
    entry = dict(lab_file.contexts[lab_file.pick(lab_file.current)])
    base = Path(lab_cli_config).parent
    entry["tls"] = {k: str(base / v) for k, v in entry["tls"].items()}  # absolute, wherever the config is
    entry.pop("previous-context", None)
    with editing(obj.config_path) as config:
        previous = config.current if config.current != context_name(name) else None
        config.add(context_name(name), entry)
    return config.path, previous


def remove_lab_context(obj, name: str) -> tuple[bool, str | None]:
    """Remove context lab-NAME; if it was current, the one remembered before it is current
    again. Returns whether it was there, and the context now current."""
    from controller.cli.contexts import ContextsFile, default_path, editing

    path = default_path(obj.config_path)
    if path is None or context_name(name) not in ContextsFile.load(path, missing_ok=True).contexts:
        return False, None
    with editing(path) as config:
        config.remove(context_name(name))
    return True, config.current


@lab.command("status", examples=["corral lab status", "corral lab status --name mine -o json"])
@click.option("--name", default="demo", help="lab name")
@click.pass_obj
def lab_status(obj, name: str) -> None:
    """Show the lab's hosts and whether their processes run."""
    import lab as corral_lab
    from corral.errors import NotFound

    @run
    async def go():
        info = await corral_lab.lab_status(name=name)
        if info is None:
            raise NotFound(f"lab {name!r} is not up")
        if obj.machine:
            output.emit(obj, _info_dict(info))
            return
        click.echo(f"lab {info.name!r}: controller {info.controller_address} (pid {info.controller_pid})")
        output.print_table(
            ["NODE", "STATE", "LINK", "ADDRESS", "NAMESPACE", "AGENT PID", "PROCESSES", "LXC PATH"],
            [[h.node, h.state, _link(h.link_up), h.address, h.namespace, h.agent_pid if h.agent_running else "-",
              h.processes, h.lxc_path] for h in info.hosts],
            no_headers=obj.no_headers,
        )  # fmt: skip

    go()


def _link(up: bool | None) -> str:
    return "missing" if up is None else "up" if up else "down"


_NAME_OPTION = click.option("--name", default="demo", help="lab name")


@lab.command("partition", examples=["corral lab partition n3", "corral lab partition n2 --name mine"])
@click.argument("node")
@_NAME_OPTION
@click.pass_obj
def lab_partition(obj, node: str, name: str) -> None:
    """Cut NODE off the lab network: its link to the lab bridge goes down, so it reaches
    neither the controller nor the other hosts. Its agent and containers keep running.

    The lab's shared storage is a directory on this machine, not a network: a partition
    does not cut it (on a real fleet a SAN path may or may not share the network's fate).
    `corral lab heal NODE` reconnects it.
    """
    import lab as corral_lab

    _quiet_logs()

    @run
    async def go():
        await corral_lab.partition(name, node)
        _say(obj, name, node, "partitioned", f"{node} is cut off the lab network; "
             f"`corral lab heal {node}{_name_flag(name)}` reconnects it")

    go()


@lab.command("heal", examples=["corral lab heal n3"])
@click.argument("node")
@_NAME_OPTION
@click.pass_obj
def lab_heal(obj, node: str, name: str) -> None:
    """Reconnect NODE to the lab network (undo `corral lab partition`)."""
    import lab as corral_lab

    _quiet_logs()

    @run
    async def go():
        await corral_lab.heal(name, node)
        _say(obj, name, node, "healed", f"{node} is back on the lab network")

    go()


@lab.command("kill", examples=["corral lab kill n3", "corral lab kill n3 && corral lab start n3"])
@click.argument("node")
@_NAME_OPTION
@click.pass_obj
def lab_kill(obj, node: str, name: str) -> None:
    """A power cut on NODE: SIGKILL its agent and every process of its containers (everything
    running on that host), drop its mounts; files stay on disk. Checks that nothing of the host
    runs afterwards (exit 10 if something does). `corral lab start NODE` powers it on again.
    """
    _power_off(obj, node, name)


@lab.command("fence", examples=["corral lab fence n3 --name mine"])
@click.argument("node")
@_NAME_OPTION
@click.pass_obj
def lab_fence(obj, node: str, name: str) -> None:
    """Fence NODE the way a controller's fence command does: power it off like `corral lab kill`
    and exit 0 only once nothing of it runs (also when it was off already).

    As a fence command line in a controller config (no `corral` needed; {node} is substituted):
    `python3 -m lab.fence --lab NAME {node}`, run with the repository's interpreter.
    """
    _power_off(obj, node, name)


def _power_off(obj, node: str, name: str) -> None:
    import lab as corral_lab

    _quiet_logs()

    @run
    async def go():
        report = await corral_lab.power_off(name, node)
        if obj.machine:
            output.emit(obj, {"name": name, "node": node, "state": "down", "agent_pid": report.agent_pid,
                              "containers": report.containers, "processes": report.processes})
            return
        click.echo(report.summary())

    go()


@lab.command("start", examples=["corral lab start n3", "corral lab start n3 --wait"])
@click.argument("node")
@_NAME_OPTION
@click.option("--wait", is_flag=True, help="return once the controller reports the node ready")
@click.pass_obj
def lab_start(obj, node: str, name: str, wait: bool) -> None:
    """Power NODE on again after `corral lab kill` (or start its agent after a crash). Its
    containers stay stopped, as after a reboot: the agent reconciles and the controller decides.
    """
    import lab as corral_lab

    _quiet_logs()

    @run
    async def go():
        pid = await corral_lab.power_on(name, node, wait_ready=wait)
        if obj.machine:
            output.emit(obj, {"name": name, "node": node, "state": "up", "agent_pid": pid})
            return
        ready = "; the node is ready" if wait else ""
        click.echo(f"{node} is on: agent pid {pid}{ready}")

    go()


def _quiet_logs() -> None:
    # The lab's progress logs would go to stdout, where -o json output must stand alone.
    from corral import log

    log.configure(json_output=False, level="warning")


def _name_flag(name: str) -> str:
    return "" if name == "demo" else f" --name {name}"


def _say(obj, name: str, node: str, state: str, message: str) -> None:
    if obj.machine:
        output.emit(obj, {"name": name, "node": node, "state": state})
    else:
        click.echo(message)


@lab.command("down", examples=["corral lab down", "corral lab down --name mine"])
@click.option("--name", default="demo", help="lab name")
@click.pass_obj
def lab_down(obj, name: str) -> None:
    """Remove every namespace, bridge, container and process of the lab, and its context
    (the context current before `lab up` is current again)."""
    import lab as corral_lab

    @run
    async def go():
        await corral_lab.lab_down(name=name)
        removed, current = remove_lab_context(obj, name)
        if obj.machine:
            output.emit(obj, {"name": name, "state": "down", "current_context": current})
            return
        click.echo(f"lab {name!r} is down")
        if removed:
            click.echo(f"context {context_name(name)} removed; current context: {current or 'none'}")

    go()


def _info_dict(info) -> dict:
    import dataclasses

    return json_safe(dataclasses.asdict(info))


def json_safe(value):
    from pathlib import Path

    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
