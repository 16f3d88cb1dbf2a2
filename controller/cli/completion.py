"""`corral completion bash|zsh|fish`, and the names a shell completes: containers, nodes and
operation ids asked of the controller (with a short deadline; silent and empty on any failure),
context names read from the CLI config."""

from __future__ import annotations

import click

SHELLS = ("bash", "zsh", "fish")
# How long a completion may wait for the controller: a shell must not hang on a TAB.
DEADLINE = 2.0


def _ask(ctx: click.Context, incomplete: str, fetch) -> list:
    """Names from the controller starting with `incomplete`, or [] on any failure."""
    from click.shell_completion import CompletionItem

    from controller.cli import context as cli_context

    root = ctx.find_root().params
    obj = cli_context.Ctx(root.get("config"), None, root.get("context"))

    async def names() -> list[str]:
        import asyncio

        async with asyncio.timeout(DEADLINE):
            async with obj.client(timeout=DEADLINE) as fleet:
                return await fetch(fleet)

    try:
        found = cli_context._runner(names())
    except BaseException:  # noqa: BLE001 - a completion never fails loudly, not even on ^C
        return []
    return [CompletionItem(n) for n in sorted(found) if n.startswith(incomplete)]


def complete_containers(ctx: click.Context, param: click.Parameter, incomplete: str) -> list:
    async def fetch(fleet):
        return [c.name for c in await fleet.list_containers()]

    return _ask(ctx, incomplete, fetch)


def complete_nodes(ctx: click.Context, param: click.Parameter, incomplete: str) -> list:
    async def fetch(fleet):
        return [n.name for n in await fleet.list_nodes()]

    return _ask(ctx, incomplete, fetch)


def complete_operations(ctx: click.Context, param: click.Parameter, incomplete: str) -> list:
    async def fetch(fleet):
        return [op.id for op in await fleet.list_operations()]

    return _ask(ctx, incomplete, fetch)


def context_names(ctx: click.Context, incomplete: str) -> list:
    from click.shell_completion import CompletionItem

    try:
        from controller.cli.contexts import ContextsFile

        root = ctx.find_root().params
        names = ContextsFile.load(ContextsFile.default_path(root.get("config"))).names()
    except Exception:  # noqa: BLE001 - a completion never fails loudly
        return []
    return [CompletionItem(n) for n in names if n.startswith(incomplete)]


def complete_context_names(ctx: click.Context, param: click.Parameter, incomplete: str) -> list:
    return context_names(ctx, incomplete)


def completion_script(ctx: click.Context, shell: str) -> str:
    from click.shell_completion import get_completion_class

    root = ctx.find_root()
    prog = root.info_name or "corral"
    complete_var = f"_{prog}_COMPLETE".replace("-", "_").upper()
    cls = get_completion_class(shell)
    assert cls is not None, shell
    return cls(root.command, {}, prog, complete_var).source()
