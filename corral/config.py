"""Reading the daemons' and the CLI's YAML configuration with precise errors.

Every problem is reported as `FILE:LINE: what is wrong`, so an operator can go
straight to the line. Unknown keys are refused (a typo must not be ignored).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml

from corral.errors import ConfigError, CorralError

T = TypeVar("T")


@dataclass
class Section:
    """One mapping of a YAML file, with the line of each key kept for errors."""

    path: Path
    where: str
    node: yaml.MappingNode
    values: dict[str, Any]

    def _line(self, key: str | None) -> int:
        if key is not None:
            for k, _ in self.node.value:
                if k.value == key:
                    return k.start_mark.line + 1
        return self.node.start_mark.line + 1

    def error(self, key: str | None, message: str) -> ConfigError:
        label = f"{self.where}.{key}" if self.where and key else (key or self.where or "document")
        return ConfigError(f"{self.path}:{self._line(key)}: {label}: {message}")

    def check_keys(self, allowed: set[str]) -> None:
        for key in self.values:
            if key not in allowed:
                raise self.error(key, f"unknown key (allowed: {', '.join(sorted(allowed))})")

    def get(self, key: str, kind: type[T], default: Any = ..., parse: Callable[[Any], Any] | None = None) -> Any:
        if key not in self.values or self.values[key] is None:
            if default is ...:
                raise self.error(None, f"missing required key {key!r}")
            return default
        value = self.values[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.error(key, f"expected {kind.__name__}, got {type(value).__name__} {value!r}")
        if parse is not None:
            try:
                return parse(value)
            except CorralError as exc:
                raise self.error(key, exc.message) from None
            except ValueError as exc:
                raise self.error(key, str(exc)) from None
        return value

    def section(self, key: str, required: bool = True) -> "Section | None":
        if key not in self.values or self.values[key] is None:
            if required:
                raise self.error(None, f"missing required section {key!r}")
            return None
        for k, v in self.node.value:
            if k.value == key:
                if not isinstance(v, yaml.MappingNode):
                    raise self.error(key, "expected a mapping")
                where = f"{self.where}.{key}" if self.where else key
                return Section(self.path, where, v, self.values[key])
        raise self.error(key, "expected a mapping")  # pragma: no cover - keys agree


def load_document(path: Path) -> Section:
    """Parse a YAML file whose top level is a mapping."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration: {exc.strerror}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        values = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 0
        raise ConfigError(f"{path}:{line}: invalid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(node, yaml.MappingNode) or not isinstance(values, dict):
        raise ConfigError(f"{path}:1: the configuration must be a mapping of keys to values")
    return Section(path, "", node, values)


def parse_address(value: str) -> str:
    """'host:port' with a port in range; IPv6 as '[::1]:7000'."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"invalid address {value!r}: expected HOST:PORT")
    return value


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path

    @classmethod
    def from_section(cls, section: Section) -> "TlsFiles":
        section.check_keys({"ca", "cert", "key"})
        base = section.path.parent
        files = {k: base / section.get(k, str) for k in ("ca", "cert", "key")}
        for key, file in files.items():
            if not file.is_file():
                raise section.error(key, f"file {file} does not exist")
        return cls(**files)

    def read(self) -> tuple[bytes, bytes, bytes]:
        return self.ca.read_bytes(), self.cert.read_bytes(), self.key.read_bytes()
