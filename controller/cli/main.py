"""`corral`: the fleet from the command line.

Errors print one line to stderr and exit with the error's code (see
corral.errors); `ct exec` exits with the command's own code.
"""

from __future__ import annotations

import asyncio
import functools
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable

import click

from corral.errors import CorralError

OUTPUT_FORMATS = ("table", "json")


class Ctx:
    def __init__(self, config: Path | None, fmt: str) -> None:
        self.config_path = config
        self.format = fmt

    @property
    def json(self) -> bool:
        return self.format == "json"

    def client(self):
        from controller.cli.settings import CliSettings
        from controller.client import ControllerClient

        settings = CliSettings.load(self.config_path)
        return ControllerClient(settings.controller, settings.tls, settings.timeout)


def run(coro_fn: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    """Run an async command; turn our errors into one line and an exit code."""

    @functools.wraps(coro_fn)
    def wrapper(*args, **kwargs):
        try:
            return asyncio.run(coro_fn(*args, **kwargs))
        except CorralError as exc:
            click.echo(f"corral: error: {exc.message}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("corral: interrupted", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", type=click.Path(path_type=Path, dir_okay=False), help="CLI config (default: $CORRAL_CONFIG, ~/.config/corral/config.yaml, /etc/corral/cli.yaml)")
@click.option("-o", "--output", "fmt", type=click.Choice(OUTPUT_FORMATS), default="table", show_default=True)
@click.pass_context
def cli(ctx: click.Context, config: Path | None, fmt: str) -> None:
    """Corral: a fleet of LXC containers across hosts."""
    ctx.obj = Ctx(config, fmt)


# Subcommand groups live in their own modules; importing them registers them.
from controller.cli import containers, lab, nodes, operations, pki  # noqa: E402,F401

cli.add_command(nodes.node)
cli.add_command(containers.ct)
cli.add_command(lab.lab)
cli.add_command(pki.pki)
cli.add_command(operations.ops)


def main() -> None:
    cli(prog_name="corral")


if __name__ == "__main__":
    main()
