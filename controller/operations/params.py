"""Typed parameters of each operation kind (stored as a JSON object with the operation)."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any, Mapping, TypeVar

from corral.model import Limits

P = TypeVar("P", bound="_Params")


class Strategy(enum.StrEnum):
    """How a migration moves the container (its memory, when live)."""

    COLD = "cold"
    STOP_AND_COPY = "stop-and-copy"
    PRE_COPY = "pre-copy"
    POST_COPY = "post-copy"
    FROM_CHECKPOINT = "from-checkpoint"


class _Params:
    @classmethod
    def of(cls: type[P], params: Mapping[str, Any]) -> P:
        """From an operation's stored params; keys this version does not know are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in params.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


@dataclass(frozen=True)
class CreateParams(_Params):
    node: str
    template: str
    storage: str
    start: bool
    limits: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def limits_value(self) -> Limits:
        return Limits(**self.limits)


@dataclass(frozen=True)
class DestroyParams(_Params):
    node: str
    force: bool


@dataclass(frozen=True)
class MaintenanceParams(_Params):
    """An evacuation's or a rebalance's plan, made before it starts."""

    node: str = ""  # the node evacuated ("" for a rebalance)
    allow_cold: bool = False
    moves: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # container, source, target, live, reason
    stuck: list[dict[str, str]] = dataclasses.field(default_factory=list)  # container, reason


@dataclass(frozen=True)
class StaleCopyParams(_Params):
    node: str  # where the stopped stale copy is


@dataclass(frozen=True)
class FailoverParams(_Params):
    source: str  # the lost node
    target: str
    reason: str = ""  # why this target (the planner's words, or "requested with --to")
    generation: int = 0  # the volume's generation on the target


@dataclass(frozen=True)
class MigrateParams(_Params):
    source: str
    target: str
    live: bool = False
    postcopy: bool = False
    fallback_cold: bool = False
    strategy: str = Strategy.COLD
    from_checkpoint: str = ""
    # learnt while it runs
    was_running: bool = False
    volume_generation: int | None = None
    predumps: int = 0
    page_server: str = ""
    fell_back_to_cold: str = ""
    kept_checkpoint: str = ""  # where the source kept a complete checkpoint (a failed post-copy)
    kept_on: str = ""
