"""What every `corral` command shares: the invocation's settings (`Ctx`) and `run`, which
runs a command's coroutine and turns our errors into one line and an exit code."""

from __future__ import annotations

import asyncio
import functools
import os
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable, Coroutine, Mapping

import click

from corral.errors import CorralError

OUTPUT_FORMATS = ("table", "json", "yaml")


class Ctx:
    """One invocation's settings. The global options (-o, --no-headers, --context, --config)
    may be written after any subcommand too; each such occurrence sets its attribute here."""

    def __init__(
        self, config: Path | None = None, fmt: str | None = None, context: str | None = None, no_headers: bool = False
    ) -> None:
        self.config_path = config
        self.format = fmt or "table"
        self.context = context
        self.no_headers = no_headers

    @property
    def json(self) -> bool:
        return self.format == "json"

    @property
    def machine(self) -> bool:
        """Output for programs (the API objects as JSON or YAML), nothing else on stdout."""
        return self.format != "table"

    def settings(self):
        from controller.cli.settings import CliSettings

        return CliSettings.load(self.config_path, self.context)

    def client(self, timeout: float | None = None):
        settings = self.settings()
        return _client_factory(settings, settings.timeout if timeout is None else timeout)


def environ() -> Mapping[str, str]:
    """The invocation's environment. Read it here, never from os.environ directly: a warm
    helper running commands for several invocations gives each its own."""
    return _environ()


def _process_environ() -> Mapping[str, str]:
    return os.environ


def _run_coroutine(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


def _new_client(settings, timeout: float):
    from controller.client import ControllerClient

    return ControllerClient(settings.controller, settings.tls, timeout)


# Replaced by the warm helper (controller/cli/warm.py), which runs commands on its own event
# loop, gives each invocation its environment and lends clients its open channels.
_environ: Callable[[], Mapping[str, str]] = _process_environ
_runner: Callable[[Coroutine[Any, Any, Any]], Any] = _run_coroutine
_client_factory: Callable[[Any, float], Any] = _new_client


def set_runtime(
    runner: Callable[[Coroutine[Any, Any, Any]], Any],
    env: Callable[[], Mapping[str, str]],
    client_factory: Callable[[Any, float], Any] | None = None,
) -> None:
    global _runner, _environ, _client_factory
    _runner, _environ = runner, env
    _client_factory = client_factory or _new_client


def run(coro_fn: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    """Run an async command; turn our errors into one line and an exit code."""

    @functools.wraps(coro_fn)
    def wrapper(*args, **kwargs):
        try:
            return _runner(coro_fn(*args, **kwargs))
        except CorralError as exc:
            click.echo(f"corral: error: {exc.message}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("corral: interrupted", err=True)
            sys.exit(130)

    return wrapper
