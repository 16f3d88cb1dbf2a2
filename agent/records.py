"""What the agent remembers about each container on its host, on disk.

One JSON file per container in the state directory, replaced atomically, so a
restarted agent knows its containers' templates, limits and addresses.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from corral.model import Limits, NetworkAttachment


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

    def _path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def save(self, record: ContainerRecord) -> None:
        tmp = self._path(record.name).with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(record.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path(record.name))

    def load(self, name: str) -> ContainerRecord | None:
        try:
            return ContainerRecord.from_json(self._path(name).read_text())
        except FileNotFoundError:
            return None

    def delete(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)

    def all(self) -> list[ContainerRecord]:
        return [ContainerRecord.from_json(p.read_text()) for p in sorted(self.dir.glob("*.json"))]
