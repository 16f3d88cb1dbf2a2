"""`corral`: the fleet from the command line.

Errors print one line to stderr and exit with the error's code (see
corral.errors); `ct exec` exits with the command's own code.
"""

from __future__ import annotations

import click

from controller.cli import containers, contexts_cmd, events, fleet, interactive, lab, nodes, operations, pki, snapshots, stats
from controller.cli.command import CorralGroup
from controller.cli.completion import SHELLS, completion_script
from controller.cli.context import Ctx

EXIT_CODES = [
    "0   success",
    "1   an operation failed (rolled back), or an unexpected error",
    "2   bad input (a name, size, flag or option)",
    "3   not found            4   already exists",
    "5   wrong state          6   no capacity (no node fits)",
    "7   unreachable          8   permission denied",
    "9   cancelled            10  runtime failure on a host (LXC, CRIU)",
    "78  bad configuration    130 interrupted",
    "`ct exec` exits with the command's own exit code.",
]


def _version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    click.echo(f"corral {package_version()}")
    ctx.exit(0)


def package_version() -> str:
    from corral.version import package_version

    return package_version()


@click.group(cls=CorralGroup, root=True, sections=[("Exit codes", EXIT_CODES)], context_settings={"help_option_names": ["-h", "--help"]},
             examples=["corral node ls", "corral ct create web1 -t busybox --memory 256M --start",
                       "corral ct ls -o json", "corral --context prod ct ls", "corral context ls",
                       "source <(corral completion bash)"])  # fmt: skip
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_version,
              help="print corral's version and exit")
@click.pass_context
def cli(ctx: click.Context, fmt: str | None, no_headers: bool, context: str | None, config) -> None:
    """Corral: a fleet of LXC containers across hosts.

    The options below may also be written after any command (`corral ct ls -o json`).
    """
    ctx.obj = Ctx(config, fmt, context, no_headers)


@cli.command("completion", examples=[
    "source <(corral completion bash)                       # this shell",
    "corral completion bash > /etc/bash_completion.d/corral",
    "corral completion zsh > \"${fpath[1]}/_corral\"",
    "corral completion fish > ~/.config/fish/completions/corral.fish",
])
@click.argument("shell", type=click.Choice(SHELLS))
@click.pass_context
def completion(ctx: click.Context, shell: str) -> None:
    """Print the shell completion script for SHELL (commands, options, and the names of
    containers, nodes, operations and contexts)."""
    click.echo(completion_script(ctx, shell))


cli.add_command(nodes.node)
cli.add_command(containers.ct)
cli.add_command(operations.ops)
cli.add_command(contexts_cmd.context)
cli.add_command(lab.lab)
cli.add_command(pki.pki)
cli.add_command(events.events)
cli.add_command(fleet.fleet)
cli.add_command(stats.top)


def main() -> None:
    cli(prog_name="corral")


if __name__ == "__main__":
    main()
