"""`corral lab ...`: a local multi-host lab on this machine (network namespaces)."""

from __future__ import annotations

import click

from controller.cli.context import run

from controller.cli import output


@click.group()
def lab() -> None:
    """A local lab of several hosts on this machine, for trying Corral and for its tests."""


@lab.command("up")
@click.option("--nodes", type=click.IntRange(1, 20), default=3, show_default=True)
@click.option("--name", default="demo", show_default=True, help="lab name (a-z, 0-9, at most 6 characters)")
@click.pass_obj
def lab_up(obj, nodes: int, name: str) -> None:
    """Bring up NODES lab hosts, each with its own agent, and a controller."""
    from controller.cli.settings import USER_CONFIG
    import lab as corral_lab

    @run
    async def go():
        info = await corral_lab.lab_up(name=name, nodes=nodes, write_cli_config=USER_CONFIG)
        if obj.json:
            output.print_json(_info_dict(info))
            return
        click.echo(f"lab {info.name!r} is up: {len(info.hosts)} hosts, controller at {info.controller_address}")
        for host in info.hosts:
            click.echo(f"  {host.node}: {host.address} (namespace {host.namespace}, agent pid {host.agent_pid})")
        click.echo(f"`corral` now talks to this lab (config {USER_CONFIG}); try `corral node ls`.")
        click.echo(f"Take it down with `corral lab down --name {info.name}`.")

    go()


@lab.command("status")
@click.option("--name", default="demo", show_default=True)
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
        if obj.json:
            output.print_json(_info_dict(info))
            return
        click.echo(f"lab {info.name!r}: controller {info.controller_address} (pid {info.controller_pid})")
        output.print_table(
            ["NODE", "ADDRESS", "NAMESPACE", "AGENT PID", "LXC PATH"],
            [[h.node, h.address, h.namespace, h.agent_pid, h.lxc_path] for h in info.hosts],
        )

    go()


@lab.command("down")
@click.option("--name", default="demo", show_default=True)
def lab_down(name: str) -> None:
    """Remove every namespace, bridge, container and process of the lab."""
    import lab as corral_lab

    @run
    async def go():
        await corral_lab.lab_down(name=name)
        click.echo(f"lab {name!r} is down")

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
