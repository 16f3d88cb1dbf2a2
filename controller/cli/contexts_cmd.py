"""`corral context ls|use|show`: the controllers this CLI knows, and the one it talks to."""

from __future__ import annotations

import click

from controller.cli import output
from controller.cli.command import group
from controller.cli.completion import complete_context_names
from controller.cli.context import environ, run


@group(examples=["corral context ls", "corral context use prod", "corral context show",
                 "CORRAL_CONTEXT=lab-demo corral node ls", "corral --context prod ct ls"])  # fmt: skip
def context() -> None:
    """Named controllers (as kubectl contexts or Incus remotes) and the current one."""


def _load(obj):
    from controller.cli.contexts import ContextsFile, default_path, user_config
    from corral.errors import ConfigError

    path = default_path(obj.config_path)
    if path is None:
        raise ConfigError(f"no CLI configuration: pass --config, set CORRAL_CONFIG, or create {user_config()}")
    return ContextsFile.load(path)


@context.command("ls", examples=["corral context ls", "corral context ls -o json"])
@click.pass_obj
def context_ls(obj) -> None:
    """List the contexts; the current one is marked with *."""

    @run
    async def go():
        config = _load(obj)
        chosen = obj.context or environ().get("CORRAL_CONTEXT") or config.current
        rows = [{"name": name, "current": name == chosen, "controller": entry.get("controller", ""),
                 "previous_context": entry.get("previous-context")}
                for name, entry in config.contexts.items()]  # fmt: skip
        if obj.machine:
            output.emit(obj, rows)
            return
        output.print_table(["CURRENT", "NAME", "CONTROLLER"],
                           [["*" if r["current"] else "", r["name"], r["controller"]] for r in rows],
                           no_headers=obj.no_headers)  # fmt: skip

    go()


@context.command("use", examples=["corral context use prod"])
@click.argument("name", shell_complete=complete_context_names)
@click.pass_obj
def context_use(obj, name: str) -> None:
    """Make NAME the current context (kept in the CLI config)."""
    from controller.cli.contexts import editing

    @run
    async def go():
        _load(obj)  # a missing config is an error here, not a new empty file
        with editing(obj.config_path) as config:
            config.use(name)
        click.echo(f"current context: {name}", err=obj.machine)

    go()


@context.command("show", examples=["corral context show", "corral context show prod -o yaml"])
@click.argument("name", required=False, shell_complete=complete_context_names)
@click.pass_obj
def context_show(obj, name: str | None) -> None:
    """Show a context (default: the one in use) with the files it uses."""
    from controller.cli.settings import CliSettings

    @run
    async def go():
        settings = CliSettings.load(obj.config_path, name or obj.context)
        config = _load(obj)
        data = {
            "name": settings.context, "config": str(config.path), "controller": settings.controller,
            "tls": {"ca": str(settings.tls.ca), "cert": str(settings.tls.cert), "key": str(settings.tls.key)},
            "timeout": settings.timeout,
            "previous_context": config.contexts[settings.context].get("previous-context"),
        }  # fmt: skip
        if obj.machine:
            output.emit(obj, data)
            return
        output.print_fields([
            ("name", data["name"]), ("config", data["config"]), ("controller", data["controller"]),
            ("ca", data["tls"]["ca"]), ("cert", data["tls"]["cert"]), ("key", data["tls"]["key"]),
            ("timeout", f"{settings.timeout:g} s"),
        ] + ([("previous", data["previous_context"])] if data["previous_context"] else []))  # fmt: skip

    go()
