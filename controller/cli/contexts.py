"""The CLI config file: several named controllers ("contexts", as kubectl's contexts or
Incus's remotes) and the one in use.

    current-context: lab-demo
    contexts:
      prod: {controller: 10.0.0.1:7700, tls: {ca: ca.crt, cert: me.crt, key: me.key}, timeout: 900}
      lab-demo: {controller: 10.77.0.1:7700, tls: {...}, previous-context: prod}

The older single-controller format (`controller`, `tls`, `timeout` at the top) reads as one
context named `default`, and is rewritten in the new format the first time the file changes.
`previous-context` is what `corral lab up` remembers: the context `lab down` returns to.
Relative TLS paths are relative to the file. Writes are atomic (temp file + rename, 0600),
and one writer at a time (a lock file beside it).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from controller.cli.context import environ
from corral.errors import ConfigError, NotFound

LEGACY_CONTEXT = "default"
CONTEXT_KEYS = {"controller", "tls", "timeout", "previous-context"}
_TOP_KEYS = {"current-context", "contexts"}
_LEGACY_KEYS = {"controller", "tls", "timeout"}
SYSTEM_CONFIG = Path("/etc/corral/cli.yaml")


def user_config() -> Path:
    home = environ().get("HOME")
    return (Path(home) if home else Path.home()) / ".config" / "corral" / "config.yaml"


def default_path(explicit: Path | None = None, *, for_writing: bool = False) -> Path | None:
    """The config file: --config, else $CORRAL_CONFIG, else the user's, else the system's
    (None when none exists). For writing, the user's file even when it does not exist yet."""
    if explicit:
        return Path(explicit)
    env = environ().get("CORRAL_CONFIG")
    if env:
        return Path(env)
    user = user_config()
    if for_writing or user.is_file():
        return user
    return SYSTEM_CONFIG if SYSTEM_CONFIG.is_file() else None


@dataclass
class ContextsFile:
    path: Path
    current: str | None = None
    # name -> the context's mapping as written (validated when it is used).
    contexts: dict[str, dict[str, Any]] = field(default_factory=dict)

    default_path = staticmethod(default_path)

    @classmethod
    def load(cls, path: Path | None, *, missing_ok: bool = False) -> "ContextsFile":
        from corral.config import load_document

        if path is None or (missing_ok and not path.exists()):
            return cls(path or user_config())
        doc = load_document(path)
        keys = set(doc.values)
        if keys & _LEGACY_KEYS and not keys & _TOP_KEYS:
            doc.check_keys(_LEGACY_KEYS)
            return cls(path, LEGACY_CONTEXT, {LEGACY_CONTEXT: dict(doc.values)})
        doc.check_keys(_TOP_KEYS)
        current = doc.get("current-context", str, None)
        section = doc.section("contexts", required=False)
        contexts: dict[str, dict[str, Any]] = {}
        if section is not None:
            for name in section.values:
                entry = section.section(str(name))
                entry.check_keys(CONTEXT_KEYS)
                contexts[str(name)] = dict(entry.values)
        if current is not None and current not in contexts:
            raise doc.error("current-context", f"no context named {current!r} (contexts: {_list(contexts)})")
        return cls(path, current, contexts)

    def names(self) -> list[str]:
        return list(self.contexts)

    def section(self, name: str):
        """The context's mapping as a config Section (for FILE:LINE errors)."""
        from corral.config import load_document

        doc = load_document(self.path)
        if name == LEGACY_CONTEXT and "contexts" not in doc.values:
            return doc
        return doc.section("contexts").section(name)

    def pick(self, requested: str | None) -> str:
        """The context to use: --context, else $CORRAL_CONTEXT, else the current one."""
        name = requested or environ().get("CORRAL_CONTEXT") or self.current
        if not name:
            raise ConfigError(
                f"{self.path}: no current context: `corral context use NAME` (contexts: {_list(self.contexts)})")
        if name not in self.contexts:
            raise NotFound(f"no context named {name!r} in {self.path} (contexts: {_list(self.contexts)})")
        return name

    # -- changes (each followed by save()) --------------------------------------------------

    def use(self, name: str) -> None:
        if name not in self.contexts:
            raise NotFound(f"no context named {name!r} in {self.path} (contexts: {_list(self.contexts)})")
        self.current = name

    def add(self, name: str, entry: dict[str, Any], *, switch: bool = True) -> None:
        """Add or replace context `name`; with `switch`, make it current and remember the one
        current before (unless that was `name` itself)."""
        entry = dict(entry)
        previous = self.current if self.current != name else self.contexts.get(name, {}).get("previous-context")
        if previous:
            entry["previous-context"] = previous
        self.contexts[name] = entry
        if switch:
            self.current = name

    def remove(self, name: str) -> None:
        """Remove `name`; if it was current, its remembered previous context becomes current
        (none if there is none left)."""
        entry = self.contexts.pop(name, None)
        if entry is None:
            return
        previous = entry.get("previous-context")
        if previous not in self.contexts:
            previous = None
        for other in self.contexts.values():
            if other.get("previous-context") == name:
                if previous:
                    other["previous-context"] = previous
                else:
                    other.pop("previous-context")
        if self.current == name:
            self.current = previous

    def save(self) -> None:
        import yaml

        doc: dict[str, Any] = {}
        if self.current:
            doc["current-context"] = self.current
        doc["contexts"] = self.contexts
        text = yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=4096)
        write_private(self.path, text)


@contextlib.contextmanager
def editing(path: Path | None = None) -> Iterator[ContextsFile]:
    """Load the config for a change, one writer at a time; saved when the block ends cleanly."""
    import fcntl

    path = default_path(path, for_writing=True)
    assert path is not None
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock_fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        config = ContextsFile.load(path, missing_ok=True)
        yield config
        config.save()
    finally:
        os.close(lock_fd)


def write_private(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically, readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _list(contexts) -> str:
    return ", ".join(contexts) or "none"
