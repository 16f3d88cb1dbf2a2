"""The click classes every `corral` group and command is made of.

They give each command the global options wherever they are written (`corral -o json ct ls`
and `corral ct ls -o json` alike), and an Examples section in its --help.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import click

from controller.cli.context import OUTPUT_FORMATS


def _ctx_obj(ctx: click.Context):
    return ctx.find_root().obj


def _set(attr: str):
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        # The root group's callback made the Ctx before any subcommand's options are parsed;
        # on the root itself the values are handed to that callback instead.
        obj = _ctx_obj(ctx)
        if obj is not None and value not in (None, False):
            setattr(obj, attr, value)
        return value

    return callback


def _complete_context(ctx: click.Context, param: click.Parameter, incomplete: str):
    from controller.cli.completion import context_names

    return context_names(ctx, incomplete)


def global_options(*, expose: bool) -> list[click.Option]:
    """The options accepted before or after any subcommand. `expose`: handed to the
    command's function (the root group), or only recorded on its Ctx (every other command)."""
    callback = None if expose else _set
    return [
        click.Option(
            ["-o", "--output", "fmt"], type=click.Choice(OUTPUT_FORMATS), default=None, expose_value=expose,
            callback=callback and callback("format"), is_eager=False,
            help="output format: table (for people), json or yaml (the API objects)  [default: table]",
        ),
        click.Option(
            ["--no-headers"], is_flag=True, default=False, expose_value=expose,
            callback=callback and callback("no_headers"), help="tables without the header line",
        ),
        click.Option(
            ["--context"], metavar="NAME", default=None, expose_value=expose,
            callback=callback and callback("context"), shell_complete=_complete_context, hidden=not expose,
            help="the controller to talk to, by context name (default: $CORRAL_CONTEXT, else the current one)",
        ),
        click.Option(
            ["--config"], type=click.Path(path_type=Path, dir_okay=False), default=None, expose_value=expose,
            callback=callback and callback("config_path"), hidden=not expose,
            help="CLI config file (default: $CORRAL_CONFIG, ~/.config/corral/config.yaml, /etc/corral/cli.yaml)",
        ),
    ]


class _Examples:
    """Writes an Examples section (and any other `sections`, lines kept as written) after a
    command's help."""

    examples: Sequence[str] = ()
    sections: Sequence[tuple[str, Sequence[str]]] = ()

    def format_examples(self, formatter: click.HelpFormatter) -> None:
        for title, lines in [("Examples", self.examples), *self.sections]:
            if not lines:
                continue
            with formatter.section(title):
                for line in lines:
                    formatter.write(f"{'':>{formatter.current_indent}}{line}\n" if line else "\n")


class CorralCommand(_Examples, click.Command):
    def __init__(self, *args, examples: Sequence[str] = (), sections=(), **kwargs) -> None:
        kwargs.setdefault("context_settings", {}).setdefault("show_default", True)
        super().__init__(*args, **kwargs)
        self.examples, self.sections = examples, sections
        self.params.extend(global_options(expose=False))

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self.format_examples(formatter)
        super().format_epilog(ctx, formatter)


class PassThroughCommand(CorralCommand):
    """A command whose last argument is another program's command line (`ct exec NAME CMD...`):
    from the program's first word on, everything is the program's, as if `--` preceded it, so
    `corral ct exec web1 ps -o pid` hands `-o pid` to ps, not to corral."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, self._separated(ctx, args))

    def _separated(self, ctx: click.Context, args: list[str]) -> list[str]:
        params = self.get_params(ctx)
        takes_value = {opt for p in params if isinstance(p, click.Option) and not p.is_flag and not p.count
                       for opt in (*p.opts, *p.secondary_opts)}  # fmt: skip
        leading = 0  # the arguments before the program's (NAME)
        for p in params:
            if isinstance(p, click.Argument):
                if p.nargs == -1:
                    break
                leading += 1
        seen, i = 0, 0
        while i < len(args):
            arg = args[i]
            if arg == "--":
                return args
            if arg.startswith("-") and arg != "-":
                i += 2 if arg in takes_value else 1
                continue
            if seen == leading:
                return [*args[:i], "--", *args[i:]]
            seen, i = seen + 1, i + 1
        return args


class CorralGroup(_Examples, click.Group):
    """A group whose commands and subgroups are Corral's; with no subcommand it prints its
    help and exits 0."""

    command_class = CorralCommand

    def __init__(self, *args, examples: Sequence[str] = (), sections=(), root: bool = False, **kwargs) -> None:
        kwargs.setdefault("no_args_is_help", False)
        kwargs.setdefault("context_settings", {}).setdefault("show_default", True)
        super().__init__(*args, **kwargs)
        self.examples, self.sections = examples, sections
        self.params.extend(global_options(expose=root))

    def invoke(self, ctx: click.Context) -> Any:
        pending = ctx._protected_args if hasattr(ctx, "_protected_args") else ctx.protected_args
        if not pending and not ctx.args:
            click.echo(ctx.get_help(), color=ctx.color)
            return None
        return super().invoke(ctx)

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self.format_examples(formatter)
        super().format_epilog(ctx, formatter)


CorralGroup.group_class = CorralGroup


def group(**kwargs):
    """`@group(examples=[...])`: a Corral command group."""
    return click.group(cls=CorralGroup, **kwargs)


def command(name: str, **kwargs):
    """`@command(NAME, examples=[...])`: a Corral command outside a group (added to the root in main)."""
    return click.command(name, cls=CorralCommand, **kwargs)
