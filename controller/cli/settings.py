"""Where the CLI finds the controller and its certificate: the chosen context of the CLI
config (see controller/cli/contexts.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from controller.cli.contexts import ContextsFile, default_path, user_config
from corral.config import TlsFiles, parse_address
from corral.errors import ConfigError


@dataclass(frozen=True)
class CliSettings:
    controller: str
    tls: TlsFiles
    timeout: float
    context: str = ""

    @classmethod
    def load(cls, explicit: Path | None, context: str | None = None) -> "CliSettings":
        """The settings of `context` (default: $CORRAL_CONTEXT, else the file's current one)
        in the config file `explicit` (default: $CORRAL_CONFIG, the user's, the system's)."""
        path = default_path(explicit)
        if path is None:
            raise ConfigError(
                f"no CLI configuration: pass --config, set CORRAL_CONFIG, or create {user_config()} "
                "(`corral lab up` adds a context for the local lab)"
            )
        config = ContextsFile.load(path)
        name = config.pick(context)
        section = config.section(name)
        return cls(
            controller=section.get("controller", str, parse=parse_address),
            tls=TlsFiles.from_section(section.section("tls")),
            timeout=section.get("timeout", float, 900.0),
            context=name,
        )

