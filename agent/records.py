"""What the agent remembers about each container on its host, on disk.

One JSON file per container in the state directory, replaced atomically, so a
restarted agent knows its containers' templates, limits and addresses.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog

from corral.errors import RuntimeFailure
from corral.model import Limits, NetworkAttachment

log = structlog.get_logger("corral.agent.records")


@dataclass(frozen=True)
class ContainerRecord:
    name: str
    template: str
    storage: str
    limits: Limits
    network: NetworkAttachment
    created_at: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ContainerRecord":
        data = json.loads(text)
        return cls(
            name=data["name"],
            template=data["template"],
            storage=data["storage"],
            limits=Limits(**data["limits"]),
            network=NetworkAttachment(**data["network"]),
            created_at=data["created_at"],
        )


class RecordStore:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "containers"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._reported: set[tuple[str, int, int]] = set()  # bad files already logged: (name, mtime, size)

    def _path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def save(self, record: ContainerRecord) -> None:
        path = self._path(record.name)
        write_durably(path, record.to_json(), path.with_suffix(".tmp"))  # the rename too survives a power loss

    def load(self, name: str) -> ContainerRecord | None:
        path = self._path(name)
        try:
            return self._read(path)
        except FileNotFoundError:
            return None
        except _BAD_RECORD as exc:
            raise RuntimeFailure(f"the record of {name!r} on this host is unreadable ({path}: {_why(exc)}); "
                                 "repair or remove that file") from None  # fmt: skip

    def delete(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)
        fsync_dir(self.dir)

    def all(self) -> list[ContainerRecord]:
        """Every readable record. An unreadable or corrupt file is reported (once per version of
        it) and skipped, never deleted: one bad file must not take the agent down with it."""
        records = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                records.append(self._read(path))
            except FileNotFoundError:  # removed meanwhile
                continue
            except _BAD_RECORD as exc:
                self._report(path, exc)
        return records

    def _read(self, path: Path) -> ContainerRecord:
        record = ContainerRecord.from_json(path.read_text())
        if f"{record.name}.json" != path.name:
            raise ValueError(f"it holds the record of {record.name!r}")
        return record

    def _report(self, path: Path, exc: Exception) -> None:
        try:
            st = path.stat()
            version = (path.name, st.st_mtime_ns, st.st_size)
        except OSError:
            version = (path.name, 0, 0)
        if version not in self._reported:
            self._reported.add(version)
            log.error("unreadable container record skipped", path=str(path), error=_why(exc))


# What a damaged record file raises: unreadable (OSError), not JSON or not UTF-8 (ValueError),
# missing or unexpected fields, or not an object (KeyError, TypeError, AttributeError).
_BAD_RECORD = (OSError, ValueError, KeyError, TypeError, AttributeError)


def _why(exc: Exception) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    if isinstance(exc, KeyError):
        return f"missing field {exc}"
    return f"{type(exc).__name__}: {exc}"[:300]


def write_durably(path: Path, text: str, tmp: Path | None = None) -> None:
    """Replace `path` with `text` atomically and durably: temporary file, fsync, rename, fsync
    of the directory."""
    tmp = tmp or path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make the renames and unlinks in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
