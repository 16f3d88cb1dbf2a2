"""Where the CLI finds the controller and its certificate."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from controller.cli.context import environ
from corral.config import TlsFiles, load_document, parse_address
from corral.errors import ConfigError

USER_CONFIG = Path.home() / ".config" / "corral" / "config.yaml"
SYSTEM_CONFIG = Path("/etc/corral/cli.yaml")


@dataclass(frozen=True)
class CliSettings:
    controller: str
    tls: TlsFiles
    timeout: float

    @classmethod
    def load(cls, explicit: Path | None) -> "CliSettings":
        path = explicit or _default_path()
        doc = load_document(path)
        doc.check_keys({"controller", "tls", "timeout"})
        return cls(
            controller=doc.get("controller", str, parse=parse_address),
            tls=TlsFiles.from_section(doc.section("tls")),
            timeout=doc.get("timeout", float, 900.0),
        )


def _default_path() -> Path:
    env = environ().get("CORRAL_CONFIG")
    if env:
        return Path(env)
    for candidate in (USER_CONFIG, SYSTEM_CONFIG):
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"no CLI configuration: pass --config, set CORRAL_CONFIG, or create {USER_CONFIG} "
        "(`corral lab up` writes one for the local lab)"
    )
