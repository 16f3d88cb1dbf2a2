"""`corral`: the fleet from the command line.

Errors print one line to stderr and exit with the error's code (see
corral.errors); `ct exec` exits with the command's own code.
"""

from __future__ import annotations

from pathlib import Path

import click

from controller.cli import containers, lab, nodes, operations, pki
from controller.cli.context import OUTPUT_FORMATS, Ctx


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", type=click.Path(path_type=Path, dir_okay=False), help="CLI config (default: $CORRAL_CONFIG, ~/.config/corral/config.yaml, /etc/corral/cli.yaml)")
@click.option("-o", "--output", "fmt", type=click.Choice(OUTPUT_FORMATS), default="table", show_default=True)
@click.pass_context
def cli(ctx: click.Context, config: Path | None, fmt: str) -> None:
    """Corral: a fleet of LXC containers across hosts."""
    ctx.obj = Ctx(config, fmt)


cli.add_command(nodes.node)
cli.add_command(containers.ct)
cli.add_command(lab.lab)
cli.add_command(pki.pki)
cli.add_command(operations.ops)


def main() -> None:
    cli(prog_name="corral")


if __name__ == "__main__":
    main()
